"""Model files shipped inside Python packages, and the optional libraries that read them.

Nothing here imports torch or transformers at module level: ``import peergpu.engines`` must
work on a machine without the ``engines`` extra, and say what to install when a model is asked
for. Everything runs offline (``HF_HUB_OFFLINE``): the built-in engine never downloads.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

from peergpu.engines.errors import EnginesNotInstalled

logger = logging.getLogger(__name__)

FindSpec = Callable[[str], ModuleSpec | None]


def missing_modules(modules: Iterable[str], *, find_spec: FindSpec | None = None) -> list[str]:
    """Top-level modules that are not installed; checked without importing them (seconds)."""
    find = find_spec or importlib.util.find_spec
    return [name for name in dict.fromkeys(modules) if find(name) is None]


def require(module: str) -> Any:
    """Import an optional library, typed ``Any`` so type checking never needs its stubs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EnginesNotInstalled([module.split(".")[0]]) from exc


def package_dir(package: str) -> Path:
    """Where a data-only package's files are, without importing it (some import heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EnginesNotInstalled([package])
    return Path(next(iter(spec.submodule_search_locations)))


def default_cache_dir() -> Path:
    """The user's cache (XDG), so a converted model survives restarts and upgrades of peergpu."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "peergpu" / "engines"


def converted_gguf(gguf: Path, cache_dir: Path) -> Path:
    """A Hugging Face folder (config, tokenizer, safetensors) made from a GGUF file, once.

    transformers reads GGUF in pure Python (about 20 s for a 135M model on 2 cores, most of it
    parsing metadata); the dequantized float32 weights it produces load from safetensors in
    about a second. The folder is keyed by the file's size and mtime and transformers' version,
    and appears atomically, so concurrent processes never see a half-written one.
    """
    transformers = require("transformers")
    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    target = cache_dir / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to %s (once)", gguf.name, target)
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=cache_dir))
    try:
        _convert(gguf, scratch)
        try:
            scratch.rename(target)
        except OSError:  # another process finished first: use its folder
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert(gguf: Path, folder: Path) -> None:
    transformers = require("transformers")
    safetensors_torch = require("safetensors.torch")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dequantized already; without this mark the folder loads as plain float32.
    del model.config.quantization_config
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    # save_model keeps one copy of tied weights (the embeddings are the output layer too).
    safetensors_torch.save_model(
        model, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )

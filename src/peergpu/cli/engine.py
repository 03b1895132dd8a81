"""``peergpu engine``: run the built-in CPU inference engine, an OpenAI-compatible server.

A host's agent forwards inference to an OpenAI-compatible URL; this command provides one
without a GPU or any download, for the demo, tests and CPU-only hosts. Models load before the
server listens, so the first request never waits for weights.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from rich.markup import escape

from peergpu.cli.common import configure_logging, err_console, fail
from peergpu.cli.output import EXIT_USAGE
from peergpu.engines import (
    BUILTIN_MODELS,
    Backend,
    EnginesNotInstalled,
    create_builtin,
    create_engine_app,
    required_modules,
)
from peergpu.engines.packaged import missing_modules
from peergpu.engines.worker import default_threads

app = typer.Typer(
    help="Run the built-in CPU inference engine (OpenAI-compatible /v1).", no_args_is_help=True
)

_MODEL_LIST = ", ".join(BUILTIN_MODELS)


@app.command()
def serve(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model", "-m", help=f"A model to serve, repeatable: {_MODEL_LIST} (default: all)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8100,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads per model (default: up to 2, no more than the cores).", min=1
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where converted model files are kept (default: ~/.cache/peergpu/engines).",
            envvar="PEERGPU_ENGINE_CACHE_DIR",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Load the models, then serve /v1/models, /v1/chat/completions and /v1/embeddings."""
    configure_logging(log_level)
    models = list(dict.fromkeys(model or BUILTIN_MODELS))
    unknown = [name for name in models if name not in BUILTIN_MODELS]
    if unknown:
        fail(
            escape(f"unknown model {', '.join(unknown)}; built-in models: {_MODEL_LIST}"),
            code=EXIT_USAGE,
        )
    missing = missing_modules(required_modules(models))
    if missing:
        fail(escape(str(EnginesNotInstalled(missing))), code=EXIT_USAGE)
    backends: list[Backend] = []
    try:
        for name in models:
            backends.append(
                _load(name, cache_dir=cache_dir, threads=threads or default_threads(len(models)))
            )
        err_console.print(f"serving {', '.join(models)} on http://{host}:{port}/v1")
        uvicorn.run(
            create_engine_app(backends),
            host=host,
            port=port,
            log_level=log_level.lower(),
            timeout_graceful_shutdown=5,
        )
    except EnginesNotInstalled as exc:
        fail(escape(str(exc)), code=EXIT_USAGE)
    finally:
        for backend in backends:
            backend.close()
    logging.getLogger(__name__).info("engine stopped")


def _load(name: str, *, cache_dir: Path | None, threads: int | None) -> Backend:
    err_console.print(f"loading {name}...")
    started = time.monotonic()
    backend = create_builtin(name, cache_dir=cache_dir, threads=threads)
    backend.load()
    err_console.print(f"loaded {name} in {time.monotonic() - started:.1f} s")
    return backend

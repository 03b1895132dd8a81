#!/usr/bin/env python3
"""The two quick-start commands, for a fresh machine with Python 3.11+ and nothing else.

    python3 dev.py demo    install (first run only) and run `peergpu demo`
    python3 dev.py test    install (first run only) and run every check: ruff, mypy, pytest

The first run puts a pinned uv into .tools/ and the locked dependencies (uv.lock) into .venv/.
Anything after the command is passed on (``python3 dev.py test -k orgs``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

UV_VERSION = "0.13.9"
ROOT = Path(__file__).resolve().parent
TOOLS = ROOT / ".tools"
BIN = "Scripts" if os.name == "nt" else "bin"
EXE = ".exe" if os.name == "nt" else ""


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        return 2
    os.chdir(ROOT)
    uv = ensure_uv()
    # The engines extra (CPU torch, the demo's embedding and chat models) serves the demo's
    # inference gateway and its tests.
    run([uv, "sync", "--frozen", "--extra", "engines", "--python", sys.executable])
    return COMMANDS[argv[0]](uv, argv[1:])


def ensure_uv() -> str:
    uv = TOOLS / BIN / f"uv{EXE}"
    if not uv.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(TOOLS)
        run([str(TOOLS / BIN / f"python{EXE}"), "-m", "pip", "install", "-q", f"uv=={UV_VERSION}"])
    return str(uv)


def demo(uv: str, extra: list[str]) -> int:
    return call([uv, "run", "--frozen", "--no-sync", "peergpu", "demo", *extra])


def test(uv: str, extra: list[str]) -> int:
    steps = [
        ["ruff", "check", "src", "tests", "bench", "dev.py"],
        ["ruff", "format", "--check", "src", "tests", "bench", "dev.py"],
        ["mypy"],
        ["pytest", *_workers(extra), *extra],
    ]
    for step in steps:
        code = call([uv, "run", "--frozen", "--no-sync", *step])
        if code != 0:
            return code
    return 0


def _workers(extra: list[str]) -> list[str]:
    """Two pytest workers (pytest-xdist) unless the caller chose (``-n 0`` runs in one process).
    Each worker has its own PostgreSQL database and Redis prefixes; most e2e tests wait on
    agents and servers, so two workers finish in about a third of the time on two cores."""
    chosen = any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in extra)
    return [] if chosen or "no:xdist" in extra else ["-n", "2"]


def run(command: list[str]) -> None:
    code = call(command)
    if code != 0:
        sys.exit(code)


def call(command: list[str]) -> int:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130


COMMANDS = {"demo": demo, "test": test}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

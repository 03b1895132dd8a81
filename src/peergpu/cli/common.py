"""Helpers shared by CLI commands: settings loading with readable errors, logging."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from peergpu.config import ServerSettings

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def load_settings(**overrides: Any) -> ServerSettings:
    """Settings from the environment plus CLI overrides; a bad setting is a clear message."""
    try:
        return ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [
            f"  PEERGPU_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: {err['msg']}"
            for err in exc.errors()
        ]
        fail("invalid configuration:\n" + "\n".join(lines))


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )

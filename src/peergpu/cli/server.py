"""``peergpu server`` and ``peergpu demo``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from peergpu.cli.common import configure_logging, console, load_settings
from peergpu.config import ServerSettings
from peergpu.server.app import create_app


def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind [env PEERGPU_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env PEERGPU_PORT].")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where SQLite and keys live [env PEERGPU_DATA_DIR].")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Run the control plane (REST API, agent sockets). Configured by PEERGPU_* variables."""
    settings = load_settings(host=host, port=port, data_dir=data_dir)
    _run(settings, log_level)


def demo(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Demo data folder (wiped with --fresh).")] = Path(
        ".peergpu/demo"
    ),
    fresh: Annotated[bool, typer.Option(help="Start from an empty database.")] = False,
    sample_job: Annotated[
        bool, typer.Option(help="Submit a sample job and print its live logs.")
    ] = True,
) -> None:
    """Run everything on the embedded defaults: SQLite, the in-process bus, the local object
    store, demo accounts, three simulated hosts that really run jobs, and a sample job."""
    from peergpu.demo import DEMO_SIGNUP_CREDIT_MICROS, seed_demo, wipe
    from peergpu.demo_runtime import run_demo

    if fresh:
        wipe(data_dir)
    settings = load_settings(
        host="127.0.0.1",
        port=port,
        data_dir=data_dir,
        database_url="",
        redis_url="",
        s3_bucket="",
        agent_heartbeat_seconds=5.0,
        signup_credit_micros=DEMO_SIGNUP_CREDIT_MICROS,
    )
    accounts, demo_hosts = asyncio.run(seed_demo(settings))
    console.rule("[bold]PeerGPU demo")
    console.print(f"API docs:  [link]{settings.effective_public_url}/docs[/link]")
    api_key = ""
    for account in accounts:
        console.print(
            f"{account.role:<7} {account.email:<24} password: {account.password}"
            + (f"  api key: {account.api_key}" if account.api_key else "")
        )
        api_key = account.api_key or api_key
    console.print("Demo accounts start with $100 of credit (no card needed in the demo).")
    url = settings.effective_public_url
    console.print(
        f"Try:  peergpu login --server {url} --api-key {api_key}\n"
        "      peergpu hosts list\n"
        "      peergpu jobs submit -f -- python3 -c \"print('hello from a GPU host')\""
    )
    console.rule()
    configure_logging("warning")
    run_demo(settings, demo_hosts, api_key, console, sample_job=sample_job)


def _run(settings: ServerSettings, log_level: str) -> None:
    configure_logging(log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        proxy_headers=True,
    )

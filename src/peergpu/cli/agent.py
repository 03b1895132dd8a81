"""``peergpu agent``: enrol this machine as a host and run the host agent."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from peergpu.agent import credentials as creds
from peergpu.agent.connection import FatalAgentError
from peergpu.agent.gpus import NoGpuFound, detect_probe
from peergpu.agent.runtime import run_agent, run_forever
from peergpu.agent.settings import AgentSettings, ServedModelConfig
from peergpu.cli.common import configure_logging, console, fail

app = typer.Typer(
    help="Run a host: enrol this machine, detect its GPUs, serve jobs.", no_args_is_help=True
)

StateDir = Annotated[
    Path | None,
    typer.Option(help="Where the credential and job folders live [env PEERGPU_AGENT_STATE_DIR]."),
]
Simulate = Annotated[
    str | None,
    typer.Option(help='Pretend to have GPUs, e.g. "H100x2,RTX4090" (demo, tests).'),
]


def _settings(**overrides: Any) -> AgentSettings:
    try:
        return AgentSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        fail(f"invalid agent configuration: {exc.errors()[0]['msg']}")


@app.command()
def enroll(
    server: Annotated[str, typer.Option(help="The PeerGPU server, e.g. https://peergpu.example")],
    token: Annotated[str, typer.Option(help="The one-time enrolment token from the web UI/API.")],
    state_dir: StateDir = None,
    name: Annotated[
        str | None, typer.Option(help="Host name to report (default: hostname).")
    ] = None,
) -> None:
    """Exchange an enrolment token for this host's credential (saved with 0600 permissions)."""
    settings = _settings(state_dir=state_dir)
    try:
        result = asyncio.run(
            creds.enroll(server_url=server, token=token, hostname=name or socket.gethostname())
        )
    except creds.EnrollmentError as exc:
        fail(str(exc))
    creds.save(settings.credentials_path, result)
    console.print(
        f"enrolled as host {result.host_id}; credential saved to {settings.credentials_path}"
    )
    console.print("start serving jobs with: peergpu agent run")


@app.command()
def run(
    state_dir: StateDir = None,
    simulate: Simulate = None,
    heartbeat: Annotated[
        float | None, typer.Option(help="Heartbeat interval in seconds (default: the server's).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    serve_model: Annotated[
        list[str] | None,
        typer.Option(
            help="Serve a model through the inference gateway, from a local OpenAI-compatible "
            "engine: 'name=NAME,kind=chat|embeddings,url=http://127.0.0.1:8000/v1' plus "
            "optional engine_model=, max_concurrency=, input_price=, output_price= "
            "(micro-dollars per million tokens). Repeatable [env PEERGPU_AGENT_MODELS, JSON].",
        ),
    ] = None,
) -> None:
    """Connect to the server and serve jobs until interrupted (reconnects by itself)."""
    configure_logging(log_level)
    models = [_served_model(spec) for spec in serve_model] if serve_model else None
    settings = _settings(
        state_dir=state_dir, simulate=simulate, heartbeat_seconds=heartbeat, models=models
    )
    try:
        credentials = creds.load(settings.credentials_path)
        run_forever(run_agent(settings, credentials))
    except creds.MissingCredentials as exc:
        fail(str(exc))
    except NoGpuFound as exc:
        fail(str(exc))
    except FatalAgentError as exc:
        fail(str(exc), code=3)
    logging.getLogger(__name__).info("agent stopped")


_PRICE_FIELDS = {
    "input_price": "input_price_per_million_micros",
    "output_price": "output_price_per_million_micros",
}


def _served_model(spec: str) -> ServedModelConfig:
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            fail(f"--serve-model: expected key=value pairs separated by commas, got {part!r}")
        fields[_PRICE_FIELDS.get(key.strip(), key.strip())] = value.strip()
    try:
        return ServedModelConfig.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        fail(f"--serve-model {spec!r}: {where}: {error['msg']}")


@app.command()
def gpus(simulate: Simulate = None) -> None:
    """Show the GPUs the agent detects (NVML, then nvidia-smi, or --simulate)."""
    try:
        probe = detect_probe(simulate=simulate)
    except NoGpuFound as exc:
        fail(str(exc))
    console.print(f"detected through {probe.name}:")
    for gpu in probe.detect():
        console.print(
            f"  [{gpu.index}] {gpu.model}  {gpu.memory_total_mib} MiB"
            f"  driver {gpu.driver_version or '?'}  CUDA {gpu.cuda_version or '?'}"
            f"  compute {gpu.compute_capability or '?'}  {gpu.uuid}"
        )
    for sample in probe.sample():
        console.print(
            f"  [{sample.index}] {sample.utilization_percent:.0f}% util  "
            f"{sample.memory_used_mib} MiB used  {sample.temperature_c or '?'} C"
        )
    probe.close()

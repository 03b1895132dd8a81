"""Assembles a running agent from its settings: GPU probe, verifier, runners, link, executor,
connection. Used by ``peergpu agent run``, the demo and the tests alike."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from peergpu.agent.bundle_fetch import BundleCache
from peergpu.agent.connection import AgentConnection, Backoff
from peergpu.agent.credentials import Credentials
from peergpu.agent.executor import JobExecutor
from peergpu.agent.gpus import GpuProbe, SimulatedProbe, detect_probe
from peergpu.agent.inference import InferenceServer
from peergpu.agent.link import Link
from peergpu.agent.runners import Runner, create_runner
from peergpu.agent.settings import AgentSettings
from peergpu.protocol.manifest import ManifestVerifier, decode_public_key

logger = logging.getLogger(__name__)


def run_forever(main: Coroutine[Any, Any, None]) -> None:
    """Run the agent's top coroutine on uvloop where it is installed (it comes with
    ``uvicorn[standard]``; not on Windows), else on asyncio's own loop. uvloop's socket and
    subprocess I/O cost a fraction of the default loop's, and the agent relays every gateway
    request and log line through its socket."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def build_runners(settings: AgentSettings) -> dict[str, Runner]:
    runners: dict[str, Runner] = {}
    for name in settings.runners:
        options = {"run_as": settings.run_as} if name == "process" and settings.run_as else {}
        runners[name] = create_runner(name, **options)
    return runners


def build_connection(
    settings: AgentSettings, credentials: Credentials, probe: GpuProbe | None = None
) -> tuple[AgentConnection, JobExecutor, GpuProbe]:
    probe = probe or detect_probe(simulate=settings.simulate or None)
    settings.work_root.mkdir(parents=True, exist_ok=True)
    settings.work_root.chmod(0o711)  # job users may traverse it, not list it
    link = Link(max_unacked_log_bytes=settings.max_unacked_log_bytes)
    verifier = ManifestVerifier(
        decode_public_key(credentials.server_public_key),
        host_id=credentials.host_id,
        nonce_file=settings.nonce_path,
    )
    runners = build_runners(settings)
    executor = JobExecutor(
        link=link,
        verifier=verifier,
        runners=runners,
        work_root=settings.work_root,
        keep_work_dirs=settings.keep_work_dirs,
        on_busy_change=probe.set_busy if isinstance(probe, SimulatedProbe) else None,
        bundles=BundleCache(
            settings.bundle_cache_dir,
            max_cache_bytes=settings.bundle_cache_bytes,
            max_bundle_bytes=settings.max_bundle_bytes,
            timeout=settings.bundle_download_timeout_seconds,
        ),
    )
    connection = AgentConnection(
        credentials=credentials,
        probe=probe,
        link=link,
        executor=executor,
        runners=sorted(runners),
        backoff=Backoff(settings.backoff_initial_seconds, settings.backoff_max_seconds),
        heartbeat_override=settings.heartbeat_seconds,
        inference=InferenceServer(link=link, models=settings.models) if settings.models else None,
    )
    return connection, executor, probe


async def run_agent(
    settings: AgentSettings, credentials: Credentials, *, stop: asyncio.Event | None = None
) -> None:
    """Run until SIGINT/SIGTERM (or ``stop``); running jobs are cancelled and reported."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    connection, executor, probe = build_connection(settings, credentials)
    try:
        await connection.run(stop)
    finally:
        await executor.shutdown()
        if connection.inference is not None:
            await connection.inference.close()
        await connection.link.close()
        probe.close()

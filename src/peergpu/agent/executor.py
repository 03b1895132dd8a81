"""Runs the jobs the server sends: verify the manifest, acknowledge it, fetch and unpack its
bundle, run it with a runner, stream its logs, upload its outputs, report the outcome.

A manifest that fails verification is refused with a ``manifest_ack`` carrying the reason, and
nothing runs. Every accepted job ends with exactly one final ``job_status`` (kept and resent
by the link until the server acknowledges it). A job whose bundle cannot be downloaded, does not
match its sha256 or is refused by :func:`peergpu.bundles.safe_extract` ends ``failed`` with the
fetch's or the extraction's reason code (and a ``system`` log line saying why) without running.

Bundle files are unpacked by the agent into the job's work dir before the runner starts; the
runner then hands the whole tree to the job's user (``prepare_workdir`` / the docker runner's
``chown``), so extraction never runs with the job's privileges nor lets the job touch the
agent's cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from peergpu.agent.artifacts import upload_outputs
from peergpu.agent.bundle_fetch import (
    SHA256_HEX,
    BundleCache,
    BundleFetchError,
    CachedBundle,
    run_to_completion,
)
from peergpu.agent.link import Link
from peergpu.agent.logbatch import LogBatcher, LogLine
from peergpu.agent.runners import ResourceLimits, Runner, RunResult, RunSpec
from peergpu.agent.runners.outcome import format_bytes
from peergpu.bundles import BundleError, BundleLimits, BundleSummary, safe_extract
from peergpu.protocol.manifest import (
    JobManifest,
    ManifestRefused,
    ManifestVerifier,
    SignedManifest,
)
from peergpu.protocol.messages import JobStatus, LogLineSpec, ManifestAck

logger = logging.getLogger(__name__)

#: How long a finished job's outcome may wait for the server's acknowledgement before the
#: executor forgets the job (the link still resends it on the next connection).
DRAIN_TIMEOUT_SECONDS = 30.0
FINISHED_MEMORY = 10_000


class JobExecutor:
    def __init__(
        self,
        *,
        link: Link,
        verifier: ManifestVerifier,
        runners: dict[str, Runner],
        work_root: Path,
        keep_work_dirs: bool = False,
        on_busy_change: Callable[[set[int]], None] | None = None,
        bundles: BundleCache | None = None,
        bundle_limits: BundleLimits | None = None,
    ) -> None:
        """``bundles``: where bundles are downloaded and cached (default: a
        :class:`BundleCache` in ``work_root/.bundles`` with its default limits)."""
        self._link = link
        self._verifier = verifier
        self._runners = runners
        self._work_root = work_root
        self._keep = keep_work_dirs
        self._on_busy_change = on_busy_change
        self._bundles = bundles or BundleCache(work_root / ".bundles")
        self._bundle_limits = bundle_limits or BundleLimits()
        self._tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._manifests: dict[uuid.UUID, JobManifest] = {}
        #: Jobs being prepared (their bundle fetched and unpacked), and jobs asked to stop.
        self._preparing: dict[uuid.UUID, asyncio.Task[str]] = {}
        self._cancel_requested: set[uuid.UUID] = set()
        #: Jobs that ran here, newest last; a job id runs at most once per host.
        self._finished: dict[uuid.UUID, None] = {}

    @property
    def running_jobs(self) -> list[uuid.UUID]:
        return list(self._tasks)

    async def on_manifest(self, signed: SignedManifest) -> None:
        try:
            manifest = self._verifier.verify(signed)
        except ManifestRefused as refused:
            logger.warning("refused a manifest: %s (%s)", refused.reason, refused.message)
            await self._link.send(
                ManifestAck(
                    job_id=refused.job_id,
                    accepted=False,
                    reason=refused.reason,
                    message=refused.message,
                ).model_dump_json()
            )
            return
        refusal = self._refusal(manifest)
        if refusal is not None:
            await self._link.send(
                ManifestAck(
                    job_id=manifest.job_id,
                    nonce=manifest.nonce,
                    accepted=False,
                    reason=refusal[0],
                    message=refusal[1],
                ).model_dump_json()
            )
            return
        await self._link.send(
            ManifestAck(
                job_id=manifest.job_id, nonce=manifest.nonce, accepted=True
            ).model_dump_json()
        )
        self._manifests[manifest.job_id] = manifest
        self._tasks[manifest.job_id] = asyncio.create_task(
            self._run(manifest), name=f"job-{manifest.job_id}"
        )
        self._busy_changed()

    async def cancel(self, job_id: uuid.UUID) -> None:
        """Stop the job, whether it is still being prepared or already running."""
        manifest = self._manifests.get(job_id)
        if manifest is None:
            return
        self._cancel_requested.add(job_id)
        preparing = self._preparing.get(job_id)
        if preparing is not None:
            preparing.cancel()
        await self._runners[manifest.runner].cancel(str(job_id))

    async def shutdown(self) -> None:
        """Cancel every running job and wait for their outcomes to be reported."""
        for job_id in list(self._tasks):
            await self.cancel(job_id)
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _refusal(self, manifest: JobManifest) -> tuple[str, str] | None:
        if manifest.job_id in self._tasks or manifest.job_id in self._finished:
            return "replayed", "This job already ran (or runs) on this host."
        if manifest.runner not in self._runners:
            return (
                "unsupported_runner",
                f"This host runs {sorted(self._runners)} jobs, not {manifest.runner}.",
            )
        if manifest.runner == "docker" and not manifest.image:
            return "malformed", "A docker job needs an image."
        return _bundle_refusal(manifest)

    async def _run(self, manifest: JobManifest) -> None:
        job_id = manifest.job_id
        workdir = self._work_root / str(job_id)
        try:
            await self._link.send_status(JobStatus(job_id=job_id, state="running"))
            batcher = LogBatcher(self._sender(job_id))
            not_started = await self._prepare(manifest, workdir, batcher)
            if not_started is not None:
                await batcher.close()
                last_seq = batcher.next_seq - 1
                update = {"last_log_seq": last_seq if last_seq >= 0 else None}
                await self._link.send_status(not_started.model_copy(update=update))
                return
            # No await between this check and run() registering the job: a cancel() from now
            # on reaches the runner.
            result = await self._runners[manifest.runner].run(_spec(manifest, workdir), batcher.add)
            await batcher.close()
            await upload_outputs(link=self._link, job_id=job_id, outputs_dir=result.outputs_dir)
            await self._link.send_status(_final_status(job_id, result, batcher.next_seq - 1))
        except Exception as exc:  # noqa: BLE001 - a job must always end with a status
            logger.exception("job %s failed inside the agent", job_id)
            await self._link.send_status(
                JobStatus(
                    job_id=job_id,
                    state="failed",
                    failure_reason="agent_error",
                    message=f"The agent failed to run the job: {type(exc).__name__}: {exc}",
                )
            )
        finally:
            self._cancel_requested.discard(job_id)
            self._finished[job_id] = None
            while len(self._finished) > FINISHED_MEMORY:
                del self._finished[next(iter(self._finished))]
            self._tasks.pop(job_id, None)
            self._manifests.pop(job_id, None)
            self._busy_changed()
            await self._link.wait_drained(job_id, DRAIN_TIMEOUT_SECONDS)
            if not self._keep:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(shutil.rmtree, workdir, True)

    async def _prepare(
        self, manifest: JobManifest, workdir: Path, batcher: LogBatcher
    ) -> JobStatus | None:
        """Fetch and unpack the job's bundle into ``workdir``, if it has one; the job's final
        status if it must not run (bundle refused, or cancelled meanwhile), else ``None``."""
        job_id = manifest.job_id
        if manifest.bundle_url is not None and manifest.bundle_sha256 is not None:
            task = asyncio.create_task(
                self._unpack(manifest.bundle_url, manifest.bundle_sha256, workdir)
            )
            self._preparing[job_id] = task
            try:
                await batcher.add("system", await task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the executor itself is being torn down
            except (BundleFetchError, BundleError) as error:
                return await _bundle_failure(job_id, batcher, error.reason, error.message)
            except OSError as error:
                message = f"The bundle could not be unpacked on this host: {error}"
                return await _bundle_failure(job_id, batcher, "bundle_extract_failed", message)
            finally:
                self._preparing.pop(job_id, None)
        if job_id in self._cancel_requested:
            return JobStatus(
                job_id=job_id,
                state="cancelled",
                failure_reason="cancelled",
                message="Cancelled on request before the job started.",
            )
        return None

    async def _unpack(self, url: str, sha256: str, workdir: Path) -> str:
        """Fetch (or reuse) the bundle and extract it into a fresh ``workdir``; a line for the
        job's log saying what was done."""
        async with self._bundles.checkout(url, sha256) as bundle:
            summary = await run_to_completion(
                _extract_fresh, bundle.path, workdir, self._bundle_limits
            )
        return _unpacked_line(bundle, summary)

    def _sender(self, job_id: uuid.UUID) -> Callable[[list[LogLine]], Awaitable[None]]:
        async def send(lines: list[LogLine]) -> None:
            await self._link.send_logs(
                job_id,
                [LogLineSpec(seq=ln.seq, stream=ln.stream, line=ln.line, ts=ln.ts) for ln in lines],
            )

        return send

    def _busy_changed(self) -> None:
        if self._on_busy_change is not None:
            self._on_busy_change({i for m in self._manifests.values() for i in m.gpu_indices})


def _bundle_refusal(manifest: JobManifest) -> tuple[str, str] | None:
    url, sha256 = manifest.bundle_url, manifest.bundle_sha256
    if url is None and sha256 is None:
        return None
    if url is None:
        return "malformed", "The manifest has a bundle sha256 but no bundle URL."
    if sha256 is None:
        return "malformed", "The manifest has a bundle URL but no bundle sha256 to check it."
    if not SHA256_HEX.fullmatch(sha256.lower()):
        return "malformed", "The manifest's bundle sha256 is not 64 hexadecimal digits."
    if not url.startswith(("https://", "http://")):
        return "malformed", "The manifest's bundle URL is not an http(s) URL."
    return None


async def _bundle_failure(
    job_id: uuid.UUID, batcher: LogBatcher, reason: str, message: str
) -> JobStatus:
    logger.warning("job %s: bundle refused: %s (%s)", job_id, reason, message)
    await batcher.add(
        "system", f"The job did not run: its bundle was refused ({reason}). {message}"
    )
    return JobStatus(job_id=job_id, state="failed", failure_reason=reason, message=message)


def _extract_fresh(bundle: Path, workdir: Path, limits: BundleLimits) -> BundleSummary:
    """Unpack into an empty, private ``workdir``. A work dir left by an earlier attempt at this
    job (the agent died during it) is removed first, so that nothing stale is mixed in."""
    if workdir.is_symlink() or workdir.is_file():
        workdir.unlink()
    elif workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(mode=0o700)
    return safe_extract(bundle, workdir, limits)


def _unpacked_line(bundle: CachedBundle, summary: BundleSummary) -> str:
    source = (
        f"downloaded {format_bytes(bundle.size)}" if bundle.downloaded else "found in the cache"
    )
    return (
        f"Bundle {bundle.path.stem[:12]}: {source}, unpacked {summary.members} entries "
        f"({format_bytes(summary.total_bytes)})."
    )


def _spec(manifest: JobManifest, workdir: Path) -> RunSpec:
    limits = manifest.limits
    defaults = ResourceLimits()
    return RunSpec(
        job_id=str(manifest.job_id),
        command=list(manifest.command),
        workdir=workdir,
        env=dict(manifest.env),
        image=manifest.image,
        gpu_ids=tuple(str(i) for i in manifest.gpu_indices),
        network=manifest.network,
        limits=ResourceLimits(
            memory_bytes=limits.memory_bytes or defaults.memory_bytes,
            cpu_seconds=limits.cpu_seconds or defaults.cpu_seconds,
            max_processes=limits.max_processes or defaults.max_processes,
            max_file_bytes=limits.max_file_bytes or defaults.max_file_bytes,
            wall_clock_seconds=limits.wall_clock_seconds or defaults.wall_clock_seconds,
        ),
    )


def _final_status(job_id: uuid.UUID, result: RunResult, last_seq: int) -> JobStatus:
    if result.failure_reason is None:
        state = "succeeded"
    elif result.failure_reason.value == "cancelled":
        state = "cancelled"
    else:
        state = "failed"
    return JobStatus(
        job_id=job_id,
        state=state,
        exit_code=result.exit_code,
        duration_seconds=round(result.duration_seconds, 3),
        failure_reason=result.failure_reason.value if result.failure_reason else None,
        message=result.message,
        peak_memory_bytes=result.peak_memory_bytes,
        cpu_seconds=result.cpu_seconds,
        last_log_seq=last_seq if last_seq >= 0 else None,
    )

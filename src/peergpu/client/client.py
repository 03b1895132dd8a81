"""The synchronous PeerGPU client: one method per API operation, typed results.

    from peergpu.client import PeerGPU

    with PeerGPU("https://peergpu.example", api_key="pgk_...") as gpu:
        bundle = gpu.upload_bundle("code.zip")
        job = gpu.submit_job(["python", "train.py"], bundle_sha256=bundle.sha256, gpu_count=1)
        for event in gpu.iter_logs(job.id):
            ...

Every method raises :class:`PeerGPUError` when the server refuses and
:class:`PeerGPUUnavailable` when it cannot be reached (see :mod:`peergpu.client.errors`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from peergpu.client import artifacts as artifact_files
from peergpu.client.billing import BillingMixin
from peergpu.client.bundles import ProgressCallback
from peergpu.client.errors import PeerGPUUnavailable
from peergpu.client.http import HttpSession, TokenCallback, TokenStore
from peergpu.client.logstream import LogFollower
from peergpu.client.models import (
    Artifact,
    BundleInfo,
    EnrollmentToken,
    Host,
    Job,
    JobEstimate,
    JobEvent,
    JobUpdate,
    LogLine,
    LogPage,
    MarketHost,
    Page,
    TokenPair,
    User,
)
from peergpu.client.usage import UsageMixin

_CHUNK = 1024 * 1024


class PeerGPU(BillingMixin, UsageMixin):
    """A client for one PeerGPU server (its billing methods are in
    :class:`~peergpu.client.billing.BillingMixin`, its inference usage methods in
    :class:`~peergpu.client.usage.UsageMixin`).

    Authenticate with an ``api_key``, or with an ``access_token`` and ``refresh_token`` (from
    :meth:`login` or stored by the CLI). Rotated token pairs are handed to ``on_tokens``, and
    to ``token_store`` when processes share a login (see :class:`~.http.TokenStore`; the CLI
    uses :class:`~.config.CredentialsFile`).
    ``transport`` replaces httpx's network transport (tests). Not safe to share between
    threads."""

    def __init__(
        self,
        server_url: str,
        *,
        api_key: str | None = None,
        access_token: str | None = None,
        refresh_token: str | None = None,
        on_tokens: TokenCallback | None = None,
        token_store: TokenStore | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        follow_idle_timeout: float = 60.0,
        max_reconnects: int = 8,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = HttpSession(
            server_url,
            api_key=api_key,
            access_token=access_token,
            refresh_token=refresh_token,
            on_tokens=on_tokens,
            token_store=token_store,
            timeout=timeout,
            retries=retries,
            transport=transport,
        )
        self.follow_idle_timeout = follow_idle_timeout
        self.max_reconnects = max_reconnects

    @property
    def server_url(self) -> str:
        return self._http.server_url

    @property
    def access_token(self) -> str | None:
        """The current access token (it changes when the client refreshes it)."""
        return self._http.access_token

    @property
    def refresh_token(self) -> str | None:
        return self._http.refresh_token

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PeerGPU:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- accounts ---------------------------------------------------------------------------

    def login(self, email: str, password: str) -> TokenPair:
        """Log in with e-mail and password; the client then uses (and reports through
        ``on_tokens``) the new token pair."""
        body = {"email": email, "password": password}
        response = self._http.request("POST", "/auth/login", json_body=body, authenticated=False)
        pair = TokenPair.model_validate(response.json())
        self._http.api_key = None
        self._http.set_tokens(pair.access_token, pair.refresh_token)
        return pair

    def logout(self) -> None:
        """End this login at the server (its refresh tokens stop working). Idempotent."""
        if self._http.refresh_token:
            body = {"refresh_token": self._http.refresh_token}
            self._http.request("POST", "/auth/logout", json_body=body, authenticated=False)
        self._http.access_token = self._http.refresh_token = None

    def me(self) -> User:
        return User.model_validate(self._get("/users/me"))

    # -- jobs -------------------------------------------------------------------------------

    def submit_job(
        self,
        command: Sequence[str],
        *,
        image: str | None = None,
        bundle_sha256: str | None = None,
        name: str | None = None,
        org_id: str | uuid.UUID | None = None,
        env: dict[str, str] | None = None,
        gpu_count: int | None = None,
        min_vram_mib: int | None = None,
        gpu_models: Sequence[str] | None = None,
        max_price_per_gpu_hour_micros: int | None = None,
        max_cost_micros: int | None = None,
        tags: Sequence[str] | None = None,
        max_duration_seconds: int | None = None,
        priority: int | None = None,
        network: bool | None = None,
        max_retries: int | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit a job. Arguments left as ``None`` take the server's defaults.
        ``max_cost_micros`` caps what the job may cost: it is stopped when the cap is spent.
        A wallet with no credit left is a 402 ``insufficient_credit``.

        Idempotent: the request carries ``idempotency_key`` (a fresh random one when not given),
        so the SDK's own retries after a dropped connection return the same job rather than a
        second one; pass your own key to make your retries safe too."""
        body = _job_body(
            command,
            image=image,
            bundle_sha256=bundle_sha256,
            name=name,
            org_id=org_id,
            env=env,
            gpu_count=gpu_count,
            min_vram_mib=min_vram_mib,
            gpu_models=gpu_models,
            max_price_per_gpu_hour_micros=max_price_per_gpu_hour_micros,
            max_cost_micros=max_cost_micros,
            tags=tags,
            max_duration_seconds=max_duration_seconds,
            priority=priority,
            network=network,
            max_retries=max_retries,
        )
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        response = self._http.request(
            "POST", "/jobs", json_body=body, headers=headers, idempotent=True
        )
        return Job.model_validate(response.json())

    def estimate_job(
        self,
        command: Sequence[str],
        *,
        image: str | None = None,
        bundle_sha256: str | None = None,
        name: str | None = None,
        org_id: str | uuid.UUID | None = None,
        env: dict[str, str] | None = None,
        gpu_count: int | None = None,
        min_vram_mib: int | None = None,
        gpu_models: Sequence[str] | None = None,
        max_price_per_gpu_hour_micros: int | None = None,
        max_cost_micros: int | None = None,
        tags: Sequence[str] | None = None,
        max_duration_seconds: int | None = None,
        priority: int | None = None,
        network: bool | None = None,
        max_retries: int | None = None,
    ) -> JobEstimate:
        """What :meth:`submit_job` with the same arguments would cost if submitted now, and
        whether your credit covers its hold. Nothing is queued or held (safe to repeat). The
        spec is checked as a submit checks it (422 for a bad one; a ``bundle_sha256`` must be
        uploaded already, but the estimate does not depend on it, so it can be left out)."""
        body = _job_body(
            command,
            image=image,
            bundle_sha256=bundle_sha256,
            name=name,
            org_id=org_id,
            env=env,
            gpu_count=gpu_count,
            min_vram_mib=min_vram_mib,
            gpu_models=gpu_models,
            max_price_per_gpu_hour_micros=max_price_per_gpu_hour_micros,
            max_cost_micros=max_cost_micros,
            tags=tags,
            max_duration_seconds=max_duration_seconds,
            priority=priority,
            network=network,
            max_retries=max_retries,
        )
        response = self._http.request("POST", "/jobs/estimate", json_body=body, idempotent=True)
        return JobEstimate.model_validate(response.json())

    def list_jobs(
        self,
        *,
        state: str | None = None,
        org_id: str | uuid.UUID | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[Job]:
        """Your jobs (or an organization's), newest first."""
        params = {
            "state": state,
            "org_id": str(org_id) if org_id is not None else None,
            "limit": limit,
            "offset": offset,
        }
        return Page[Job].model_validate(self._get("/jobs", params))

    def get_job(self, job_id: str | uuid.UUID) -> Job:
        return Job.model_validate(self._get(f"/jobs/{job_id}"))

    def cancel_job(self, job_id: str | uuid.UUID) -> Job:
        """Cancel a job; a job that already ended is a 409 ``job_finished``."""
        response = self._http.request("POST", f"/jobs/{job_id}/cancel")
        return Job.model_validate(response.json())

    def job_events(self, job_id: str | uuid.UUID) -> list[JobEvent]:
        """The job's state transitions, oldest first."""
        page = Page[JobEvent].model_validate(self._get(f"/jobs/{job_id}/events"))
        return page.items

    def logs(
        self, job_id: str | uuid.UUID, *, after: str | None = None, limit: int = 1000
    ) -> LogPage:
        """One page of log lines after the cursor ``after`` (from the start when ``None``)."""
        params = {"after": after, "limit": limit}
        return LogPage.model_validate(self._get(f"/jobs/{job_id}/logs", params))

    def iter_logs(
        self, job_id: str | uuid.UUID, *, follow: bool = True, after: str | None = None
    ) -> Iterator[LogLine | JobUpdate]:
        """Yield the job's log lines in order, and (when following) its state changes.

        Without ``follow``: the lines stored so far, page by page. With ``follow``: a live
        server-sent-events stream that ends after a :class:`JobUpdate` with ``end=True``. A
        dropped or idle connection is reopened with ``Last-Event-ID`` (the last line's cursor),
        so no line is lost or repeated; after ``max_reconnects`` failed attempts in a row,
        :class:`PeerGPUUnavailable`."""
        if not follow:
            yield from self._iter_log_pages(str(job_id), after)
            return
        follower = LogFollower(
            self._http,
            str(job_id),
            after=after,
            idle_timeout=self.follow_idle_timeout,
            max_reconnects=self.max_reconnects,
        )
        yield from follower.events()

    def list_artifacts(self, job_id: str | uuid.UUID) -> list[Artifact]:
        return Page[Artifact].model_validate(self._get(f"/jobs/{job_id}/artifacts")).items

    def download_artifacts(
        self,
        job_id: str | uuid.UUID,
        dest_dir: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
    ) -> list[tuple[Artifact, Path]]:
        """Download every artifact of a job under ``dest_dir`` (created if needed), streaming
        each to disk and checking its size and SHA-256 before it takes its final name.

        Every path is checked first: if any would land outside ``dest_dir``, :class:`UnsafePath`
        is raised before a byte is written. A file that fails its checks raises
        :class:`DownloadError` and is not left behind (files already verified stay).
        ``progress(done_bytes, total_bytes)`` covers all files together."""
        dest = Path(dest_dir)
        found = self.list_artifacts(job_id)
        planned = [(a, artifact_files.safe_destination(dest, a.path)) for a in found]
        total = sum(a.size for a, _ in planned)
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done, total)

        if progress is not None:
            progress(0, total)
        for artifact, target in planned:
            self._download(artifact, target, advance)
        return planned

    # -- bundles ----------------------------------------------------------------------------

    def upload_bundle(
        self,
        source: str | os.PathLike[str] | bytes,
        *,
        progress: ProgressCallback | None = None,
    ) -> BundleInfo:
        """Upload a zip (a path, streamed in chunks, or bytes). Bundles are content-addressed:
        uploading the same bytes again returns the same ``sha256`` (safe to retry)."""
        if isinstance(source, bytes):
            data = source
            size = len(data)

            def chunks() -> Iterator[bytes]:
                for start in range(0, size, _CHUNK):
                    yield data[start : start + _CHUNK]
                    if progress is not None:
                        progress(min(start + _CHUNK, size), size)

        else:
            path = Path(source)
            size = path.stat().st_size

            def chunks() -> Iterator[bytes]:
                sent = 0
                with path.open("rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        yield chunk
                        sent += len(chunk)
                        if progress is not None:
                            progress(sent, size)

        headers = {"Content-Type": "application/zip", "Content-Length": str(size)}
        if progress is not None:
            progress(0, size)
        response = self._http.request(
            "POST", "/bundles", headers=headers, content=chunks, idempotent=True
        )
        return BundleInfo.model_validate(response.json())

    # -- hosts ------------------------------------------------------------------------------

    def list_marketplace_hosts(
        self,
        *,
        gpu_model: str | None = None,
        min_vram_mib: int | None = None,
        min_gpus: int | None = None,
        max_price_per_gpu_hour_micros: int | None = None,
        region: str | None = None,
        tags: Sequence[str] = (),
        online: bool = True,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[MarketHost]:
        """Hosts renters can use, cheapest first, then most reliable. ``online=False`` includes
        offline hosts; ``tags`` must all be carried by a host."""
        params = {
            "gpu_model": gpu_model,
            "min_vram_mib": min_vram_mib,
            "min_gpus": min_gpus,
            "max_price_per_gpu_hour_micros": max_price_per_gpu_hour_micros,
            "region": region,
            "tag": list(tags),
            "online": online,
            "limit": limit,
            "offset": offset,
        }
        return Page[MarketHost].model_validate(self._get("/marketplace/hosts", params))

    def list_my_hosts(self) -> list[Host]:
        """Your own hosts, with GPUs, availability and 30-day uptime."""
        return Page[Host].model_validate(self._get("/hosts")).items

    def create_enrollment_token(
        self,
        *,
        name: str | None = None,
        region: str | None = None,
        tags: Sequence[str] | None = None,
        price_per_gpu_hour: Decimal | str | float | None = None,
        ttl_seconds: int | None = None,
    ) -> EnrollmentToken:
        """A one-time token to enrol a machine (needs the host role). The price is in dollars
        per GPU-hour and is sent as a decimal string, so it is never rounded."""
        price = None
        if price_per_gpu_hour is not None:
            try:
                price = str(Decimal(str(price_per_gpu_hour)))
            except InvalidOperation:
                raise ValueError(f"not a price: {price_per_gpu_hour!r}") from None
        spec: dict[str, Any] = {
            "name": name,
            "region": region,
            "tags": list(tags) if tags is not None else None,
            "price_per_gpu_hour": price,
            "ttl_seconds": ttl_seconds,
        }
        body = {k: v for k, v in spec.items() if v is not None}
        response = self._http.request("POST", "/hosts/enrollment-tokens", json_body=body)
        return EnrollmentToken.model_validate(response.json())

    # -- helpers ----------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self._http.request("GET", path, params=params).json()
        return body if isinstance(body, dict) else {"items": body}

    def _iter_log_pages(self, job_id: str, after: str | None) -> Iterator[LogLine]:
        cursor = after
        while True:
            page = self.logs(job_id, after=cursor)
            yield from page.lines
            if page.complete or not page.lines or page.next_cursor in (None, cursor):
                return
            cursor = page.next_cursor

    def _download(self, artifact: Artifact, target: Path, advance: Callable[[int], None]) -> None:
        try:
            with self._http.send_unauthenticated(artifact.download_url) as response:
                artifact_files.write_verified(
                    response.iter_bytes(_CHUNK),
                    target,
                    size=artifact.size,
                    sha256=artifact.sha256,
                    on_bytes=advance,
                )
        except httpx.TransportError as exc:
            raise PeerGPUUnavailable(f"the download of {artifact.path} broke: {exc}") from exc


def _job_body(
    command: Sequence[str],
    *,
    org_id: str | uuid.UUID | None,
    gpu_models: Sequence[str] | None,
    tags: Sequence[str] | None,
    **fields: Any,
) -> dict[str, Any]:
    """A job spec as the server takes it (submit and estimate): ``None`` means "the server's
    default", so it is left out."""
    spec: dict[str, Any] = {
        "command": list(command),
        "org_id": str(org_id) if org_id is not None else None,
        "gpu_models": list(gpu_models) if gpu_models is not None else None,
        "tags": list(tags) if tags is not None else None,
        **fields,
    }
    return {k: v for k, v in spec.items() if v is not None}

"""Sending work to hosts: sign a manifest and publish it to whichever replica holds the socket."""

from __future__ import annotations

import time
import uuid

from peergpu.protocol.manifest import (
    JobManifest,
    ManifestLimits,
    SignedManifest,
    new_nonce,
    sign_manifest,
)
from peergpu.protocol.messages import Cancel, ManifestDelivery
from peergpu.server.agents.channels import REVOKED_CONTROL, control_message, host_channel
from peergpu.server.context import ServerContext


def build_manifest(
    *,
    context: ServerContext,
    job_id: uuid.UUID,
    host_id: uuid.UUID,
    command: list[str],
    env: dict[str, str] | None = None,
    runner: str = "process",
    image: str | None = None,
    gpu_indices: list[int] | None = None,
    network: bool = False,
    limits: ManifestLimits | None = None,
    bundle_url: str | None = None,
    bundle_sha256: str | None = None,
    nonce: str | None = None,
) -> SignedManifest:
    now = time.time()
    manifest = JobManifest(
        job_id=job_id,
        host_id=host_id,
        issued_at=now,
        expires_at=now + context.settings.manifest_ttl_seconds,
        nonce=nonce or new_nonce(),
        runner=runner,
        image=image,
        command=command,
        env=env or {},
        gpu_indices=gpu_indices or [],
        network=network,
        limits=limits or ManifestLimits(),
        bundle_url=bundle_url,
        bundle_sha256=bundle_sha256,
    )
    return sign_manifest(context.signing_key, manifest)


async def send_manifest(
    *, context: ServerContext, host_id: uuid.UUID, manifest: SignedManifest
) -> None:
    """Publish after the caller's commit. Fire-and-forget: the host's ``manifest_ack`` (on the
    job's event stream) confirms delivery; callers own the ack deadline."""
    await context.bus.publish(host_channel(host_id), manifest_delivery(manifest))


def manifest_delivery(manifest: SignedManifest) -> bytes:
    """The ``manifest`` frame for a host's channel, as the agent receives it."""
    return ManifestDelivery(manifest=manifest).model_dump_json().encode()


async def send_cancel(
    *, context: ServerContext, host_id: uuid.UUID, job_id: uuid.UUID, reason: str = ""
) -> None:
    message = Cancel(job_id=job_id, reason=reason)
    await context.bus.publish(host_channel(host_id), message.model_dump_json().encode())


async def disconnect_host(*, context: ServerContext, host_id: uuid.UUID) -> None:
    """Close the host's socket wherever it is held (after its credential was revoked)."""
    await context.bus.publish(host_channel(host_id), control_message(REVOKED_CONTROL))

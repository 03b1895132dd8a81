"""Job manifests, signed by the server with Ed25519 and verified by the agent.

The signature covers the exact bytes of ``payload`` (the manifest as JSON), so there is no
canonicalization to get wrong: the agent verifies the bytes, then parses them. A manifest names
the job, the host it is for, when it was issued, when it expires and a random nonce; the agent
refuses one that is unsigned, tampered, for another host, expired, or already seen.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: Tolerated clock difference between server and agent, in seconds.
CLOCK_SKEW_SECONDS = 60.0


class ManifestLimits(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    memory_bytes: int | None = Field(default=None, ge=1)
    cpu_seconds: int | None = Field(default=None, ge=1)
    max_processes: int | None = Field(default=None, ge=1)
    max_file_bytes: int | None = Field(default=None, ge=1)
    wall_clock_seconds: float | None = Field(default=None, gt=0)


class JobManifest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: uuid.UUID
    host_id: uuid.UUID
    issued_at: float
    expires_at: float
    nonce: str = Field(min_length=16, max_length=64)
    runner: Literal["process", "docker"] = "process"
    image: str | None = None
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    gpu_indices: list[int] = Field(default_factory=list)
    network: bool = False
    limits: ManifestLimits = ManifestLimits()
    bundle_url: str | None = None
    bundle_sha256: str | None = None


class SignedManifest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    payload: str
    signature: str = ""
    key_id: str = ""


class ManifestRefused(Exception):
    """A manifest the agent must not run; ``reason`` is the code reported to the server."""

    def __init__(self, reason: str, message: str, *, job_id: uuid.UUID | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.job_id = job_id


def new_nonce() -> str:
    return secrets.token_hex(16)


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def encode_public_key(public_key: Ed25519PublicKey) -> str:
    return base64.b64encode(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def decode_public_key(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text))


def sign_manifest(private_key: Ed25519PrivateKey, manifest: JobManifest) -> SignedManifest:
    payload = manifest.model_dump_json()
    signature = private_key.sign(payload.encode())
    return SignedManifest(
        payload=payload,
        signature=base64.b64encode(signature).decode(),
        key_id=key_id(private_key.public_key()),
    )


class ManifestVerifier:
    """Checks manifests for one host. Seen nonces are remembered until their manifest expires,
    in memory and (if ``nonce_file`` is given) on disk, so a replay is refused across restarts.
    """

    def __init__(
        self,
        public_key: Ed25519PublicKey,
        *,
        host_id: uuid.UUID,
        nonce_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._public_key = public_key
        self._host_id = host_id
        self._clock = clock
        self._nonce_file = nonce_file
        self._seen: dict[str, float] = self._load_nonces()

    def verify(self, signed: SignedManifest) -> JobManifest:
        """The manifest, if it may run here; ManifestRefused otherwise. Marks the nonce used.

        A refusal carries the job id the payload claims, unverified, only so the server can
        file the refusal under that job.
        """
        claimed = _claimed_job_id(signed.payload)
        if not signed.signature:
            raise ManifestRefused("unsigned", "The manifest carries no signature.", job_id=claimed)
        try:
            self._public_key.verify(base64.b64decode(signed.signature), signed.payload.encode())
        except (InvalidSignature, ValueError) as exc:
            raise ManifestRefused(
                "bad_signature",
                "The manifest's signature does not match its content.",
                job_id=claimed,
            ) from exc
        try:
            manifest = JobManifest.model_validate_json(signed.payload)
        except ValidationError as exc:
            raise ManifestRefused(
                "malformed", f"The manifest is malformed: {exc}", job_id=claimed
            ) from exc
        now = self._clock()
        if manifest.host_id != self._host_id:
            raise ManifestRefused(
                "wrong_host", "The manifest is for another host.", job_id=manifest.job_id
            )
        if manifest.expires_at < now - CLOCK_SKEW_SECONDS or manifest.issued_at > (
            now + CLOCK_SKEW_SECONDS
        ):
            raise ManifestRefused(
                "expired",
                "The manifest has expired (or the clocks disagree).",
                job_id=manifest.job_id,
            )
        self._forget_expired(now)
        if manifest.nonce in self._seen:
            raise ManifestRefused(
                "replayed", "This manifest was already received once.", job_id=manifest.job_id
            )
        self._seen[manifest.nonce] = manifest.expires_at + CLOCK_SKEW_SECONDS
        self._save_nonces()
        return manifest

    def _forget_expired(self, now: float) -> None:
        for nonce in [n for n, until in self._seen.items() if until < now]:
            del self._seen[nonce]

    def _load_nonces(self) -> dict[str, float]:
        if self._nonce_file is None or not self._nonce_file.exists():
            return {}
        try:
            data = json.loads(self._nonce_file.read_text())
            return {str(k): float(v) for k, v in data.items()}
        except (ValueError, AttributeError):
            return {}

    def _save_nonces(self) -> None:
        if self._nonce_file is None:
            return
        tmp = self._nonce_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._seen))
        tmp.replace(self._nonce_file)


def _claimed_job_id(payload: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(json.loads(payload)["job_id"]))
    except (ValueError, KeyError, TypeError):
        return None

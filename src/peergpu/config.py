"""Settings for the server process.

One ``ServerSettings`` object is built per process (from the environment, prefix ``PEERGPU_``)
and passed in explicitly; nothing deep in the code reads the environment. Paths derive from
``data_dir`` so tests and the demo can redirect everything with one setting.
"""

from __future__ import annotations

import secrets
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Secrets that must never be accepted outside dev mode.
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "changethis", "secret", "dev"})
MIN_SECRET_LENGTH = 32


class Mode(StrEnum):
    dev = "dev"
    production = "production"


class ServerSettings(BaseSettings):
    """Configuration of ``peergpu server``; every field is settable as ``PEERGPU_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="PEERGPU_", extra="ignore")

    mode: Mode = Mode.dev
    data_dir: Path = Path.home() / ".peergpu"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    public_url: str = ""

    database_url: str = ""
    database_echo: bool = False
    redis_url: str = ""
    redis_prefix: str = "peergpu:"
    redis_max_connections: int = Field(
        default=10_000, ge=10, description="each connected agent holds one (its subscription)"
    )
    migrate_on_start: bool = True

    secret_key: SecretStr = SecretStr("")
    access_token_ttl_seconds: int = Field(default=900, ge=30)
    refresh_token_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60)
    invite_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_cost_kib: int = Field(default=65536, ge=8)

    auth_rate_limit: int = Field(default=10, ge=1, description="auth attempts per IP per window")
    auth_rate_window_seconds: int = Field(default=60, ge=1)

    manifest_signing_key: SecretStr = Field(
        default=SecretStr(""),
        description="base64 Ed25519 private key (32 bytes); generated into the data dir if empty",
    )
    manifest_ttl_seconds: int = Field(default=300, ge=10)
    enrollment_token_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    agent_heartbeat_seconds: float = Field(default=15.0, gt=0)
    agent_missed_heartbeats: int = Field(default=3, ge=1)

    # Object storage: the local folder under data_dir unless PEERGPU_S3_BUCKET is set.
    s3_bucket: str = ""
    s3_endpoint_url: str = Field(default="", description="for S3-compatible services; empty = AWS")
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr = SecretStr("")
    s3_prefix: str = Field(default="", description="key prefix inside the bucket, e.g. 'peergpu/'")
    s3_addressing_style: str = Field(default="auto", pattern="^(auto|path|virtual)$")

    # Jobs and scheduling.
    scheduler_enabled: bool = True
    scheduler_sweep_seconds: float = Field(default=5.0, gt=0)
    scheduler_batch_size: int = Field(
        default=400, ge=1, le=5000, description="queued jobs one scheduler pass considers at most"
    )
    manifest_ack_timeout_seconds: float = Field(default=30.0, gt=0)
    host_lost_grace_seconds: float = Field(
        default=120.0, ge=0, description="how long a job may miss from its host before it is lost"
    )
    job_queue_timeout_seconds: int = Field(
        default=24 * 3600, ge=1, description="a queued job nobody can run expires after this"
    )
    job_default_max_duration_seconds: int = Field(default=3600, ge=1)
    job_max_duration_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    job_default_max_retries: int = Field(default=2, ge=0, le=10)
    bundle_max_bytes: int = Field(default=512 << 20, ge=1024)

    # Billing. Money is integer micro-dollars (1 USD = 1,000,000).
    platform_fee_bps: int = Field(
        default=1000, ge=0, le=10_000, description="platform fee in basis points (1000 = 10%)"
    )
    signup_credit_micros: int = Field(
        default=0, ge=0, description="promotional credit every new account starts with"
    )
    billing_settle_seconds: float = Field(
        default=5.0, gt=0, description="how often open job charges are swept for settlement"
    )
    topup_min_micros: int = Field(default=5_000_000, ge=500_000)
    topup_max_micros: int = Field(default=10_000_000_000, ge=1_000_000)
    payout_min_micros: int = Field(
        default=10_000_000, ge=10_000, description="smallest host payout (Stripe Transfer)"
    )
    payout_auto_threshold_micros: int = Field(
        default=0,
        ge=0,
        description="pay hosts out automatically once payable reaches this; 0 = off",
    )
    stripe_secret_key: SecretStr = SecretStr("")
    stripe_webhook_secret: SecretStr = Field(
        default=SecretStr(""),
        description="the webhook endpoints' signing secrets (whsec_...), comma-separated: Stripe "
        "signs Connect events (account.updated) with the Connect endpoint's own secret",
    )
    stripe_api_base: str = Field(
        default="", description="Stripe API address; empty = Stripe itself (tests use a fake)"
    )
    stripe_connect_base: str = Field(
        default="", description="Stripe Connect address (account links); empty = Stripe itself"
    )
    stripe_webhook_tolerance_seconds: int = Field(default=300, ge=1)

    # The OpenAI-compatible gateway (/v1): limits per API key, per minute.
    gateway_requests_per_minute: int = Field(default=600, ge=1)
    gateway_tokens_per_minute: int = Field(default=1_000_000, ge=1)
    #: A request ends with 504 after this long, streaming or not.
    gateway_request_timeout_seconds: float = Field(default=600.0, gt=0)
    #: A host that sends nothing for this long is given up on (and the request retried once).
    gateway_first_token_timeout_seconds: float = Field(default=60.0, gt=0)
    #: How long a request waits for a free slot when every host is at its concurrency.
    gateway_queue_timeout_seconds: float = Field(default=30.0, ge=0)

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_request_bytes: int = Field(default=1 << 20, ge=1024)

    smtp_host: str = ""
    smtp_port: int = 587
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_starttls: bool = True
    smtp_from: str = "PeerGPU <no-reply@peergpu.local>"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _normalize_database_url(cls, value: str) -> str:
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                return "postgresql+asyncpg://" + value[len(prefix) :]
        if value.startswith("sqlite:///"):
            return "sqlite+aiosqlite:///" + value[len("sqlite:///") :]
        return value

    @model_validator(mode="after")
    def _refuse_weak_secret_outside_dev(self) -> ServerSettings:
        secret = self.secret_key.get_secret_value()
        if self.mode is Mode.production and (
            secret.lower() in PLACEHOLDER_SECRETS or len(secret) < MIN_SECRET_LENGTH
        ):
            raise ValueError(
                "PEERGPU_SECRET_KEY must be set to a random string of at least "
                f"{MIN_SECRET_LENGTH} characters in production mode "
                '(python -c "import secrets; print(secrets.token_urlsafe(48))")'
            )
        return self

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'peergpu.db'}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def stripe_enabled(self) -> bool:
        return bool(self.stripe_secret_key.get_secret_value())

    @property
    def effective_public_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def resolved_secret_key(self) -> str:
        """The signing secret; in dev mode one is generated once and kept in the data dir.

        Production mode never reaches the generated branch: the validator above refuses it.
        """
        secret = self.secret_key.get_secret_value()
        if secret:
            return secret
        path = self.data_dir / "secret_key"
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        generated = secrets.token_urlsafe(48)
        path.touch(mode=0o600)
        path.write_text(generated)
        return generated

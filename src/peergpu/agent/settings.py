"""Settings of ``peergpu agent`` (env prefix ``PEERGPU_AGENT_``), passed in explicitly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from peergpu.agent.bundle_fetch import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_MAX_BUNDLE_BYTES,
    DEFAULT_TIMEOUT_SECONDS,
)
from peergpu.protocol.messages import MODEL_NAME_PATTERN

RunnerName = Literal["process", "docker"]


class ServedModelConfig(BaseModel):
    """A model this host serves through the gateway, from a local OpenAI-compatible engine
    (vLLM, a llama.cpp server, Ollama, ``peergpu engine serve``) that only the agent reaches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="the name renters ask for")
    kind: Literal["chat", "embeddings"]
    url: str = Field(
        pattern=r"^https?://", description="the engine's base URL, e.g. http://127.0.0.1:8000/v1"
    )
    engine_model: str | None = Field(
        default=None, description="the engine's own name for the model (default: name)"
    )
    api_key: SecretStr | None = Field(default=None, description="sent to the engine as Bearer")
    max_concurrency: int = Field(default=4, ge=1, le=1024)
    input_price_per_million_micros: int = Field(default=0, ge=0, le=10**12)
    output_price_per_million_micros: int = Field(default=0, ge=0, le=10**12)


def _default_runners() -> list[RunnerName]:
    return ["process"]


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PEERGPU_AGENT_", extra="ignore")

    state_dir: Path = Path.home() / ".peergpu-agent"
    simulate: str = Field(default="", description='simulated GPUs, e.g. "H100x2,RTX4090"')
    runners: list[RunnerName] = Field(default_factory=_default_runners)
    heartbeat_seconds: float | None = Field(
        default=None, gt=0, description="override the server's heartbeat interval"
    )
    backoff_initial_seconds: float = Field(default=1.0, gt=0)
    backoff_max_seconds: float = Field(default=60.0, gt=0)
    max_unacked_log_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    work_dir: Path | None = Field(
        default=None,
        description="job work dirs; default state_dir/work, or /var/lib/peergpu-agent/work as "
        "root (jobs run as an unprivileged user, who must be able to traverse every parent)",
    )
    keep_work_dirs: bool = False
    models: list[ServedModelConfig] = Field(
        default_factory=list,
        description="models served through the inference gateway (JSON list in "
        "PEERGPU_AGENT_MODELS, or `peergpu agent run --serve-model`)",
    )
    run_as: str = Field(default="", description="unprivileged user for jobs when root")
    max_bundle_bytes: int = Field(
        default=DEFAULT_MAX_BUNDLE_BYTES, ge=1, description="largest job bundle downloaded (zip)"
    )
    bundle_cache_bytes: int = Field(
        default=DEFAULT_CACHE_BYTES,
        ge=0,
        description="downloaded bundles kept for later jobs (work_root/.bundles), in total",
    )
    bundle_download_timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS, gt=0, description="longest a bundle download may take"
    )

    @property
    def credentials_path(self) -> Path:
        return self.state_dir / "credentials.json"

    @property
    def work_root(self) -> Path:
        if self.work_dir is not None:
            return self.work_dir
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            return Path("/var/lib/peergpu-agent/work")
        return self.state_dir / "work"

    @property
    def bundle_cache_dir(self) -> Path:
        return self.work_root / ".bundles"

    @property
    def nonce_path(self) -> Path:
        return self.state_dir / "seen-nonces.json"

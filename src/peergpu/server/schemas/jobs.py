"""Request and response bodies of the jobs, bundles and marketplace endpoints."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from peergpu.server.schemas.hosts import Tag

EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
Arg = Annotated[str, StringConstraints(min_length=0, max_length=8192)]
GpuModelFilter = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)
]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(strip_whitespace=True, max_length=100)] = ""
    org_id: uuid.UUID | None = Field(
        default=None, description="run (and later bill) under this organization"
    )
    image: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = Field(
        default=None, description="a Docker image; runs with the docker runner"
    )
    bundle_sha256: Sha256 | None = Field(
        default=None, description="from POST /api/v1/bundles; unpacked into the work dir"
    )
    command: list[Arg] = Field(min_length=1, max_length=256)
    env: dict[EnvName, Annotated[str, StringConstraints(max_length=32768)]] = Field(
        default_factory=dict, max_length=100
    )
    gpu_count: int = Field(default=1, ge=1, le=16)
    min_vram_mib: int = Field(default=0, ge=0, le=4 * 1024 * 1024)
    gpu_models: list[GpuModelFilter] = Field(
        default_factory=list,
        max_length=20,
        description="any of these (case-insensitive substring of the GPU model, 'H100')",
    )
    max_price_per_gpu_hour_micros: int | None = Field(default=None, ge=0, le=10**12)
    tags: list[Tag] = Field(default_factory=list, max_length=20)
    max_duration_seconds: int | None = Field(default=None, ge=1, le=366 * 24 * 3600)
    priority: int = Field(default=0, ge=-10, le=10, description="higher runs first")
    network: bool = Field(default=False, description="give the job network access")
    max_retries: int | None = Field(default=None, ge=0, le=10)
    max_cost_micros: int | None = Field(
        default=None,
        ge=1,
        le=10**12,
        description="the most this job may cost (micro-dollars); it is stopped at the cap",
    )


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    owner_id: uuid.UUID
    org_id: uuid.UUID | None
    state: str
    image: str | None
    bundle_sha256: str | None
    command: list[str]
    env: dict[str, str]
    gpu_count: int
    min_vram_mib: int
    gpu_models: list[str]
    max_price_per_gpu_hour_micros: int | None
    max_cost_micros: int | None
    tags: list[str]
    max_duration_seconds: int
    priority: int
    network: bool
    max_retries: int
    attempt: int
    host_id: uuid.UUID | None
    gpu_indices: list[int]
    price_per_gpu_hour_micros: int | None
    created_at: datetime
    assigned_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    failure_reason: str | None
    message: str
    duration_seconds: float | None
    queue_expires_at: datetime


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="all jobs matching the filters (for paging)")


class JobEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: datetime
    from_state: str | None
    to_state: str
    reason: str
    message: str
    host_id: uuid.UUID | None


class JobEventsPublic(BaseModel):
    data: list[JobEventPublic]
    count: int


class ArtifactPublic(BaseModel):
    path: str
    size: int
    sha256: str
    created_at: datetime
    download_url: str = Field(description="signed; valid for an hour; GET it without auth")


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    count: int


class BundlePublic(BaseModel):
    sha256: str
    size: int
    members: int
    uncompressed_bytes: int


class MarketGpu(BaseModel):
    index: int
    model: str
    memory_total_mib: int
    busy: bool


class MarketHost(BaseModel):
    id: uuid.UUID
    name: str
    region: str
    tags: list[str]
    price_per_gpu_hour_micros: int
    status: str
    uptime_30d: float
    runners: list[str]
    gpus: list[MarketGpu]
    free_gpus: int


class MarketHostsPublic(BaseModel):
    data: list[MarketHost]
    count: int

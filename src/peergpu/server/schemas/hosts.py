from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MICROS_PER_DOLLAR = 1_000_000

Price = Annotated[
    Decimal,
    Field(ge=0, le=1000, decimal_places=6, description='USD per GPU-hour, e.g. "2.49"'),
]
Tag = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[a-z0-9][a-z0-9_.:-]{0,31}$")
]
HostName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Region = Annotated[str, StringConstraints(strip_whitespace=True, max_length=64)]


def to_micros(price: Decimal | None) -> int | None:
    return None if price is None else int(price * MICROS_PER_DOLLAR)


def from_micros(micros: int | None) -> Decimal | None:
    return None if micros is None else Decimal(micros) / MICROS_PER_DOLLAR


class HostSettingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: HostName | None = None
    region: Region | None = None
    tags: list[Tag] | None = Field(default=None, max_length=32)
    price_per_gpu_hour: Price | None = None


class EnrollmentTokenCreate(HostSettingsIn):
    ttl_seconds: int | None = Field(default=None, ge=60, le=30 * 24 * 3600)


class EnrollmentTokenCreated(BaseModel):
    token: str = Field(description="give it to `peergpu agent enroll --token`; works once")
    expires_at: datetime
    command: str = Field(description="the enrol command to run on the host")


class HostUpdate(HostSettingsIn):
    paused: bool | None = Field(default=None, description="paused hosts get no new jobs")


class GpuPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    uuid: str
    model: str
    memory_total_mib: int
    driver_version: str
    cuda_version: str | None
    compute_capability: str | None
    utilization_percent: float | None
    memory_used_mib: int | None
    temperature_c: float | None
    power_watts: float | None
    sampled_at: datetime | None


class HostPublic(BaseModel):
    id: uuid.UUID
    name: str
    region: str
    tags: list[str]
    price_per_gpu_hour: Decimal | None
    availability: Literal["online", "offline", "paused"]
    status: Literal["online", "offline"]
    paused: bool
    verified: bool
    hostname: str
    os: str
    agent_version: str
    gpu_probe: str
    runners: list[str]
    last_seen_at: datetime | None
    created_at: datetime
    uptime_30d: float = Field(description="share of the last 30 days online, 0..1")
    gpus: list[GpuPublic]


class HostsPublic(BaseModel):
    data: list[HostPublic]
    count: int


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=512)
    hostname: str = Field(default="", max_length=255)


class EnrollResponse(BaseModel):
    host_id: uuid.UUID
    credential: str = Field(description="the host's secret; saved by the agent, shown once")
    server_public_key: str = Field(description="base64 Ed25519 key that signs manifests")
    key_id: str
    heartbeat_interval: float
    websocket_path: str

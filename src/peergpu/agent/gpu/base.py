"""What every GPU probe returns and raises; see :mod:`peergpu.agent.gpus` for the overview.

Errors::

    RuntimeError
    └── GpuProbeError      a probe could not read the GPUs (library or tool missing, failed,
        │                  timed out, printed something unparseable); the message says which
        └── NoGpuFound     no probe works on this machine; the message says what was tried,
                           why each attempt failed and what the user can do next
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Self


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as found at start-up; fields mirror ``protocol.messages.GpuSpec``.

    ``index`` is the NVML / nvidia-smi index (PCI bus order), the number ``docker --gpus
    device=<index>`` expects; ``uuid`` is the identifier that survives reboots and re-cabling.
    """

    index: int
    uuid: str
    model: str
    memory_total_mib: int
    driver_version: str  # "" if unknown
    cuda_version: str | None  # the newest CUDA the driver supports, e.g. "12.4"
    compute_capability: str | None  # e.g. "9.0"


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU's load at one moment, sent with every heartbeat.

    ``utilization_percent`` lies in 0..100; a GPU that cannot report it (some MIG and vGPU
    set-ups) reports 0. Temperature and power are ``None`` where the GPU does not report them.
    """

    index: int
    utilization_percent: float
    memory_used_mib: int
    temperature_c: float | None
    power_watts: float | None


class GpuProbe(ABC):
    """Reads the GPUs of this machine.

    Contract for implementations:

    - ``detect()`` lists every GPU, ordered by index; it may be slow (up to seconds: it may start
      a process) and is called once at start-up and on re-registration.
    - ``sample()`` returns one :class:`GpuSample` per GPU that ``detect()`` found, ordered by
      index; it is called on every heartbeat (15 s by default), so it must stay cheap.
    - Both are blocking; async callers run them with ``asyncio.to_thread``. A probe is not
      thread-safe: call it from one thread at a time.
    - Both raise :class:`GpuProbeError` when the GPUs cannot be read, never a library's own error.
    - ``close()`` releases what the probe holds (NVML's handle); it is idempotent. Probes are
      context managers that close on exit.
    """

    name: ClassVar[str]

    @abstractmethod
    def detect(self) -> list[GpuInfo]: ...

    @abstractmethod
    def sample(self) -> list[GpuSample]: ...

    def close(self) -> None:
        """Release resources; the default holds none."""
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class GpuProbeError(RuntimeError):
    """A probe could not read the GPUs; the message names the probe and the cause."""


class NoGpuFound(GpuProbeError):
    """No probe found a GPU. ``attempts`` maps each probe tried to why it failed."""

    def __init__(self, message: str, *, attempts: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.attempts: dict[str, str] = dict(attempts or {})


def clamp_percent(value: float) -> float:
    """Keep a utilization figure inside 0..100 (drivers have been seen to report 101)."""
    return min(100.0, max(0.0, value))

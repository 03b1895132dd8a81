"""A stand-in for the ``pynvml`` module, injected as ``NvmlProbe(nvml=FakeNvml(...))``.

It behaves as the binding does: errors are ``NVMLError`` instances carrying the NVML return
code in ``value``; strings come back as ``str`` (nvidia-ml-py >= 11.515) or, with
``bytes_strings=True``, as ``bytes`` (older bindings). It counts the calls the tests check.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

MIB = 1024 * 1024

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {NVML_ERROR_GPU_IS_LOST: "GPU is lost"}.get(self.value, f"NVML code {self.value}")


@dataclass
class FakeDevice:
    uuid: str = "GPU-5c1a3f3e-8f2b-6d4e-1a2b-3c4d5e6f7a8b"
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total_mib: int = 81559
    memory_used_mib: int = 61234
    compute_capability: tuple[int, int] = (9, 0)
    utilization: int = 97
    temperature: int = 64
    power_milliwatts: int = 512370
    #: NVML error code per field name ("temperature", "power", "uuid", ...)
    errors: dict[str, int] = field(default_factory=dict)

    def check(self, name: str) -> None:
        if name in self.errors:
            raise FakeNVMLError(self.errors[name])

    def get(self, name: str) -> object:
        self.check(name)
        return getattr(self, name)


class FakeNvml:
    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(
        self,
        devices: list[FakeDevice],
        *,
        bytes_strings: bool = False,
        init_error: int | None = None,
        driver_version: str = "550.54.15",
        cuda_version: int = 12040,
        system_errors: dict[str, int] | None = None,
    ) -> None:
        self.devices = devices
        self.bytes_strings = bytes_strings
        self.init_error = init_error
        self.driver_version = driver_version
        self.cuda_version = cuda_version
        self.system_errors = system_errors or {}
        self.calls: Counter[str] = Counter()

    def _string(self, value: str) -> str | bytes:
        return value.encode() if self.bytes_strings else value

    def _system(self, name: str) -> None:
        self.calls[name] += 1
        if name in self.system_errors:
            raise FakeNVMLError(self.system_errors[name])

    def nvmlInit(self) -> None:
        self._system("nvmlInit")
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self._system("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._system("nvmlSystemGetDriverVersion")
        return self._string(self.driver_version)

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._system("nvmlSystemGetCudaDriverVersion")
        return self.cuda_version

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        self._system("nvmlSystemGetCudaDriverVersion_v2")
        return self.cuda_version

    def nvmlDeviceGetCount(self) -> int:
        self._system("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._system("nvmlDeviceGetHandleByIndex")
        return self.devices[index]

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str | bytes:
        return self._string(str(handle.get("uuid")))

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str | bytes:
        return self._string(str(handle.get("name")))

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> SimpleNamespace:
        handle.check("memory")
        total = handle.memory_total_mib * MIB
        used = handle.memory_used_mib * MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeDevice) -> object:
        return handle.get("compute_capability")

    def nvmlDeviceGetUtilizationRates(self, handle: FakeDevice) -> SimpleNamespace:
        return SimpleNamespace(gpu=handle.get("utilization"), memory=10)

    def nvmlDeviceGetTemperature(self, handle: FakeDevice, sensor: int) -> object:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return handle.get("temperature")

    def nvmlDeviceGetPowerUsage(self, handle: FakeDevice) -> object:
        return handle.get("power_milliwatts")


class OldFakeNvml(FakeNvml):
    """A binding from before ``nvmlSystemGetCudaDriverVersion_v2`` existed."""

    nvmlSystemGetCudaDriverVersion_v2 = None  # type: ignore[assignment]

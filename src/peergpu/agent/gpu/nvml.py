"""A probe that reads the GPUs through NVML, the library the NVIDIA driver ships
(``libnvidia-ml.so.1``), by way of the ``nvidia-ml-py`` binding (module ``pynvml``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar, Protocol, TypeVar, cast

from peergpu.agent.gpu.base import GpuInfo, GpuProbe, GpuProbeError, GpuSample, clamp_percent

_T = TypeVar("_T")

_MIB = 1024 * 1024
_NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED
_DRIVER_NOT_LOADED = 9  # NVML_ERROR_DRIVER_NOT_LOADED
_LIBRARY_NOT_FOUND = 12  # NVML_ERROR_LIBRARY_NOT_FOUND


class NvmlMemory(Protocol):
    total: int  # bytes
    used: int  # bytes


class NvmlUtilization(Protocol):
    gpu: int  # percent


class NvmlApi(Protocol):
    """The part of ``pynvml`` this probe calls; a stand-in for tests needs only this.

    Errors are instances of ``NVMLError`` with an integer ``value`` (the NVML return code).
    Older bindings return ``bytes`` for names and versions, newer ones ``str``; both are read.
    ``nvmlSystemGetCudaDriverVersion_v2`` is used when the binding has it.
    """

    NVMLError: type[Exception]
    NVML_TEMPERATURE_GPU: int

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str | bytes: ...
    def nvmlSystemGetCudaDriverVersion(self) -> int: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> object: ...
    def nvmlDeviceGetUUID(self, handle: object) -> str | bytes: ...
    def nvmlDeviceGetName(self, handle: object) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: object) -> NvmlMemory: ...
    def nvmlDeviceGetCudaComputeCapability(self, handle: object) -> tuple[int, int]: ...
    def nvmlDeviceGetUtilizationRates(self, handle: object) -> NvmlUtilization: ...
    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int: ...
    def nvmlDeviceGetPowerUsage(self, handle: object) -> int: ...  # milliwatts


class NvmlProbe(GpuProbe):
    """GPUs through NVML: no process to start, so sampling costs microseconds.

    The constructor imports ``pynvml`` (unless ``nvml`` is given) and calls ``nvmlInit`` once;
    it raises :class:`GpuProbeError` saying why when either fails. ``close()`` calls
    ``nvmlShutdown``; after it, ``detect`` and ``sample`` raise :class:`GpuProbeError`.

    A field a GPU does not report (NVML answers NotSupported, common on consumer cards, MIG and
    vGPU) becomes ``None`` (``""`` for the driver version; 0 for utilization and memory used).
    Any other NVML error on a field every GPU has (UUID, name, memory) raises
    :class:`GpuProbeError`: the GPU has fallen off the bus or the driver is broken.
    """

    name: ClassVar[str] = "nvml"

    def __init__(self, *, nvml: NvmlApi | None = None) -> None:
        self._nvml = nvml if nvml is not None else _import_pynvml()
        self._handles: list[object] | None = None
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            raise GpuProbeError(f"NVML: {describe_nvml_error(exc)}") from exc
        self._open = True

    def detect(self) -> list[GpuInfo]:
        handles = self._device_handles()
        nvml = self._nvml
        driver = self._optional(nvml.nvmlSystemGetDriverVersion)
        cuda_version = self._optional(self._cuda_driver_version)
        gpus = []
        for index, handle in enumerate(handles):
            capability = self._optional(partial(nvml.nvmlDeviceGetCudaComputeCapability, handle))
            memory = self._required(partial(nvml.nvmlDeviceGetMemoryInfo, handle))
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(self._required(partial(nvml.nvmlDeviceGetUUID, handle))),
                    model=_text(self._required(partial(nvml.nvmlDeviceGetName, handle))),
                    memory_total_mib=int(memory.total) // _MIB,
                    driver_version=_text(driver) if driver is not None else "",
                    cuda_version=format_cuda_version(cuda_version),
                    compute_capability=(
                        f"{capability[0]}.{capability[1]}" if capability is not None else None
                    ),
                )
            )
        return gpus

    def sample(self) -> list[GpuSample]:
        nvml = self._nvml
        samples = []
        for index, handle in enumerate(self._device_handles()):
            rates = self._supported(partial(nvml.nvmlDeviceGetUtilizationRates, handle))
            memory = self._supported(partial(nvml.nvmlDeviceGetMemoryInfo, handle))
            temperature = self._optional(
                partial(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            )
            milliwatts = self._optional(partial(nvml.nvmlDeviceGetPowerUsage, handle))
            utilization = float(rates.gpu) if rates is not None else 0.0
            samples.append(
                GpuSample(
                    index=index,
                    utilization_percent=clamp_percent(utilization),
                    memory_used_mib=int(memory.used) // _MIB if memory is not None else 0,
                    temperature_c=float(temperature) if temperature is not None else None,
                    power_watts=milliwatts / 1000.0 if milliwatts is not None else None,
                )
            )
        return samples

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._handles = None
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass  # nothing to do about it, and the process is usually on its way out

    # ---------------------------------------------------------------- helpers

    def _device_handles(self) -> list[object]:
        if not self._open:
            raise GpuProbeError("NVML: the probe is closed")
        if self._handles is None:
            nvml = self._nvml
            count = self._required(nvml.nvmlDeviceGetCount)
            # Handles stay valid until nvmlShutdown, so look them up once.
            self._handles = [
                self._required(partial(nvml.nvmlDeviceGetHandleByIndex, i)) for i in range(count)
            ]
        return self._handles

    def _cuda_driver_version(self) -> int:
        newer = getattr(self._nvml, "nvmlSystemGetCudaDriverVersion_v2", None)
        getter = newer if callable(newer) else self._nvml.nvmlSystemGetCudaDriverVersion
        return int(getter())

    def _required(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except self._nvml.NVMLError as exc:
            raise GpuProbeError(f"NVML: {describe_nvml_error(exc)}") from exc

    def _supported(self, call: Callable[[], _T]) -> _T | None:
        """``None`` where the GPU does not support the query; other errors raise."""
        try:
            return call()
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) == _NOT_SUPPORTED:
                return None
            raise GpuProbeError(f"NVML: {describe_nvml_error(exc)}") from exc

    def _optional(self, call: Callable[[], _T]) -> _T | None:
        """``None`` on any NVML error: the figure is nice to have, not worth failing over."""
        try:
            return call()
        except self._nvml.NVMLError:
            return None


def format_cuda_version(version: int | None) -> str | None:
    """NVML's integer CUDA version as text: 12040 -> "12.4", 11080 -> "11.8"."""
    if version is None or version <= 0:
        return None
    return f"{version // 1000}.{version % 1000 // 10}"


def describe_nvml_error(exc: BaseException) -> str:
    """A sentence for the user about an NVML error."""
    code = getattr(exc, "value", None)
    if code == _LIBRARY_NOT_FOUND:
        return "libnvidia-ml.so.1 not found (is the NVIDIA driver installed?)"
    if code == _DRIVER_NOT_LOADED:
        return "the NVIDIA kernel driver is not loaded"
    try:
        text = str(exc)
    except Exception:  # pynvml's __str__ calls into the library, which may be half-loaded
        text = ""
    return text or f"NVML error {code}"


def _import_pynvml() -> NvmlApi:
    try:
        module: Any = importlib.import_module("pynvml")
    except ImportError as exc:
        raise GpuProbeError(
            "NVML: the Python binding is not installed (pip install nvidia-ml-py)"
        ) from exc
    return cast(NvmlApi, module)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value

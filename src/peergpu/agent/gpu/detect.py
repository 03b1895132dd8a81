"""Choosing a probe at start-up; the order is explained in :mod:`peergpu.agent.gpus`."""

from __future__ import annotations

from collections.abc import Callable

from peergpu.agent.gpu.base import GpuProbe, GpuProbeError, NoGpuFound
from peergpu.agent.gpu.nvidia_smi import NvidiaSmiProbe
from peergpu.agent.gpu.nvml import NvmlApi, NvmlProbe
from peergpu.agent.gpu.simulated import SimulatedProbe

SIMULATE_EXAMPLE = "H100x2,RTX4090"


def detect_probe(
    *,
    simulate: str | None = None,
    nvidia_smi: str = "nvidia-smi",
    nvml: NvmlApi | None = None,
) -> GpuProbe:
    """The first probe that works and sees at least one GPU.

    ``simulate`` (a spec such as ``"H100x2,RTX4090"``) skips detection and returns a
    :class:`SimulatedProbe`; a bad spec raises ``ValueError``. ``None`` or a blank string (the
    settings default) means real GPUs. Otherwise NVML is tried, then
    ``nvidia_smi`` (a name looked up on PATH, or a path); ``nvml`` replaces the ``pynvml``
    module (tests). A probe that was opened but found no GPU is closed before moving on.

    Raises :class:`NoGpuFound`, whose message and ``attempts`` say what each probe reported.
    """
    if simulate is not None and simulate.strip():
        return SimulatedProbe(simulate)
    attempts: dict[str, str] = {}
    candidates: list[tuple[str, Callable[[], GpuProbe]]] = [
        ("NVML", lambda: NvmlProbe(nvml=nvml)),
        ("nvidia-smi", lambda: NvidiaSmiProbe(nvidia_smi)),
    ]
    for label, open_probe in candidates:
        probe = None
        try:
            probe = open_probe()
            if probe.detect():
                return probe
            attempts[label] = "no GPUs found"
        except GpuProbeError as exc:
            attempts[label] = _without_prefix(str(exc), label)
        if probe is not None:
            probe.close()
    raise NoGpuFound(_no_gpu_message(attempts), attempts=attempts)


def _no_gpu_message(attempts: dict[str, str]) -> str:
    tried = "; ".join(f"{label}: {reason}" for label, reason in attempts.items())
    return (
        f"No NVIDIA GPU found. Tried {tried}. Install the NVIDIA driver and check that "
        f"`nvidia-smi` lists your GPUs, or pass --simulate {SIMULATE_EXAMPLE!r} to try the agent "
        "without GPUs."
    )


def _without_prefix(message: str, label: str) -> str:
    # Probe errors start with their own name ("NVML: ..."); the summary adds it once.
    prefix = f"{label}: "
    return message[len(prefix) :] if message.lower().startswith(prefix.lower()) else message

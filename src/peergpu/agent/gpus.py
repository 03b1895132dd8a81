"""GPU detection for the host agent: what GPUs this machine has, and how busy they are.

Detection order (:func:`detect_probe`, once at agent start-up):

1. ``--simulate SPEC`` given (e.g. ``"H100x2,RTX4090"``): a :class:`SimulatedProbe` with GPUs
   from :data:`PROFILES`; nothing is probed. For the demo, the tests, and machines without GPUs.
2. NVML (:class:`NvmlProbe`): the ``nvidia-ml-py`` binding loads ``libnvidia-ml.so.1`` from the
   driver, ``nvmlInit`` succeeds and at least one device is listed. Preferred: sampling is a few
   library calls, no process.
3. ``nvidia-smi`` (:class:`NvidiaSmiProbe`): the executable runs and lists at least one GPU
   through ``--query-gpu ... --format=csv``. The fallback where the binding cannot load.
4. Otherwise :class:`NoGpuFound`, whose message lists each attempt and why it failed
   ("NVML: libnvidia-ml.so.1 not found ...; nvidia-smi: 'nvidia-smi' not found on PATH") and
   tells the user to install the driver, check ``nvidia-smi``, or pass ``--simulate``.

The chosen probe's ``detect()`` gives the :class:`GpuInfo` list sent in ``hello``; its
``sample()`` gives the :class:`GpuSample` list sent with every heartbeat. Probes block: call
them from a thread (``asyncio.to_thread``) in async code, and ``close()`` them on shutdown.
Errors: :class:`GpuProbeError` (a probe failed) and its subclass :class:`NoGpuFound`.

The implementation lives in :mod:`peergpu.agent.gpu`, one module per probe; import from here.
"""

from __future__ import annotations

from peergpu.agent.gpu.base import GpuInfo, GpuProbe, GpuProbeError, GpuSample, NoGpuFound
from peergpu.agent.gpu.detect import detect_probe
from peergpu.agent.gpu.nvidia_smi import NvidiaSmiProbe
from peergpu.agent.gpu.nvml import NvmlApi, NvmlProbe, format_cuda_version
from peergpu.agent.gpu.profiles import PROFILES, GpuProfile, find_profile
from peergpu.agent.gpu.simulated import SimulatedProbe, parse_spec

__all__ = [
    "PROFILES",
    "GpuInfo",
    "GpuProbe",
    "GpuProbeError",
    "GpuProfile",
    "GpuSample",
    "NoGpuFound",
    "NvidiaSmiProbe",
    "NvmlApi",
    "NvmlProbe",
    "SimulatedProbe",
    "detect_probe",
    "find_profile",
    "format_cuda_version",
    "parse_spec",
]

"""Known GPU models, for ``--simulate`` and for estimates that need a GPU's speed.

Memory is what ``nvidia-smi`` reports as ``memory.total`` (MiB), which is a little less than the
marketing figure on some cards. ``tflops_fp16`` is dense FP16 tensor-core throughput with FP32
accumulate, without sparsity, from NVIDIA's data sheets (SXM variants where there are several),
so figures are comparable across cards. ``power_limit_watts`` is the default board power limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class GpuProfile:
    name: str  # the short name used in --simulate specs, e.g. "H100"
    model: str  # the name NVML / nvidia-smi report, e.g. "NVIDIA H100 80GB HBM3"
    memory_total_mib: int
    compute_capability: str
    tflops_fp16: float
    power_limit_watts: float = 300.0


_ALL = (
    GpuProfile("H200", "NVIDIA H200", 143771, "9.0", 989.4, 700.0),
    GpuProfile("H100", "NVIDIA H100 80GB HBM3", 81559, "9.0", 989.4, 700.0),
    GpuProfile("A100", "NVIDIA A100-SXM4-80GB", 81920, "8.0", 312.0, 400.0),
    GpuProfile("A100-40GB", "NVIDIA A100-SXM4-40GB", 40960, "8.0", 312.0, 400.0),
    GpuProfile("L40S", "NVIDIA L40S", 46068, "8.9", 362.1, 350.0),
    GpuProfile("L4", "NVIDIA L4", 23034, "8.9", 121.0, 72.0),
    GpuProfile("A10", "NVIDIA A10", 23028, "8.6", 125.0, 150.0),
    GpuProfile("A6000", "NVIDIA RTX A6000", 49140, "8.6", 154.8, 300.0),
    GpuProfile("RTX4090", "NVIDIA GeForce RTX 4090", 24564, "8.9", 165.2, 450.0),
    GpuProfile("RTX3090", "NVIDIA GeForce RTX 3090", 24576, "8.6", 35.6, 350.0),
    GpuProfile("T4", "Tesla T4", 15360, "7.5", 65.0, 70.0),
    GpuProfile("V100", "Tesla V100-SXM2-16GB", 16160, "7.0", 125.0, 300.0),
)

#: Profiles by their upper-case short name.
PROFILES: Mapping[str, GpuProfile] = MappingProxyType({p.name: p for p in _ALL})

#: Other spellings people write, after upper-casing and removing spaces and underscores.
ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "H100-80GB": "H100",
        "A100-80GB": "A100",
        "RTXA6000": "A6000",
        "V100-16GB": "V100",
        "4090": "RTX4090",
        "3090": "RTX3090",
    }
)


def find_profile(name: str) -> GpuProfile | None:
    """The profile for a short name, case-insensitively, ignoring spaces and underscores."""
    key = "".join(name.split()).replace("_", "").upper()
    return PROFILES.get(ALIASES.get(key, key))

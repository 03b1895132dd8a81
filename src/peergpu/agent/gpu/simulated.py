"""A probe that invents GPUs from a spec such as ``"H100x2,RTX4090"``: for the demo, the tests
and trying the agent on a machine without GPUs."""

from __future__ import annotations

import hashlib
import random
import re
import socket
from collections.abc import Iterable
from typing import ClassVar

from peergpu.agent.gpu.base import GpuInfo, GpuProbe, GpuSample
from peergpu.agent.gpu.profiles import PROFILES, GpuProfile, find_profile

MAX_COUNT = 16  # per entry
MAX_GPUS = 64  # per host: what a hello message carries

_COUNTED = re.compile(r"^(?P<name>.*\S)\s*[x*]\s*(?P<count>\d+)$", re.IGNORECASE)


class SimulatedProbe(GpuProbe):
    """GPUs from a spec: comma-separated entries ``NAME`` or ``NAMExCOUNT`` (``x`` or ``*``,
    case-insensitive, whitespace allowed), e.g. ``"H100x2, rtx4090"``; COUNT is 1..16. Names
    are the keys of ``PROFILES`` (plus a few aliases such as ``A100-80GB``).

    UUIDs are ``GPU-sim-<hash>-<index>``, where the hash is of ``seed`` or, without one, of the
    host name: stable across restarts, different between hosts. Give each simulated agent on one
    machine its own seed (e.g. its host id) so their GPUs do not collide.

    Samples are plausible and reproducible for a given seed: idle GPUs show 0-5 % utilization
    at 35-45 °C; GPUs named in :meth:`set_busy` show 85-100 % and most of their memory in use.
    """

    name: ClassVar[str] = "simulated"
    driver_version: ClassVar[str] = "550.54.15"
    cuda_version: ClassVar[str] = "12.4"

    def __init__(self, spec: str, *, seed: str = "") -> None:
        self.spec = spec
        self._profiles = parse_spec(spec)
        self._host_hash = hashlib.sha256((seed or socket.gethostname()).encode()).hexdigest()[:12]
        self._busy: frozenset[int] = frozenset()
        self._ticks = 0

    @property
    def profiles(self) -> list[GpuProfile]:
        """The profile of each simulated GPU, by index."""
        return list(self._profiles)

    def detect(self) -> list[GpuInfo]:
        return [
            GpuInfo(
                index=index,
                uuid=f"GPU-sim-{self._host_hash}-{index}",
                model=profile.model,
                memory_total_mib=profile.memory_total_mib,
                driver_version=self.driver_version,
                cuda_version=self.cuda_version,
                compute_capability=profile.compute_capability,
            )
            for index, profile in enumerate(self._profiles)
        ]

    def sample(self) -> list[GpuSample]:
        self._ticks += 1
        return [self._sample_one(index, profile) for index, profile in enumerate(self._profiles)]

    def set_busy(self, indices: Iterable[int]) -> None:
        """Make exactly these GPUs look busy from the next sample on (an empty set: all idle).

        Raises ``ValueError`` for an index that does not exist.
        """
        busy = frozenset(indices)
        unknown = sorted(i for i in busy if not 0 <= i < len(self._profiles))
        if unknown:
            raise ValueError(
                f"no simulated GPU with index {unknown}; this probe has indices "
                f"0..{len(self._profiles) - 1}"
            )
        self._busy = busy

    def _sample_one(self, index: int, profile: GpuProfile) -> GpuSample:
        # Seeded per host, GPU and tick: two probes with the same seed report the same figures.
        rng = random.Random(f"{self._host_hash}:{index}:{self._ticks}")
        memory = profile.memory_total_mib
        power = profile.power_limit_watts
        if index in self._busy:
            return GpuSample(
                index=index,
                utilization_percent=round(rng.uniform(85.0, 100.0), 1),
                memory_used_mib=int(memory * rng.uniform(0.70, 0.95)),
                temperature_c=round(rng.uniform(65.0, 80.0), 1),
                power_watts=round(power * rng.uniform(0.70, 0.95), 1),
            )
        return GpuSample(
            index=index,
            utilization_percent=round(rng.uniform(0.0, 5.0), 1),
            memory_used_mib=rng.randint(1, 600),
            temperature_c=round(rng.uniform(35.0, 45.0), 1),
            power_watts=round(power * rng.uniform(0.08, 0.15), 1),
        )


def parse_spec(spec: str) -> list[GpuProfile]:
    """The profile of each GPU a ``--simulate`` spec names, in order; ``ValueError`` if the spec
    is empty, names an unknown model, asks for a count outside 1..16 or for more than 64 GPUs."""
    entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    if not entries:
        raise ValueError(_spec_error(f"empty --simulate spec {spec!r}"))
    profiles: list[GpuProfile] = []
    for entry in entries:
        profile, count = _parse_entry(entry)
        profiles.extend([profile] * count)
    if len(profiles) > MAX_GPUS:
        raise ValueError(
            _spec_error(f"--simulate spec {spec!r} names {len(profiles)} GPUs; at most {MAX_GPUS}")
        )
    return profiles


def _parse_entry(entry: str) -> tuple[GpuProfile, int]:
    # The whole entry first: "RTX4090" would otherwise read as "RT" times 4090.
    profile = find_profile(entry)
    if profile is not None:
        return profile, 1
    match = _COUNTED.match(entry)
    name, count = (match["name"], int(match["count"])) if match else (entry, 1)
    profile = find_profile(name)
    if profile is None:
        raise ValueError(_spec_error(f"unknown GPU {name!r} in --simulate entry {entry!r}"))
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(
            _spec_error(f"bad count {count} in --simulate entry {entry!r}: use 1..{MAX_COUNT}")
        )
    return profile, count


def _spec_error(problem: str) -> str:
    known = ", ".join(PROFILES)
    return f'{problem}. Write entries like "H100x2,RTX4090"; known profiles: {known}'

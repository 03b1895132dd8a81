"""A probe that runs ``nvidia-smi --query-gpu=... --format=csv``: the fallback where the NVML
binding cannot load (a container with the tool but not the library path, an odd driver)."""

from __future__ import annotations

import csv
import re
import subprocess
from collections.abc import Sequence
from typing import ClassVar

from peergpu.agent.gpu.base import GpuInfo, GpuProbe, GpuProbeError, GpuSample, clamp_percent

INFO_FIELDS = ("index", "uuid", "name", "memory.total", "driver_version", "compute_cap")
SAMPLE_FIELDS = ("index", "utilization.gpu", "memory.used", "temperature.gpu", "power.draw")

_CUDA_VERSION = re.compile(r"CUDA Version:\s*(\d+\.\d+)")
_NO_DEVICES = "No devices were found"
_OUTPUT_EXCERPT = 300


class NvidiaSmiProbe(GpuProbe):
    """GPUs through the ``nvidia-smi`` command; every call starts a process (~0.1-1 s).

    - Values nvidia-smi cannot give (``[N/A]``, ``[Not Supported]``, ``[Unknown Error]``, any
      value in brackets) become ``None`` for temperature, power, compute capability and the
      driver version (``""``), and 0 for utilization and memory used.
    - Drivers older than R510 do not know the ``compute_cap`` field: ``detect`` then queries
      without it (and remembers), leaving ``compute_capability`` ``None``.
    - The CUDA version comes from the banner of a plain ``nvidia-smi`` run (``CUDA Version:
      12.4``); it is ``None`` if that run fails or prints none.
    - "No devices were found" is an empty list; a missing executable, a timeout, any other
      non-zero exit or output that does not parse raises :class:`GpuProbeError`.
    """

    name: ClassVar[str] = "nvidia-smi"

    def __init__(self, executable: str = "nvidia-smi", timeout: float = 10.0) -> None:
        self.executable = executable
        self.timeout = timeout
        self._query_compute_cap = True

    def detect(self) -> list[GpuInfo]:
        rows = self._query_info()
        cuda_version = self._cuda_version()
        return sorted((self._parse_info(row, cuda_version) for row in rows), key=_index)

    def sample(self) -> list[GpuSample]:
        rows = self._query(SAMPLE_FIELDS)
        return sorted((self._parse_sample(row) for row in rows), key=_index)

    # ---------------------------------------------------------------- running nvidia-smi

    def _query_info(self) -> list[list[str]]:
        if self._query_compute_cap:
            try:
                return self._query(INFO_FIELDS)
            except _ExitedNonZero:
                # Most likely 'Field "compute_cap" is not a valid field to query.' (before
                # R510). Ask without it; if that fails too, its error is the one to report.
                pass
        rows = self._query(INFO_FIELDS[:-1])
        self._query_compute_cap = False
        return [[*row, ""] for row in rows]

    def _query(self, fields: Sequence[str]) -> list[list[str]]:
        output = self._run(f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits")
        rows = [
            [value.strip() for value in row]
            for row in csv.reader(output.splitlines(), skipinitialspace=True)
            if row and any(value.strip() for value in row)
        ]
        for row in rows:
            if len(row) != len(fields):
                raise GpuProbeError(
                    f"nvidia-smi: expected {len(fields)} values ({', '.join(fields)}) per line, "
                    f"got {_excerpt(output)!r}"
                )
        return rows

    def _cuda_version(self) -> str | None:
        try:
            banner = self._run()
        except GpuProbeError:
            return None
        match = _CUDA_VERSION.search(banner)
        return match[1] if match else None

    def _run(self, *args: str) -> str:
        command = [self.executable, *args]
        try:
            completed = subprocess.run(
                command,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise GpuProbeError(f"nvidia-smi: {self.executable!r} not found on PATH") from exc
        except PermissionError as exc:
            raise GpuProbeError(f"nvidia-smi: {self.executable!r} is not executable") from exc
        except OSError as exc:
            raise GpuProbeError(f"nvidia-smi: cannot run {self.executable!r}: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise GpuProbeError(
                f"nvidia-smi: no answer within {self.timeout:g} s (is the driver hung?)"
            ) from exc
        if completed.returncode != 0:
            said = (completed.stdout + completed.stderr).strip()
            if _NO_DEVICES in said:
                return ""
            raise _ExitedNonZero(
                f"nvidia-smi: exited with status {completed.returncode}: "
                f"{_excerpt(said) or '(no output)'}"
            )
        return completed.stdout

    # ---------------------------------------------------------------- parsing

    def _parse_info(self, row: list[str], cuda_version: str | None) -> GpuInfo:
        index, uuid, model, memory_total, driver, compute_cap = row
        parsed_index = _int(index)
        parsed_memory = _int(memory_total)
        if parsed_index is None or parsed_memory is None or _missing(uuid) or _missing(model):
            raise GpuProbeError(f"nvidia-smi: cannot read GPU line {', '.join(row)!r}")
        return GpuInfo(
            index=parsed_index,
            uuid=uuid,
            model=model,
            memory_total_mib=parsed_memory,
            driver_version="" if _missing(driver) else driver,
            cuda_version=cuda_version,
            compute_capability=None if _missing(compute_cap) else compute_cap,
        )

    def _parse_sample(self, row: list[str]) -> GpuSample:
        index, utilization, memory_used, temperature, power = row
        parsed_index = _int(index)
        if parsed_index is None:
            raise GpuProbeError(f"nvidia-smi: cannot read GPU line {', '.join(row)!r}")
        parsed_utilization = _float(utilization)
        return GpuSample(
            index=parsed_index,
            utilization_percent=clamp_percent(parsed_utilization or 0.0),
            memory_used_mib=_int(memory_used) or 0,
            temperature_c=_float(temperature),
            power_watts=_float(power),
        )


class _ExitedNonZero(GpuProbeError):
    """nvidia-smi ran and failed; the one failure worth retrying with fewer fields."""


def _index(item: GpuInfo | GpuSample) -> int:
    return item.index


def _missing(value: str) -> bool:
    """nvidia-smi's ways of saying "no value": ``[N/A]``, ``[Not Supported]``, ``N/A``..."""
    return not value or value.startswith("[") or value.upper() == "N/A"


def _float(value: str) -> float | None:
    """A number, or ``None`` where nvidia-smi gave none; raises on anything else."""
    if _missing(value):
        return None
    try:
        return float(value)
    except ValueError:
        raise GpuProbeError(f"nvidia-smi: expected a number, got {value!r}") from None


def _int(value: str) -> int | None:
    number = _float(value)
    return None if number is None else round(number)


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _OUTPUT_EXCERPT else text[:_OUTPUT_EXCERPT] + "..."

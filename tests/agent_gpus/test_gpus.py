"""GPU detection without a GPU: the simulated probe as it is, nvidia-smi through a fake executable
run as a real process, and NVML through an injected stand-in for ``pynvml``."""

from __future__ import annotations

import json
import re
import shlex
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from peergpu.agent.gpus import (
    PROFILES,
    GpuInfo,
    GpuProbeError,
    GpuSample,
    NoGpuFound,
    NvidiaSmiProbe,
    NvmlProbe,
    SimulatedProbe,
    detect_probe,
    find_profile,
    format_cuda_version,
)
from tests.agent_gpus.fake_nvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    FakeDevice,
    FakeNvml,
    OldFakeNvml,
)

FAKE_SMI = Path(__file__).with_name("testing_fake_nvidia_smi.py")


@dataclass
class FakeSmi:
    executable: Path
    log: Path

    @property
    def path(self) -> str:
        return str(self.executable)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


MakeFakeSmi = Callable[[str], FakeSmi]


@pytest.fixture
def fake_smi(tmp_path: Path) -> MakeFakeSmi:
    """Writes an executable ``nvidia-smi`` acting out one scenario of testing_fake_nvidia_smi.py."""

    def make(scenario: str) -> FakeSmi:
        folder = tmp_path / scenario
        folder.mkdir()
        executable, log = folder / "nvidia-smi", folder / "calls.jsonl"
        command = shlex.join([sys.executable, str(FAKE_SMI), scenario, str(log)])
        executable.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        executable.chmod(executable.stat().st_mode | stat.S_IXUSR)
        return FakeSmi(executable, log)

    return make


def failing_nvml() -> FakeNvml:
    return FakeNvml([], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)


# ---------------------------------------------------------------- simulated


def test_simulated_spec_lists_gpus_in_order() -> None:
    gpus = SimulatedProbe("H100x2,RTX4090", seed="host-1").detect()

    assert [g.index for g in gpus] == [0, 1, 2]
    assert [g.model for g in gpus] == [
        "NVIDIA H100 80GB HBM3",
        "NVIDIA H100 80GB HBM3",
        "NVIDIA GeForce RTX 4090",
    ]
    assert [g.memory_total_mib for g in gpus] == [81559, 81559, 24564]
    assert [g.compute_capability for g in gpus] == ["9.0", "9.0", "8.9"]
    assert all(g.cuda_version == "12.4" and g.driver_version for g in gpus)


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        (" h100 X 2 , rtx4090 ", ["H100", "H100", "RTX4090"]),
        ("A100-40GBx4", ["A100-40GB"] * 4),
        ("RTX4090x2", ["RTX4090", "RTX4090"]),
        ("l4*3,t4", ["L4", "L4", "L4", "T4"]),
        ("a100-80gb, RTX A6000", ["A100", "A6000"]),
        ("H100x2,", ["H100", "H100"]),
        ("H100x16", ["H100"] * 16),
    ],
)
def test_simulated_spec_is_forgiving_about_spelling(spec: str, names: list[str]) -> None:
    assert [p.name for p in SimulatedProbe(spec, seed="s").profiles] == names


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("FOO", "unknown GPU 'FOO'"),
        ("H100x2,B200", "unknown GPU 'B200'"),
        ("H100x0", "bad count 0"),
        ("H100x99", "bad count 99"),
        ("", "empty"),
        (" , ", "empty"),
        ("H100x16," * 4 + "T4", "65 GPUs"),
    ],
)
def test_bad_simulated_spec_names_the_problem_and_the_profiles(spec: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        SimulatedProbe(spec)

    message = str(caught.value)
    assert problem in message
    assert "H100x2,RTX4090" in message
    assert all(name in message for name in PROFILES)


def test_simulated_uuids_are_stable_per_seed() -> None:
    first = SimulatedProbe("H100x2", seed="host-1").detect()
    again = SimulatedProbe("H100x2", seed="host-1").detect()
    other = SimulatedProbe("H100x2", seed="host-2").detect()
    unseeded = [SimulatedProbe("T4").detect()[0].uuid for _ in range(2)]

    assert [g.uuid for g in first] == [g.uuid for g in again]
    assert {g.uuid for g in first}.isdisjoint(g.uuid for g in other)
    assert all(re.fullmatch(r"GPU-sim-[0-9a-f]{12}-\d", g.uuid) for g in first + other)
    assert first[1].uuid.endswith("-1")
    assert unseeded[0] == unseeded[1]  # seeded by the host name


def test_idle_simulated_samples_are_plausible_and_reproducible() -> None:
    probe = SimulatedProbe("H100x2,RTX4090", seed="s")
    twin = SimulatedProbe("H100x2,RTX4090", seed="s")

    samples = [probe.sample() for _ in range(5)]

    assert samples == [twin.sample() for _ in range(5)]
    for sample in (s for batch in samples for s in batch):
        assert 0.0 <= sample.utilization_percent <= 5.0
        assert 0 < sample.memory_used_mib < 1024
        assert sample.temperature_c is not None and 35.0 <= sample.temperature_c <= 45.0
        assert sample.power_watts is not None and sample.power_watts > 0
    assert [s.index for s in samples[0]] == [0, 1, 2]


def test_set_busy_makes_those_gpus_look_busy() -> None:
    probe = SimulatedProbe("H100x2,RTX4090", seed="s")

    probe.set_busy({1, 2})
    busy = probe.sample()
    probe.set_busy(set())
    idle = probe.sample()

    assert busy[0].utilization_percent <= 5.0
    for sample, gpu in zip(busy[1:], probe.detect()[1:], strict=True):
        assert sample.utilization_percent >= 85.0
        assert sample.memory_used_mib >= 0.7 * gpu.memory_total_mib
        assert sample.temperature_c is not None and sample.temperature_c >= 65.0
    assert all(s.utilization_percent <= 5.0 for s in idle)


def test_set_busy_refuses_unknown_indices() -> None:
    with pytest.raises(ValueError, match=r"0\.\.1"):
        SimulatedProbe("T4x2").set_busy({2})


def test_profiles_have_realistic_figures() -> None:
    required = {"H200", "H100", "A100", "A100-40GB", "L40S", "L4", "A10", "A6000"}
    assert required | {"RTX4090", "RTX3090", "T4", "V100"} <= set(PROFILES)
    assert (PROFILES["H100"].memory_total_mib, PROFILES["H100"].compute_capability) == (
        81559,
        "9.0",
    )
    assert (PROFILES["RTX4090"].memory_total_mib, PROFILES["RTX4090"].compute_capability) == (
        24564,
        "8.9",
    )
    assert (PROFILES["A100"].model, PROFILES["A100"].memory_total_mib) == (
        "NVIDIA A100-SXM4-80GB",
        81920,
    )
    assert (PROFILES["T4"].memory_total_mib, PROFILES["T4"].compute_capability) == (15360, "7.5")
    for profile in PROFILES.values():
        assert 8_000 < profile.memory_total_mib < 200_000
        assert re.fullmatch(r"\d+\.\d", profile.compute_capability)
        assert 10 < profile.tflops_fp16 < 2_000
    assert PROFILES["H100"].tflops_fp16 > PROFILES["A100"].tflops_fp16 > PROFILES["T4"].tflops_fp16
    assert find_profile(" rtx 4090 ") is PROFILES["RTX4090"] and find_profile("B200") is None


# ---------------------------------------------------------------- nvidia-smi


def test_nvidia_smi_detects_gpus(fake_smi: MakeFakeSmi) -> None:
    smi = fake_smi("ok")

    gpus = NvidiaSmiProbe(smi.path).detect()

    assert gpus == [
        GpuInfo(
            index=0,
            uuid="GPU-5c1a3f3e-8f2b-6d4e-1a2b-3c4d5e6f7a8b",
            model="NVIDIA H100 80GB HBM3",
            memory_total_mib=81559,
            driver_version="550.54.15",
            cuda_version="12.4",
            compute_capability="9.0",
        ),
        GpuInfo(
            index=1,
            uuid="GPU-0f9e8d7c-6b5a-4938-2716-05f4e3d2c1b0",
            model="NVIDIA H100 80GB HBM3",
            memory_total_mib=81559,
            driver_version="550.54.15",
            cuda_version="12.4",
            compute_capability="9.0",
        ),
    ]
    assert smi.calls() == [
        [
            "--query-gpu=index,uuid,name,memory.total,driver_version,compute_cap",
            "--format=csv,noheader,nounits",
        ],
        [],
    ]


def test_nvidia_smi_samples_and_reads_missing_values_as_none(fake_smi: MakeFakeSmi) -> None:
    smi = fake_smi("ok")

    samples = NvidiaSmiProbe(smi.path).sample()

    assert samples == [
        GpuSample(
            index=0,
            utilization_percent=97.0,
            memory_used_mib=61234,
            temperature_c=64.0,
            power_watts=512.37,
        ),
        GpuSample(
            index=1,
            utilization_percent=0.0,
            memory_used_mib=1,
            temperature_c=None,
            power_watts=None,
        ),
    ]
    assert smi.calls() == [
        [
            "--query-gpu=index,utilization.gpu,memory.used,temperature.gpu,power.draw",
            "--format=csv,noheader,nounits",
        ]
    ]


def test_nvidia_smi_on_an_old_driver_queries_without_compute_cap(fake_smi: MakeFakeSmi) -> None:
    smi = fake_smi("old-driver")
    probe = NvidiaSmiProbe(smi.path)

    gpus = probe.detect()
    again = probe.detect()
    samples = probe.sample()

    assert gpus == again
    assert [(g.model, g.compute_capability, g.cuda_version, g.driver_version) for g in gpus] == [
        ("Tesla T4", None, "11.4", "470.182.03")
    ]
    assert samples[0].power_watts is None and samples[0].temperature_c == 41.0
    queries = [call[0] for call in smi.calls() if call]
    compute_cap_queries = [q for q in queries if "compute_cap" in q]
    assert len(compute_cap_queries) == 1  # tried once, then remembered


def test_nvidia_smi_without_cuda_in_its_banner_leaves_cuda_version_unknown(
    fake_smi: MakeFakeSmi,
) -> None:
    gpus = NvidiaSmiProbe(fake_smi("no-cuda-banner").path).detect()

    assert [g.cuda_version for g in gpus] == [None, None]
    assert [g.compute_capability for g in gpus] == ["9.0", "9.0"]


def test_nvidia_smi_with_no_devices_finds_none(fake_smi: MakeFakeSmi) -> None:
    probe = NvidiaSmiProbe(fake_smi("no-devices").path)

    assert probe.detect() == []
    assert probe.sample() == []


@pytest.mark.parametrize(
    ("scenario", "method", "expected"),
    [
        ("failing", "detect", "exited with status 9: NVIDIA-SMI has failed because it couldn't"),
        ("failing", "sample", "exited with status 9"),
        ("garbage", "detect", "expected 6 values"),
        ("garbage", "sample", "expected 5 values"),
        ("bad-number", "sample", "expected a number, got 'lots'"),
    ],
)
def test_nvidia_smi_failures_are_explained(
    fake_smi: MakeFakeSmi, scenario: str, method: str, expected: str
) -> None:
    probe = NvidiaSmiProbe(fake_smi(scenario).path)

    with pytest.raises(GpuProbeError, match=re.escape(expected)):
        getattr(probe, method)()


def test_nvidia_smi_missing_executable(tmp_path: Path) -> None:
    missing = str(tmp_path / "nvidia-smi")

    with pytest.raises(GpuProbeError, match="not found on PATH"):
        NvidiaSmiProbe(missing).detect()


def test_nvidia_smi_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\n")

    with pytest.raises(GpuProbeError, match="not executable"):
        NvidiaSmiProbe(str(script)).sample()


def test_nvidia_smi_that_hangs_times_out(fake_smi: MakeFakeSmi) -> None:
    probe = NvidiaSmiProbe(fake_smi("hang").path, timeout=0.5)

    with pytest.raises(GpuProbeError, match=r"no answer within 0\.5 s"):
        probe.sample()


# ---------------------------------------------------------------- NVML


def rtx4090() -> FakeDevice:
    return FakeDevice(
        uuid="GPU-2",
        name="NVIDIA GeForce RTX 4090",
        memory_total_mib=24564,
        memory_used_mib=2,
        compute_capability=(8, 9),
        utilization=3,
        temperature=38,
        power_milliwatts=21500,
    )


@pytest.mark.parametrize("bytes_strings", [False, True], ids=["str", "bytes"])
def test_nvml_maps_fields(bytes_strings: bool) -> None:
    nvml = FakeNvml(
        [FakeDevice(), rtx4090()],
        bytes_strings=bytes_strings,
    )

    with NvmlProbe(nvml=nvml) as probe:
        gpus = probe.detect()
        samples = probe.sample()

    assert gpus == [
        GpuInfo(
            index=0,
            uuid="GPU-5c1a3f3e-8f2b-6d4e-1a2b-3c4d5e6f7a8b",
            model="NVIDIA H100 80GB HBM3",
            memory_total_mib=81559,
            driver_version="550.54.15",
            cuda_version="12.4",
            compute_capability="9.0",
        ),
        GpuInfo(
            index=1,
            uuid="GPU-2",
            model="NVIDIA GeForce RTX 4090",
            memory_total_mib=24564,
            driver_version="550.54.15",
            cuda_version="12.4",
            compute_capability="8.9",
        ),
    ]
    assert samples == [
        GpuSample(
            index=0,
            utilization_percent=97.0,
            memory_used_mib=61234,
            temperature_c=64.0,
            power_watts=512.37,
        ),
        GpuSample(
            index=1,
            utilization_percent=3.0,
            memory_used_mib=2,
            temperature_c=38.0,
            power_watts=21.5,
        ),
    ]


def test_nvml_fields_a_gpu_does_not_support_become_none() -> None:
    unsupported = dict.fromkeys(
        ["temperature", "power_milliwatts", "compute_capability", "utilization"],
        NVML_ERROR_NOT_SUPPORTED,
    )
    nvml = FakeNvml(
        [FakeDevice(errors=unsupported)],
        system_errors={
            "nvmlSystemGetDriverVersion": NVML_ERROR_NOT_SUPPORTED,
            "nvmlSystemGetCudaDriverVersion_v2": NVML_ERROR_NOT_SUPPORTED,
        },
    )
    probe = NvmlProbe(nvml=nvml)

    [gpu] = probe.detect()
    [sample] = probe.sample()

    assert (gpu.driver_version, gpu.cuda_version, gpu.compute_capability) == ("", None, None)
    assert (gpu.uuid, gpu.memory_total_mib) == ("GPU-5c1a3f3e-8f2b-6d4e-1a2b-3c4d5e6f7a8b", 81559)
    assert sample == GpuSample(
        index=0,
        utilization_percent=0.0,
        memory_used_mib=61234,
        temperature_c=None,
        power_watts=None,
    )


@pytest.mark.parametrize(
    ("field", "method"),
    [("uuid", "detect"), ("memory", "detect"), ("utilization", "sample"), ("memory", "sample")],
)
def test_nvml_lost_gpu_is_an_error(field: str, method: str) -> None:
    probe = NvmlProbe(nvml=FakeNvml([FakeDevice(errors={field: NVML_ERROR_GPU_IS_LOST})]))

    with pytest.raises(GpuProbeError, match="NVML: GPU is lost"):
        getattr(probe, method)()


@pytest.mark.parametrize(
    ("binding", "version", "expected"),
    [(FakeNvml, 12040, "12.4"), (FakeNvml, 11080, "11.8"), (OldFakeNvml, 12020, "12.2")],
)
def test_nvml_cuda_version(binding: type[FakeNvml], version: int, expected: str) -> None:
    nvml = binding([FakeDevice()], cuda_version=version)

    [gpu] = NvmlProbe(nvml=nvml).detect()

    assert gpu.cuda_version == expected
    newer_used = nvml.calls["nvmlSystemGetCudaDriverVersion_v2"] == 1
    assert newer_used is (binding is FakeNvml)


def test_format_cuda_version() -> None:
    assert format_cuda_version(12040) == "12.4"
    assert format_cuda_version(10010) == "10.1"
    assert format_cuda_version(0) is None and format_cuda_version(None) is None


def test_nvml_initialises_once_and_shuts_down_once() -> None:
    nvml = FakeNvml([FakeDevice(), FakeDevice(uuid="GPU-2")])
    probe = NvmlProbe(nvml=nvml)

    probe.detect()
    for _ in range(3):
        probe.sample()
    probe.close()
    probe.close()

    assert nvml.calls["nvmlInit"] == 1 and nvml.calls["nvmlShutdown"] == 1
    assert nvml.calls["nvmlDeviceGetHandleByIndex"] == 2  # handles looked up once
    with pytest.raises(GpuProbeError, match="closed"):
        probe.sample()


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (NVML_ERROR_LIBRARY_NOT_FOUND, "NVML: libnvidia-ml.so.1 not found"),
        (NVML_ERROR_DRIVER_NOT_LOADED, "NVML: the NVIDIA kernel driver is not loaded"),
    ],
)
def test_nvml_init_failure_is_explained(code: int, expected: str) -> None:
    with pytest.raises(GpuProbeError, match=re.escape(expected)):
        NvmlProbe(nvml=FakeNvml([], init_error=code))


def test_real_nvml_without_the_driver_library_is_explained() -> None:
    pytest.importorskip("pynvml")
    try:
        NvmlProbe().close()
    except GpuProbeError as exc:
        assert "NVML:" in str(exc)
    else:
        pytest.skip("this machine has a working NVIDIA driver")


def test_missing_binding_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail

    with pytest.raises(GpuProbeError, match="pip install nvidia-ml-py"):
        NvmlProbe()


# ---------------------------------------------------------------- detect_probe


def test_detect_probe_simulates_when_asked() -> None:
    probe = detect_probe(simulate="H100x2,RTX4090", nvml=failing_nvml())

    assert isinstance(probe, SimulatedProbe) and probe.name == "simulated"
    assert len(probe.detect()) == 3
    with pytest.raises(ValueError, match="known profiles"):
        detect_probe(simulate="B200x2")


@pytest.mark.parametrize("simulate", [None, "", "  "])
def test_detect_probe_without_a_spec_probes_real_gpus(
    fake_smi: MakeFakeSmi, simulate: str | None
) -> None:
    probe = detect_probe(simulate=simulate, nvidia_smi=fake_smi("ok").path, nvml=failing_nvml())

    assert isinstance(probe, NvidiaSmiProbe)


def test_detect_probe_prefers_nvml(fake_smi: MakeFakeSmi) -> None:
    smi = fake_smi("ok")

    probe = detect_probe(nvidia_smi=smi.path, nvml=FakeNvml([FakeDevice()]))

    assert isinstance(probe, NvmlProbe) and probe.name == "nvml"
    assert smi.calls() == []


def test_detect_probe_falls_back_to_nvidia_smi(fake_smi: MakeFakeSmi) -> None:
    probe = detect_probe(nvidia_smi=fake_smi("ok").path, nvml=failing_nvml())

    assert isinstance(probe, NvidiaSmiProbe) and probe.name == "nvidia-smi"
    assert [g.model for g in probe.detect()] == ["NVIDIA H100 80GB HBM3"] * 2


def test_detect_probe_closes_an_nvml_that_sees_no_gpu(fake_smi: MakeFakeSmi) -> None:
    nvml = FakeNvml([])

    probe = detect_probe(nvidia_smi=fake_smi("ok").path, nvml=nvml)

    assert isinstance(probe, NvidiaSmiProbe)
    assert nvml.calls["nvmlShutdown"] == 1


def test_detect_probe_with_the_real_binding_falls_back_to_nvidia_smi(
    fake_smi: MakeFakeSmi,
) -> None:
    """On a machine without the NVIDIA driver library (like CI), NVML fails for real."""
    try:
        NvmlProbe().close()
    except GpuProbeError:
        pass
    else:
        pytest.skip("this machine has a working NVIDIA driver")

    probe = detect_probe(nvidia_smi=fake_smi("ok").path)

    assert isinstance(probe, NvidiaSmiProbe)


def test_no_gpu_found_says_what_was_tried_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NoGpuFound) as caught:
        detect_probe(nvidia_smi=str(tmp_path / "nvidia-smi"), nvml=failing_nvml())

    message = str(caught.value)
    assert "NVML: libnvidia-ml.so.1 not found" in message
    assert "nvidia-smi: " in message and "not found on PATH" in message
    assert "--simulate 'H100x2,RTX4090'" in message
    assert "Install the NVIDIA driver" in message
    assert set(caught.value.attempts) == {"NVML", "nvidia-smi"}
    assert isinstance(caught.value, RuntimeError)


@pytest.mark.parametrize(
    ("scenario", "reason"),
    [
        ("failing", "couldn't communicate with the NVIDIA driver"),
        ("garbage", "expected 6 values"),
        ("no-devices", "no GPUs found"),
    ],
)
def test_no_gpu_found_when_nvidia_smi_misbehaves(
    fake_smi: MakeFakeSmi, scenario: str, reason: str
) -> None:
    with pytest.raises(NoGpuFound) as caught:
        detect_probe(nvidia_smi=fake_smi(scenario).path, nvml=failing_nvml())

    assert reason in caught.value.attempts["nvidia-smi"]
    assert reason in str(caught.value)


def test_detect_probe_with_nothing_on_this_machine(tmp_path: Path) -> None:
    """The real binding and no nvidia-smi: the error a user without a driver sees."""
    try:
        NvmlProbe().close()
    except GpuProbeError:
        pass
    else:
        pytest.skip("this machine has a working NVIDIA driver")

    with pytest.raises(NoGpuFound, match="--simulate") as caught:
        detect_probe(nvidia_smi=str(tmp_path / "no-such-nvidia-smi"))

    assert set(caught.value.attempts) == {"NVML", "nvidia-smi"}

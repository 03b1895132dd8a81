"""The docker runner: the ``docker run`` command line (the whole policy) and, where a Docker
engine exists, a real container."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peergpu.agent.runners import (
    DockerRunner,
    FailureReason,
    ResourceLimits,
    RunnerError,
    RunSpec,
    build_docker_command,
)
from peergpu.agent.runners.docker import container_name_for, validate_image

MiB = 1024**2
DIGEST = "sha256:" + "ab" * 32


def spec_for(workdir: Path = Path("/var/lib/peergpu/jobs/j1"), **changes: object) -> RunSpec:
    fields: dict[str, object] = {
        "job_id": "j1",
        "command": ["python", "train.py", "--epochs", "3"],
        "workdir": workdir,
        "image": "pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime",
        "limits": ResourceLimits(memory_bytes=512 * MiB, max_processes=100, cpu_seconds=60),
    }
    fields.update(changes)
    return RunSpec(**fields)  # type: ignore[arg-type]


def value_of(command: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` (the argument after each occurrence)."""
    return [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == flag]


def test_default_command_is_locked_down() -> None:
    command = build_docker_command(spec_for(), container_name="peergpu-j1")
    assert command[:3] == ["docker", "run", "--rm"]
    assert value_of(command, "--name") == ["peergpu-j1"]
    assert value_of(command, "--network") == ["none"]
    assert "--read-only" in command
    assert value_of(command, "--tmpfs") == ["/tmp:rw,nosuid,nodev"]
    assert value_of(command, "--mount") == [
        "type=bind,src=/var/lib/peergpu/jobs/j1,dst=/workspace",
        "type=bind,src=/var/lib/peergpu/jobs/j1/outputs,dst=/outputs",
    ]
    assert value_of(command, "-w") == ["/workspace"]
    assert value_of(command, "--cap-drop") == ["ALL"]
    assert value_of(command, "--security-opt") == ["no-new-privileges"]
    assert value_of(command, "--user") == ["65534:65534"]
    assert value_of(command, "--memory") == [f"{512 * MiB}b"]
    assert value_of(command, "--memory-swap") == [f"{512 * MiB}b"]
    assert value_of(command, "--pids-limit") == ["100"]
    assert set(value_of(command, "--ulimit")) == {
        "nofile=1024:1024",
        "core=0:0",
        f"fsize={10 * 1024**3}:{10 * 1024**3}",
        "cpu=60:62",
    }
    assert "--gpus" not in command and "--cpus" not in command
    assert "--privileged" not in command
    image_at = command.index("pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime")
    assert command[image_at + 1 :] == ["python", "train.py", "--epochs", "3"]
    assert all(
        arg.startswith("-") or command[i - 1].startswith("-")
        for i, arg in enumerate(command[:image_at])
        if i > 1
    )  # nothing loose before the image


def test_gpus_cpus_user_and_network() -> None:
    one = build_docker_command(spec_for(gpu_ids=("0",)), container_name="c1")
    assert value_of(one, "--gpus") == ["device=0"]
    two = build_docker_command(
        spec_for(gpu_ids=("1", "GPU-3f2a9c1e-8d4b-4c2e-9f11-0a1b2c3d4e5f")),
        container_name="c1",
        cpus=2.5,
        user="1000:1000",
    )
    assert value_of(two, "--gpus") == ['"device=1,GPU-3f2a9c1e-8d4b-4c2e-9f11-0a1b2c3d4e5f"']
    assert value_of(two, "--cpus") == ["2.5"]
    assert value_of(two, "--user") == ["1000:1000"]
    networked = build_docker_command(spec_for(network=True), container_name="c1")
    assert "--network" not in networked
    unlimited = build_docker_command(
        spec_for(limits=ResourceLimits(memory_bytes=None, max_processes=None, max_file_bytes=None)),
        container_name="c1",
    )
    assert "--memory" not in unlimited and "--pids-limit" not in unlimited


@pytest.mark.parametrize("gpu_id", ["0,1", '0"', "", "-1", "all", "GPU-", "1 2"])
def test_bad_gpu_ids_are_refused(gpu_id: str) -> None:
    with pytest.raises(RunnerError, match="GPU id"):
        build_docker_command(spec_for(gpu_ids=(gpu_id,)), container_name="c1")


def test_env_is_passed_verbatim_as_single_arguments() -> None:
    tricky = {
        "A": "spaces and 'quotes' and \"double\"",
        "B": "$(rm -rf /); `id`; $HOME",
        "C": "line1\nline2",
        "D": "",
        "PEERGPU_OUTPUT_DIR": "/elsewhere",  # reserved: the runner's value wins
    }
    command = build_docker_command(spec_for(env=tricky), container_name="c1")
    env = value_of(command, "-e")
    for name in ("A", "B", "C", "D"):
        assert f"{name}={tricky[name]}" in env
    assert "PEERGPU_OUTPUT_DIR=/outputs" in env and "PEERGPU_OUTPUT_DIR=/elsewhere" not in env
    assert "PEERGPU_JOB_ID=j1" in env and "HOME=/workspace" in env


@pytest.mark.parametrize("name", ["1A", "A-B", "A B", "", "A=B", "--privileged", "Ä"])
def test_bad_env_names_are_refused(name: str) -> None:
    with pytest.raises(RunnerError, match="environment variable"):
        build_docker_command(spec_for(env={name: "x"}), container_name="c1")


def test_nul_in_env_value_is_refused() -> None:
    with pytest.raises(RunnerError, match="NUL"):
        build_docker_command(spec_for(env={"A": "x\0y"}), container_name="c1")


@pytest.mark.parametrize(
    "image",
    [
        "-v",
        "--privileged",
        "-it",
        "",
        "ubuntu latest",
        "ubuntu;rm -rf /",
        "ubuntu\n",
        "UPPER/case",
        "ubuntu:",
        "ubuntu@sha256:short",
        "../ubuntu",
        "ubuntu:$(id)",
    ],
)
def test_bad_images_are_refused(image: str) -> None:
    with pytest.raises(RunnerError, match="image"):
        validate_image(image)
    with pytest.raises(RunnerError):
        build_docker_command(spec_for(image=image), container_name="c1")


@pytest.mark.parametrize(
    "image",
    [
        "ubuntu",
        "python:3.11-slim",
        "nvidia/cuda:12.4.1-runtime-ubuntu22.04",
        "ghcr.io/org/team/image:v1.2",
        "localhost:5000/x/y",
        f"registry.example.com:443/img@{DIGEST}",
        f"img:tag@{DIGEST}",
    ],
)
def test_good_images_are_accepted(image: str) -> None:
    assert validate_image(image) == image
    assert build_docker_command(spec_for(image=image), container_name="c1")[-5] == image


def test_other_refusals() -> None:
    with pytest.raises(RunnerError, match="needs an image"):
        build_docker_command(spec_for(image=None), container_name="c1")
    with pytest.raises(RunnerError, match="container name"):
        build_docker_command(spec_for(), container_name="-bad")
    with pytest.raises(RunnerError, match="numeric"):
        build_docker_command(spec_for(), container_name="c1", user="root")
    with pytest.raises(RunnerError, match="mount"):
        build_docker_command(spec_for(Path("/jobs/a,readonly=false")), container_name="c1")


def test_container_names_are_valid_and_distinct() -> None:
    names = {container_name_for(job_id) for job_id in ("a/b", "a_b", "a-b", "ÄÖ", "x" * 200)}
    assert len(names) == 5
    for name in names:
        assert build_docker_command(spec_for(), container_name=name)


async def test_run_refuses_before_touching_docker(tmp_path: Path) -> None:
    runner = DockerRunner(docker="/nonexistent/docker", pull=False)
    result = await runner.run(spec_for(tmp_path / "job", image=None), _ignore)
    assert result.failure_reason is FailureReason.START_FAILED
    assert "image" in result.message
    result = await runner.run(spec_for(tmp_path / "job"), _ignore)
    assert result.failure_reason is FailureReason.START_FAILED
    assert "/nonexistent/docker" in result.message
    assert (tmp_path / "job" / "outputs").is_dir()


# ---------------------------------------------------------------- DockerRunner.run, fake engine

FAKE_DOCKER = """\
import os, signal, subprocess, sys, time
VALUE_FLAGS = {"--name", "--log-driver", "--gpus", "--memory", "--memory-swap", "--cpus",
               "--pids-limit", "--ulimit", "--network", "--tmpfs", "--mount", "-w", "--cap-drop",
               "--security-opt", "--user", "-e"}
state = os.environ["FAKE_DOCKER_STATE"]
args = sys.argv[1:]
if args[0] == "pull":
    sys.exit(0 if "missing" not in args[-1] else 1)
if args[0] in ("stop", "kill"):
    pid = int(open(os.path.join(state, args[-1])).read())
    os.kill(pid, signal.SIGTERM if args[0] == "stop" else signal.SIGKILL)
    if args[0] == "stop":
        time.sleep(float(args[2]))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(0)
i, env, name = 1, {"PATH": os.environ["PATH"]}, None
while args[i] in VALUE_FLAGS or args[i].startswith("-"):
    if args[i] == "-e":
        key, _, value = args[i + 1].partition("=")
        env[key] = value
    if args[i] == "--name":
        name = args[i + 1]
    i += 2 if args[i] in VALUE_FLAGS else 1
if args[i] == "bad-image":
    print("docker: Error response from daemon: bad image.", file=sys.stderr)
    sys.exit(125)
child = subprocess.Popen(args[i + 1:], env=env)
open(os.path.join(state, name), "w").write(str(child.pid))
code = child.wait()
sys.exit(128 - code if code < 0 else code)
"""


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A stand-in ``docker`` client that runs the container's command as a local process."""
    state = tmp_path / "fake-docker-state"
    state.mkdir()
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(state))
    script = tmp_path / "docker"
    script.write_text(f"#!{sys.executable}\n{FAKE_DOCKER}")
    script.chmod(0o755)
    return str(script)


async def test_run_streams_output_and_reports_exit(fake_docker: str, tmp_path: Path) -> None:
    lines: list[tuple[str, str]] = []

    async def sink(stream: str, line: str) -> None:
        lines.append((stream, line))

    script = 'echo "home=$HOME out=$PEERGPU_OUTPUT_DIR"; echo oops >&2; exit 3'
    spec = spec_for(tmp_path / "job", image="busybox", command=["sh", "-c", script])
    result = await DockerRunner(docker=fake_docker).run(spec, sink)
    assert result.failure_reason is FailureReason.NONZERO_EXIT
    assert result.exit_code == 3
    assert lines == [("stdout", "home=/workspace out=/outputs"), ("stderr", "oops")]
    assert (tmp_path / "job" / "outputs").is_dir()


async def test_run_timeout_and_cancel_stop_the_container(fake_docker: str, tmp_path: Path) -> None:
    runner = DockerRunner(docker=fake_docker, kill_grace_seconds=1)
    slow = spec_for(
        tmp_path / "slow",
        image="busybox",
        command=["sleep", "30"],
        limits=ResourceLimits(wall_clock_seconds=0.5),
    )
    result = await asyncio.wait_for(runner.run(slow, _ignore), 10)
    assert result.failure_reason is FailureReason.TIMEOUT
    assert result.message == "Stopped after exceeding the 0.5 s wall-clock limit."

    cancelled = spec_for(tmp_path / "cancel", image="busybox", command=["sleep", "30"], job_id="j2")
    task = asyncio.create_task(runner.run(cancelled, _ignore))
    await asyncio.sleep(0.5)
    await runner.cancel("j2")
    result = await asyncio.wait_for(task, 10)
    assert result.failure_reason is FailureReason.CANCELLED


async def test_run_reports_docker_and_pull_failures(fake_docker: str, tmp_path: Path) -> None:
    runner = DockerRunner(docker=fake_docker)
    result = await runner.run(spec_for(tmp_path / "a", image="bad-image"), _ignore)
    assert result.failure_reason is FailureReason.START_FAILED
    assert "bad image" in result.message
    result = await runner.run(spec_for(tmp_path / "b", image="missing-image"), _ignore)
    assert result.failure_reason is FailureReason.START_FAILED
    assert "Could not pull missing-image" in result.message


async def test_run_reports_signals_like_docker_does(fake_docker: str, tmp_path: Path) -> None:
    spec = spec_for(tmp_path / "job", image="busybox", command=["sh", "-c", "kill -9 $$"])
    result = await DockerRunner(docker=fake_docker).run(spec, _ignore)
    assert result.exit_code == -9
    assert result.failure_reason is FailureReason.KILLED_BY_SIGNAL
    assert "512 MiB memory limit" in result.message


def _docker_engine_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _docker_engine_works(), reason="no Docker engine on this machine")
async def test_end_to_end_with_a_real_engine(tmp_path: Path) -> None:
    lines: list[tuple[str, str]] = []

    async def sink(stream: str, line: str) -> None:
        lines.append((stream, line))

    workdir = tmp_path / "job"
    script = "echo hello; echo oops >&2; echo result > /outputs/r.txt; touch /etc/x || echo ro"
    spec = spec_for(workdir, image="busybox:1.36", command=["sh", "-c", script], job_id="e2e")
    result = await DockerRunner().run(spec, sink)
    if result.failure_reason is FailureReason.START_FAILED and "pull" in result.message:
        pytest.skip(f"cannot pull the test image: {result.message}")
    assert result.failure_reason is None, result.message
    assert ("stdout", "hello") in lines and ("stderr", "oops") in lines
    assert ("stdout", "ro") in lines
    assert (workdir / "outputs" / "r.txt").read_text() == "result\n"

    spec = spec_for(
        workdir.with_name("slow"),
        image="busybox:1.36",
        command=["sleep", "60"],
        limits=ResourceLimits(wall_clock_seconds=1),
        job_id="e2e-timeout",
    )
    result = await DockerRunner(kill_grace_seconds=1).run(spec, sink)
    assert result.failure_reason is FailureReason.TIMEOUT


async def _ignore(stream: str, line: str) -> None:
    return None

"""The process runner against real processes: output, environment, limits, containment."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from peergpu.agent.logbatch import LogBatcher, LogLine
from peergpu.agent.runners import (
    MAX_LINE_BYTES,
    DockerRunner,
    FailureReason,
    ProcessRunner,
    ResourceLimits,
    RunResult,
    RunSpec,
    create_runner,
)
from peergpu.agent.runners.outcome import format_bytes
from peergpu.agent.runners.sandbox import sandbox_prefix

MiB = 1024**2


class Collector:
    """An OutputSink that records every line, per stream and in arrival order."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    async def __call__(self, stream: str, line: str) -> None:
        self.lines.append((stream, line))

    def of(self, stream: str) -> list[str]:
        return [line for name, line in self.lines if name == stream]


def make_spec(job_workdir: Path, command: list[str], **limits: object) -> RunSpec:
    """A spec carrying a unique marker in its environment, to find its processes afterwards."""
    marker = uuid.uuid4().hex
    return RunSpec(
        job_id=f"test-{marker[:12]}",
        command=command,
        workdir=job_workdir,
        env={"PEERGPU_TEST_MARKER": marker},
        limits=ResourceLimits(**limits),  # type: ignore[arg-type]
    )


def processes_of(spec: RunSpec) -> set[int]:
    """Live processes whose environment carries the spec's marker (scanning /proc directly)."""
    entry = f"PEERGPU_TEST_MARKER={spec.env['PEERGPU_TEST_MARKER']}".encode()
    found = set()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            environ = (pid_dir / "environ").read_bytes()
            state = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if entry in environ.split(b"\0") and state != "Z":
            found.add(int(pid_dir.name))
    return found


@pytest.fixture
async def loop_lag() -> AsyncIterator[list[float]]:
    """Measures how late the event loop wakes up (the agent must stay responsive)."""
    worst = [0.0]

    async def tick() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            worst[0] = max(worst[0], time.monotonic() - before - 0.05)

    task = asyncio.create_task(tick())
    yield worst
    task.cancel()


async def run(
    process_runner: ProcessRunner, spec: RunSpec, sink: Collector | None = None
) -> RunResult:
    return await process_runner.run(spec, sink or Collector())


# ---------------------------------------------------------------- output and environment


async def test_lines_arrive_in_order_per_stream(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    script = (
        "import sys\n"
        "for i in range(300):\n"
        "    print(f'out {i}', flush=True)\n"
        "    print(f'err {i} é', file=sys.stderr, flush=True)\n"
    )
    sink = Collector()
    result = await run(process_runner, make_spec(job_workdir, [job_python, "-c", script]), sink)
    assert result.failure_reason is None, result.message
    assert result.exit_code == 0
    assert result.message == "Exited with code 0."
    assert sink.of("stdout") == [f"out {i}" for i in range(300)]
    assert sink.of("stderr") == [f"err {i} é" for i in range(300)]
    assert result.cpu_seconds is not None
    assert result.duration_seconds < 10


async def test_nonzero_exit(process_runner: ProcessRunner, job_workdir: Path) -> None:
    result = await run(process_runner, make_spec(job_workdir, ["sh", "-c", "echo bye; exit 3"]))
    assert result.failure_reason is FailureReason.NONZERO_EXIT
    assert result.exit_code == 3
    assert result.message == "Exited with code 3."


async def test_environment_is_scrubbed(
    process_runner: ProcessRunner,
    job_workdir: Path,
    job_python: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PEERGPU_SECRET_TEST", "1")
    spec = make_spec(
        job_workdir, [job_python, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
    )
    spec = replace(spec, env={**spec.env, "JOB_SETTING": "a b $c"})
    sink = Collector()
    result = await run(process_runner, spec, sink)
    assert result.failure_reason is None, result.message
    env = json.loads(sink.of("stdout")[0])
    assert "PEERGPU_SECRET_TEST" not in env
    assert env["JOB_SETTING"] == "a b $c"
    assert env["HOME"] == str(job_workdir)
    assert env["PEERGPU_OUTPUT_DIR"] == str(job_workdir / "outputs")
    assert env["PEERGPU_JOB_ID"] == spec.job_id
    assert env["CUDA_VISIBLE_DEVICES"] == ""


async def test_outputs_land_in_outputs_dir(
    process_runner: ProcessRunner, job_workdir: Path
) -> None:
    command = ["sh", "-c", 'echo result > "$PEERGPU_OUTPUT_DIR/result.txt"']
    result = await run(process_runner, make_spec(job_workdir, command))
    assert result.failure_reason is None, result.message
    assert result.outputs_dir == job_workdir / "outputs"
    assert (result.outputs_dir / "result.txt").read_text() == "result\n"


async def test_job_runs_unprivileged(process_runner: ProcessRunner, job_workdir: Path) -> None:
    sink = Collector()
    command = ["sh", "-c", "id -u; grep -E '^(NoNewPrivs|CapEff):' /proc/self/status"]
    await run(process_runner, make_spec(job_workdir, command), sink)
    uid, *status = sink.of("stdout")
    assert int(uid) != 0 if os.geteuid() == 0 else int(uid) == os.geteuid()
    assert sorted(line.split()[1] for line in status) == ["0000000000000000", "1"]


async def test_command_not_found_is_start_failed(
    process_runner: ProcessRunner, job_workdir: Path
) -> None:
    result = await run(process_runner, make_spec(job_workdir, ["peergpu-no-such-command"]))
    assert result.failure_reason is FailureReason.START_FAILED
    assert result.exit_code is None
    assert "peergpu-no-such-command" in result.message


async def test_invalid_spec_is_start_failed(
    process_runner: ProcessRunner, job_workdir: Path
) -> None:
    spec = make_spec(job_workdir, ["true"])
    bad_env = replace(spec, env={"BAD-NAME": "x"})
    result = await run(process_runner, bad_env)
    assert result.failure_reason is FailureReason.START_FAILED
    assert "BAD-NAME" in result.message
    job_workdir.parent.mkdir(exist_ok=True)
    job_workdir.write_text("not a directory")
    result = await run(process_runner, spec)
    assert result.failure_reason is FailureReason.START_FAILED
    assert "not a directory" in result.message


async def test_unreachable_workdir_is_explained(
    process_runner: ProcessRunner, tmp_path: Path
) -> None:
    if (await process_runner.detect()).user is None:
        pytest.skip("jobs run as the agent's own user here")
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    result = await run(process_runner, make_spec(hidden / "job", ["true"]))
    assert result.failure_reason is FailureReason.START_FAILED
    assert "cannot reach" in result.message and "0700" in result.message


# ---------------------------------------------------------------- limits and containment


async def test_fork_bomb_is_contained(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str, loop_lag: list[float]
) -> None:
    bomb = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    spec = make_spec(job_workdir, [job_python, "-c", bomb], max_processes=64, wall_clock_seconds=2)
    result = await run(process_runner, spec)
    assert result.failure_reason in (FailureReason.TIMEOUT, FailureReason.PROCESS_LIMIT)
    assert result.duration_seconds < 2 + 1 + 5  # wall clock, grace, reaping by a slow init
    assert processes_of(spec) == set()
    assert loop_lag[0] < 1.0, f"the event loop stalled for {loop_lag[0]:.2f} s"


async def test_fork_bomb_that_crashes_reports_process_limit(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    bomb = "import os\nwhile True:\n    os.fork()\n"
    spec = make_spec(job_workdir, [job_python, "-c", bomb], max_processes=32, wall_clock_seconds=10)
    result = await run(process_runner, spec)
    assert result.failure_reason is FailureReason.PROCESS_LIMIT, result.message
    assert "32" in result.message
    assert processes_of(spec) == set()


async def test_memory_hog_hits_memory_limit(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n"
    spec = make_spec(job_workdir, [job_python, "-c", hog], memory_bytes=256 * MiB)
    result = await run(process_runner, spec)
    assert result.failure_reason is FailureReason.MEMORY_LIMIT, result.message
    assert "256 MiB" in result.message
    assert result.duration_seconds < 5
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes > 128 * MiB


async def test_memory_cgroup_limits_the_whole_tree(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    setup = await process_runner.detect()
    if setup.cgroups is None or setup.cgroups.memory_parent is None:
        pytest.skip("no writable memory cgroup here")
    # Two processes of 100 MiB each: both under the per-process RLIMIT_DATA, together over.
    script = (
        "import os, sys, time\n"
        "child = os.fork()\n"
        "data = bytearray(100 * 1024 * 1024)\n"
        "for i in range(0, len(data), 4096):\n"
        "    data[i] = 1\n"
        "if child == 0:\n"
        "    time.sleep(5)\n"
        "    os._exit(0)\n"
        "sys.exit(0 if os.waitpid(child, 0)[1] == 0 else 1)\n"
    )
    spec = make_spec(job_workdir, [job_python, "-c", script], memory_bytes=128 * MiB)
    result = await run(process_runner, spec)
    assert result.failure_reason is FailureReason.MEMORY_LIMIT, result.message
    assert result.message == "Killed after exceeding the 128 MiB memory limit."
    assert processes_of(spec) == set()


async def test_runaway_loop_and_its_child_are_killed_on_timeout(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    script = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
        "print(child.pid, flush=True)\n"
        "while True:\n"
        "    pass\n"
    )
    spec = make_spec(job_workdir, [job_python, "-c", script], wall_clock_seconds=1)
    sink = Collector()
    started = time.monotonic()
    result = await run(process_runner, spec, sink)
    assert time.monotonic() - started < 3
    assert result.failure_reason is FailureReason.TIMEOUT
    assert result.message == "Stopped after exceeding the 1 s wall-clock limit."
    assert processes_of(spec) == set()
    assert len(sink.of("stdout")) == 1  # the child started (its pid is in its own namespace)


async def test_cpu_time_limit(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    spec = make_spec(job_workdir, [job_python, "-c", "while True: pass"], cpu_seconds=1)
    result = await run(process_runner, spec)
    assert result.failure_reason is FailureReason.CPU_LIMIT, result.message
    assert result.duration_seconds < 5


@pytest.mark.parametrize("how", ["EFBIG", "SIGXFSZ"])
async def test_file_size_limit(
    how: str, process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    # Python ignores SIGXFSZ and sees EFBIG; most other programs die of the signal.
    reset = (
        "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n" if how == "SIGXFSZ" else ""
    )
    script = reset + "open('big', 'wb').write(b'x' * 2_000_000)\n"
    spec = make_spec(job_workdir, [job_python, "-c", script], max_file_bytes=1_000_000)
    result = await run(process_runner, spec)
    assert result.failure_reason is FailureReason.FILE_SIZE_LIMIT, result.message
    assert (job_workdir / "big").stat().st_size <= 1_000_000


async def test_cancel_stops_a_running_job(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    started = asyncio.Event()

    async def sink(stream: str, line: str) -> None:
        started.set()

    script = "import time\nprint('up', flush=True)\ntime.sleep(60)\n"
    spec = make_spec(job_workdir, [job_python, "-c", script])
    task = asyncio.create_task(process_runner.run(spec, sink))
    await asyncio.wait_for(started.wait(), 10)
    await process_runner.cancel(spec.job_id)
    result = await asyncio.wait_for(task, 10)
    assert result.failure_reason is FailureReason.CANCELLED
    assert result.duration_seconds < 5
    assert processes_of(spec) == set()
    await process_runner.cancel(spec.job_id)  # unknown now: a no-op


async def test_cancelling_the_run_task_kills_the_job(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    spec = make_spec(
        job_workdir, [job_python, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    )
    up = asyncio.Event()

    async def sink(stream: str, line: str) -> None:
        up.set()

    task = asyncio.create_task(process_runner.run(spec, sink))
    await asyncio.wait_for(up.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert processes_of(spec) == set()


async def test_daemonized_grandchild_dies_with_the_job(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    script = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
    )
    spec = make_spec(job_workdir, [job_python, "-c", script])
    result = await run(process_runner, spec)
    assert result.failure_reason is None, result.message
    assert processes_of(spec) == set()


_AGENT_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from peergpu.agent.runners import ProcessRunner, ResourceLimits, RunSpec

async def main() -> None:
    options, command, workdir, marker = json.loads(sys.argv[1])
    spec = RunSpec(job_id="orphan-test", command=command, workdir=Path(workdir),
                   env={"PEERGPU_TEST_MARKER": marker}, limits=ResourceLimits())
    async def sink(stream: str, line: str) -> None:
        print(line, flush=True)
    await ProcessRunner(**options).run(spec, sink)

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["full", "rlimits-only"])
def test_a_job_dies_with_an_agent_that_was_killed(
    job_workdir: Path, job_python: str, mode: str
) -> None:
    """An agent killed with SIGKILL (or crashed) cannot stop its jobs: the kernel does
    (PR_SET_PDEATHSIG, set by the launcher), so no job runs on, orphaned, for ever."""
    from tests.agent.conftest import RUNNER_MODES

    spec = make_spec(
        job_workdir,
        [job_python, "-c", "import time\nprint('up', flush=True)\nwhile True: time.sleep(0.1)"],
    )
    marker = spec.env["PEERGPU_TEST_MARKER"]
    arguments = json.dumps([RUNNER_MODES[mode], spec.command, str(job_workdir), marker])
    agent = subprocess.Popen(
        [sys.executable, "-c", _AGENT_SCRIPT, arguments], stdout=subprocess.PIPE, text=True
    )
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "up"
        assert processes_of(spec), "the job is running"
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        deadline = time.monotonic() + 10
        while processes_of(spec) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_of(spec) == set(), "the job outlived its agent"
    finally:
        agent.kill()
        for pid in processes_of(spec):
            os.kill(pid, signal.SIGKILL)


async def test_sink_errors_propagate_and_stop_the_job(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    async def broken_sink(stream: str, line: str) -> None:
        raise ConnectionError("server gone")

    spec = make_spec(
        job_workdir, [job_python, "-c", "import time; print('x', flush=True); time.sleep(60)"]
    )
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(process_runner.run(spec, broken_sink), 10)
    assert processes_of(spec) == set()


# ---------------------------------------------------------------- streaming


async def test_slow_sink_applies_backpressure(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    total_mb = 50
    script = (
        "import sys\n"
        "line = 'x' * 1023 + '\\n'\n"
        f"for _ in range({total_mb} * 1024):\n"
        "    sys.stdout.write(line)\n"
        "sys.stdout.flush()\n"
        "open('finished', 'w').close()\n"
    )
    gate = asyncio.Event()
    count = 0

    async def slow_sink(stream: str, line: str) -> None:
        nonlocal count
        await gate.wait()
        count += 1

    rss_before = _rss_bytes()
    task = asyncio.create_task(
        process_runner.run(make_spec(job_workdir, [job_python, "-c", script]), slow_sink)
    )
    await asyncio.sleep(1.0)
    assert not (job_workdir / "finished").exists(), "the job wrote everything although nobody read"
    assert _rss_bytes() - rss_before < 20 * MiB
    gate.set()
    result = await asyncio.wait_for(task, 30)
    assert result.failure_reason is None, result.message
    assert count == total_mb * 1024
    assert (job_workdir / "finished").exists()


async def test_long_line_arrives_in_64k_pieces(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    script = "import sys\nsys.stdout.write('a' * 1_000_000)\nsys.stdout.write('é' * 100_000)\n"
    sink = Collector()
    result = await run(process_runner, make_spec(job_workdir, [job_python, "-c", script]), sink)
    assert result.failure_reason is None, result.message
    pieces = sink.of("stdout")
    assert all(len(piece.encode()) <= MAX_LINE_BYTES for piece in pieces)
    assert len(pieces[0]) == MAX_LINE_BYTES
    assert "".join(pieces) == "a" * 1_000_000 + "é" * 100_000  # no character cut in two
    assert len(pieces) == -(-1_200_000 // MAX_LINE_BYTES)


async def test_log_batcher_is_a_sink(process_runner: ProcessRunner, job_workdir: Path) -> None:
    batches: list[list[LogLine]] = []

    async def send(batch: list[LogLine]) -> None:
        batches.append(batch)

    batcher = LogBatcher(send, first_seq=10)
    command = ["sh", "-c", "for i in $(seq 1 1000); do echo line $i; done"]
    result = await process_runner.run(make_spec(job_workdir, command), batcher.add)
    await batcher.close()
    assert result.failure_reason is None
    lines = [line for batch in batches for line in batch]
    assert [line.seq for line in lines] == list(range(10, 1010))
    assert [line.line for line in lines] == [f"line {i}" for i in range(1, 1001)]


# ---------------------------------------------------------------- bubblewrap


async def _require_bwrap(process_runner: ProcessRunner) -> None:
    setup = await process_runner.detect()
    if setup.bwrap is None:
        pytest.skip(f"bubblewrap not usable here: {setup.bwrap_problem}")


async def test_bwrap_blocks_network(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    await _require_bwrap(process_runner)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        script = (
            "import socket, sys\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "except OSError as e:\n    print('blocked', e)\n    sys.exit(0)\n"
            "print('connected')\n"
        )
        sink = Collector()
        result = await run(process_runner, make_spec(job_workdir, [job_python, "-c", script]), sink)
        assert result.failure_reason is None, result.message
        assert sink.of("stdout")[0].startswith("blocked")
        net_workdir = job_workdir.with_name("net")
        allowed = replace(make_spec(net_workdir, [job_python, "-c", script]), network=True)
        sink = Collector()
        await run(process_runner, allowed, sink)
        assert sink.of("stdout") == ["connected"]


async def test_bwrap_system_is_read_only_and_tmp_private(
    process_runner: ProcessRunner, job_workdir: Path, job_python: str
) -> None:
    await _require_bwrap(process_runner)
    marker = Path("/tmp") / f"peergpu-host-{uuid.uuid4().hex}"
    marker.write_text("host")
    try:
        script = (
            "import os\n"
            "for path in ('/etc/peergpu-test', '/usr/peergpu-test'):\n"
            "    try:\n        open(path, 'w')\n        print('writable', path)\n"
            "    except OSError as e:\n        print('refused', e.errno)\n"
            f"print('host tmp visible' if os.path.exists({str(marker)!r}) else 'tmp private')\n"
            "open('in-workdir', 'w').write('ok')\n"
        )
        sink = Collector()
        result = await run(process_runner, make_spec(job_workdir, [job_python, "-c", script]), sink)
        assert result.failure_reason is None, result.message
        assert sink.of("stdout") == ["refused 30", "refused 30", "tmp private"]
        assert (job_workdir / "in-workdir").read_text() == "ok"
    finally:
        marker.unlink()


def test_sandbox_arguments() -> None:
    closed = sandbox_prefix("bwrap", workdir=Path("/var/jobs/j1"), network=False, gpu_ids=())
    assert "--unshare-net" in closed and "--die-with-parent" in closed
    assert "--unshare-pid" in closed and "--new-session" in closed
    assert closed[closed.index("--ro-bind") : closed.index("--ro-bind") + 3] == [
        "--ro-bind",
        "/",
        "/",
    ]
    assert ["--tmpfs", "/tmp"] == closed[closed.index("/tmp") - 1 : closed.index("/tmp") + 1]
    assert closed[-6:] == [
        "--bind",
        "/var/jobs/j1",
        "/var/jobs/j1",
        "--chdir",
        "/var/jobs/j1",
        "--",
    ]
    opened = sandbox_prefix("bwrap", workdir=Path("/var/jobs/j1"), network=True, gpu_ids=())
    assert "--unshare-net" not in opened


# ---------------------------------------------------------------- misc


def test_create_runner() -> None:
    assert isinstance(create_runner("process", use_bwrap=False), ProcessRunner)
    assert isinstance(create_runner("docker", cpus=2.0), DockerRunner)
    with pytest.raises(ValueError, match="Unknown runner"):
        create_runner("vm")


def test_format_bytes() -> None:
    assert format_bytes(256 * MiB) == "256 MiB"
    assert format_bytes(2 * 1024 * MiB) == "2 GiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(10) == "10 bytes"


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")

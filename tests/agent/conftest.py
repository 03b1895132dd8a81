"""Fixtures for the agent's job-execution tests: real processes, a real file system."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peergpu.agent.runners import ProcessRunner


@pytest.fixture(scope="session")
def job_python() -> str:
    """A Python the job's user can execute (the test venv may live under a private /root)."""
    candidates = [sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]
    for candidate in filter(None, candidates):
        if os.geteuid() != 0:
            return candidate
        try:
            subprocess.run(
                [candidate, "-c", "pass"], user=65534, group=65534, capture_output=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            continue
        return candidate
    pytest.skip("no Python interpreter is executable by the unprivileged job user")


@pytest.fixture
def job_root() -> Iterator[Path]:
    """A directory for work dirs that the job's user may traverse (pytest's tmp is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="peergpu-agent-test-"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def job_workdir(job_root: Path) -> Path:
    """A work dir path (not yet created) for one job, under ``job_root``."""
    return job_root / f"job-{uuid.uuid4().hex[:8]}"


#: A uid of its own for the rlimits-only mode when root: RLIMIT_NPROC counts every process of
#: the job's uid, zombies included, so other modes' jobs (as ``nobody``) must not count against
#: it. That is also how production should use it: one uid per job slot.
_SLOT_UID = 65533

#: The containment layers a test runs under: all the host allows; without bubblewrap; rlimits
#: (and, as root, the job user) only, as on a host without bubblewrap or writable cgroups.
RUNNER_MODES: dict[str, dict[str, Any]] = {
    "full": {},
    "no-bwrap": {"use_bwrap": False},
    "rlimits-only": {
        "use_bwrap": False,
        "use_cgroups": False,
        **({"run_as": _SLOT_UID} if os.geteuid() == 0 else {}),
    },
}


@pytest.fixture(params=list(RUNNER_MODES))
def process_runner(request: pytest.FixtureRequest) -> ProcessRunner:
    """The process runner in each containment mode (see ``RUNNER_MODES``)."""
    return ProcessRunner(kill_grace_seconds=1.0, **RUNNER_MODES[request.param])

"""``peergpu jobs``: submit a bundle -> list -> status -> events -> cancel, with --json output.
No host is connected, so jobs stay queued until cancelled (real runs are tested with agents in
tests/integration and in test_cli_follow.py)."""

from __future__ import annotations

import json
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.client.conftest import Cli, needs_jobs_api, needs_logs_api

pytestmark = needs_jobs_api


def submit(cli: Cli, *args: str) -> dict[str, Any]:
    result = cli("jobs", "submit", "--json", *args)
    assert result.exit_code == 0, result.output
    job: dict[str, Any] = json.loads(result.stdout)
    return job


@pytest.fixture
def code(tmp_path: Path) -> Path:
    tree = tmp_path / "code"
    (tree / ".git").mkdir(parents=True)
    (tree / ".git" / "HEAD").write_text("ref: main")
    (tree / "main.py").write_text("print('hello')\n")
    return tree


def test_submit_a_bundle_then_list_status_events_cancel(logged_in: Cli, code: Path) -> None:
    cli = logged_in
    job = submit(
        cli,
        "--bundle", str(code),
        "--gpus", "2",
        "--min-vram", "40000",
        "--gpu-model", "H100", "--gpu-model", "A100",
        "--max-price", "2.50",
        "--tag", "nvlink",
        "--env", "MODE=test", "--env", "EMPTY=",
        "--max-duration", "600",
        "--priority", "3",
        "--network",
        "--retries", "1",
        "--name", "train",
        "--",
        "python", "main.py", "--epochs", "3",
    )  # fmt: skip
    assert job["state"] == "queued"
    assert job["command"] == ["python", "main.py", "--epochs", "3"]
    assert len(job["bundle_sha256"]) == 64
    assert (job["gpu_count"], job["min_vram_mib"], job["gpu_models"]) == (
        2,
        40000,
        ["H100", "A100"],
    )
    assert job["max_price_per_gpu_hour_micros"] == 2_500_000
    assert job["tags"] == ["nvlink"] and job["env"] == {"MODE": "test", "EMPTY": ""}
    assert (job["max_duration_seconds"], job["priority"], job["network"]) == (600, 3, True)
    assert (job["max_retries"], job["name"]) == (1, "train")

    listed = cli("jobs", "list", "--json")
    assert listed.exit_code == 0
    page = json.loads(listed.stdout)
    assert [j["id"] for j in page["items"]] == [job["id"]] and page["total"] == 1
    assert json.loads(cli("jobs", "list", "--state", "running", "--json").stdout)["items"] == []
    table = cli("jobs", "list")
    assert job["id"] in table.stdout and "queued" in table.stdout

    status = cli("jobs", "status", job["id"], "--json")
    assert json.loads(status.stdout)["id"] == job["id"]
    human = cli("jobs", "status", job["id"])
    assert "python main.py --epochs 3" in human.stdout and "$2.5 per GPU-hour" in human.stdout

    cancelled = cli("jobs", "cancel", job["id"], "--json")
    assert cancelled.exit_code == 0 and json.loads(cancelled.stdout)["state"] == "cancelled"
    again = cli("jobs", "cancel", job["id"])
    assert again.exit_code == 6 and "job_finished" in again.stderr

    events = json.loads(cli("jobs", "events", job["id"], "--json").stdout)["items"]
    assert [e["to_state"] for e in events][-1] == "cancelled"
    assert "cancelled" in cli("jobs", "events", job["id"]).stdout

    downloaded = cli("jobs", "download", job["id"], "--dest", str(code.parent / "out"), "--json")
    assert downloaded.exit_code == 0, downloaded.output
    assert json.loads(downloaded.stdout)["files"] == []


def test_the_bundle_leaves_out_git_and_a_zip_goes_as_it_is(
    logged_in: Cli, code: Path, tmp_path: Path
) -> None:
    from_dir = submit(logged_in, "--bundle", str(code), "--", "python", "main.py")
    archive = tmp_path / "by-hand.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("main.py", "print('hello')\n")
    from_zip = submit(logged_in, "--bundle", str(archive), "python", "main.py")
    assert len({from_dir["bundle_sha256"], from_zip["bundle_sha256"]}) == 2
    from peergpu.client import zip_directory

    expected = zip_directory(code, tmp_path / "expected.zip")
    import hashlib

    assert from_dir["bundle_sha256"] == hashlib.sha256(expected.read_bytes()).hexdigest()


def test_plain_submit_prints_only_the_id(logged_in: Cli) -> None:
    result = logged_in("jobs", "submit", "--image", "python:3.12", "python", "-c", "print(1)")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert str(uuid.UUID(job_id)) == job_id  # scripts can do JOB=$(peergpu jobs submit ...)
    assert "submitted job" in result.stderr
    status = json.loads(logged_in("jobs", "status", job_id, "--json").stdout)
    assert status["image"] == "python:3.12" and status["command"] == ["python", "-c", "print(1)"]


def test_idempotency_key_returns_the_same_job(logged_in: Cli) -> None:
    args = ("--image", "alpine", "--idempotency-key", "nightly-2024-01-01", "true")
    first, second = submit(logged_in, *args), submit(logged_in, *args)
    assert first["id"] == second["id"]
    clash = logged_in("jobs", "submit", "--image", "alpine", "--idempotency-key",
                      "nightly-2024-01-01", "false")  # fmt: skip
    assert clash.exit_code == 6 and "idempotency_key_reused" in clash.stderr


def test_unknown_jobs_exit_4(logged_in: Cli) -> None:
    unknown = str(uuid.uuid4())
    for command in ("status", "cancel", "events", "logs", "download"):
        result = logged_in("jobs", command, unknown)
        assert result.exit_code == 4, (command, result.output)
        assert result.stderr.count("\n") == 1 and "not_found" in result.stderr  # one line


def test_usage_errors_exit_2(logged_in: Cli, tmp_path: Path) -> None:
    assert logged_in("jobs", "submit", "--image", "alpine").exit_code == 2  # no command
    bad_env = logged_in("jobs", "submit", "--env", "=x", "--image", "a", "true")
    assert bad_env.exit_code == 2 and "K=V" in bad_env.stderr
    unset = logged_in(
        "jobs", "submit", "--env", "PEERGPU_TEST_SURELY_UNSET", "--image", "a", "true"
    )
    assert unset.exit_code == 2
    price = logged_in("jobs", "submit", "--max-price", "cheap", "--image", "a", "true")
    assert price.exit_code == 2 and "--max-price" in price.stderr
    missing = logged_in("jobs", "submit", "--bundle", str(tmp_path / "nope"), "true")
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    not_zip = tmp_path / "notes.txt"
    not_zip.write_text("hello")
    assert logged_in("jobs", "submit", "--bundle", str(not_zip), "true").exit_code == 2
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "leak").symlink_to(outside)
    leak = logged_in("jobs", "submit", "--bundle", str(tree), "true")
    assert leak.exit_code == 2 and "outside the folder" in leak.stderr


def test_server_side_validation_errors_exit_6(logged_in: Cli) -> None:
    result = logged_in("jobs", "submit", "--image", "a", "--gpus", "99", "true")
    assert result.exit_code == 6 and "validation_error" in result.stderr


def test_jobs_need_a_login(cli: Cli) -> None:
    result = cli("jobs", "list")
    assert result.exit_code == 3 and "peergpu login" in result.stderr


@needs_logs_api
def test_logs_of_a_job_that_never_ran(logged_in: Cli) -> None:
    job = submit(logged_in, "--image", "alpine", "true")
    logged_in("jobs", "cancel", job["id"])
    logs = logged_in("jobs", "logs", job["id"])
    assert logs.exit_code == 0 and logs.stdout == ""
    followed = logged_in("jobs", "logs", "--follow", "--json", job["id"])
    assert followed.exit_code == 1  # cancelled
    events = [json.loads(line) for line in followed.stdout.splitlines()]
    assert events[-1]["type"] == "end" and events[-1]["job"]["state"] == "cancelled"

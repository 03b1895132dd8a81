"""A job really runs: ``jobs submit --bundle DIR --follow`` against a real agent process
(simulated GPUs, the process runner) streams the job's stdout and stderr to the CLI's, exits with
the job's exit code, and ``jobs download`` fetches its outputs with checksums verified."""

from __future__ import annotations

import json
from pathlib import Path

from tests.client.conftest import Cli, needs_jobs_api, needs_logs_api, running_agent
from tests.integration.harness import ThreadedServer, wait_for

pytestmark = [needs_jobs_api, needs_logs_api]

MAIN_PY = """\
import os, pathlib, sys
print("training on", os.environ.get("MODE"))
print("a warning", file=sys.stderr)
out = pathlib.Path(os.environ["PEERGPU_OUTPUT_DIR"])
(out / "model").mkdir()
(out / "model" / "weights.bin").write_bytes(bytes(range(256)) * 1000)
(out / "metrics.json").write_text('{"loss": 0.1}')
print("done")
sys.exit(int(os.environ.get("EXIT", "0")))
"""


def test_follow_streams_logs_and_exits_with_the_jobs_code(
    logged_in: Cli, server: ThreadedServer, tmp_path: Path
) -> None:
    cli = logged_in
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text(MAIN_PY)
    token = json.loads(cli("hosts", "enroll-token", "--price", "1", "--json").stdout)["token"]
    with running_agent(server, token, tmp_path) as agent:
        wait_for(
            lambda: json.loads(cli("hosts", "list", "--json").stdout)["items"],
            what="the agent to come online",
            context=agent.log,
        )
        ok = cli(
            "jobs", "submit", "--bundle", str(code), "--env", "MODE=fast", "--follow",
            "--", "python3", "main.py",
        )  # fmt: skip
        assert ok.exit_code == 0, ok.output + agent.log()
        assert ok.stdout.splitlines() == ["training on fast", "done"]
        assert "a warning" in ok.stderr and "succeeded" in ok.stderr

        failed = cli(
            "jobs", "submit", "--bundle", str(code), "--env", "EXIT=3", "--follow", "--json",
            "python3", "main.py",
        )  # fmt: skip
        assert failed.exit_code == 3, failed.output + agent.log()
        events = [json.loads(line) for line in failed.stdout.splitlines()]
        assert events[0]["type"] == "submitted" and events[-1]["type"] == "end"
        assert events[-1]["job"]["state"] == "failed" and events[-1]["job"]["exit_code"] == 3
        logs = [(e["stream"], e["line"]) for e in events if e["type"] == "log"]
        assert ("stderr", "a warning") in logs and ("stdout", "done") in logs
        assert "state" in {e["type"] for e in events}
        job_id = events[0]["job"]["id"]

        again = cli("jobs", "logs", job_id)
        assert again.exit_code == 0 and again.stdout.splitlines()[-1] == "done"
        followed = cli("jobs", "logs", "-f", job_id)
        assert followed.exit_code == 3 and "a warning" in followed.stderr

        dest = tmp_path / "results"
        wait_for(
            lambda: (
                len(
                    json.loads(
                        cli("jobs", "download", job_id, "--dest", str(dest), "--json").stdout
                    )["files"]
                )
                == 2
            ),  # fmt: skip
            what="the artifacts to be listed",
        )
    assert (dest / "model" / "weights.bin").read_bytes() == bytes(range(256)) * 1000
    assert json.loads((dest / "metrics.json").read_text()) == {"loss": 0.1}

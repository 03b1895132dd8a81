"""The engine for ``bench/gateway.py``: the tests' scripted OpenAI-compatible engine under
uvicorn in a process of its own, so its CPU is on neither the server's nor the agent's loop.

    python -m bench._gateway_engine PORT
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

import uvicorn
from tests.gateway.scripted_engine import EngineLog, create_scripted_engine


def main() -> None:
    port = int(sys.argv[1])
    parent = os.getppid()

    def exit_with_parent() -> None:  # never outlive a killed benchmark
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    # The engine keeps every request body it saw, for the tests; a benchmark sends tens of
    # thousands, so keep only the last few.
    log = EngineLog(requests=collections.deque(maxlen=16))  # type: ignore[arg-type]
    uvicorn.run(
        create_scripted_engine(log),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
    )


if __name__ == "__main__":
    main()

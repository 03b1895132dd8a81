"""Stack samples of a ``bench/gateway.py`` process (the server, or the agent) in the windows
the benchmark marks: SIGUSR1 opens one, SIGUSR2 closes it and keeps a snapshot. The sampler
is ``bench/scheduler.py``'s (``SIGPROF`` per 2 ms of the process's CPU). The snapshots, one per
window and cumulative, are written as a JSON list when the process exits."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.scheduler import _Sampler


class SampledWindows:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.sampler = _Sampler() if path is not None else None
        self.snapshots: list[dict[str, Any]] = []
        self.open = False
        self.opened = 0  # windows opened so far
        #: SQL statements run while a window was open, by kind (see ``count_sql``).
        self.sql: dict[str, int] = {}

    def install(
        self,
        on_open: Callable[[int], None] = lambda _: None,
        on_close: Callable[[int], None] = lambda _: None,
    ) -> None:
        """Handle SIGUSR1/SIGUSR2 (from the main thread); ``on_open``/``on_close`` get the
        window's index (another profiler may follow the same windows)."""

        def opened(*_: object) -> None:
            if self.open:
                return
            self.open = True
            if self.sampler is not None:
                self.sampler.start()
            on_open(self.opened)
            self.opened += 1

        def closed(*_: object) -> None:
            if not self.open:
                return
            self.open = False
            if self.sampler is not None:
                self.sampler.stop()
                self.snapshots.append({**self.sampler.snapshot(), "sql": dict(self.sql)})
            on_close(self.opened - 1)

        signal.signal(signal.SIGUSR1, opened)
        signal.signal(signal.SIGUSR2, closed)

    def write(self) -> None:
        if self.path is not None and self.sampler is not None:
            if self.open:
                self.sampler.stop()
            self.path.write_text(json.dumps(self.snapshots))

    def count_sql(self) -> None:
        """Count the server's SQL statements in the windows: wraps the engine the server's
        context is about to create (call before the app starts)."""
        from sqlalchemy import event

        from bench.scheduler import _statement_kind
        from peergpu.server import context as context_module

        original = context_module.create_engine  # type: ignore[attr-defined]

        def create_engine(settings: Any) -> Any:
            engine = original(settings)

            @event.listens_for(engine.sync_engine, "before_cursor_execute")
            def counted(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
                if self.open:
                    kind = _statement_kind(statement)
                    self.sql[kind] = self.sql.get(kind, 0) + 1

            return engine

        context_module.create_engine = create_engine  # type: ignore[attr-defined]

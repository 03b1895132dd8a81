"""Set-wise INSERTs in SQLAlchemy Core, for the hot paths that write many rows at once.

``session.execute(insert(Model), rows)`` is the ORM's bulk INSERT: it walks every row through
the mapper (defaults, primary keys, versioning) before the same executemany Core runs
directly. The hot paths (jobs, job events, ledger entries, job charges) build plain
dictionaries with every column they set, so they skip that walk.

On PostgreSQL the rows travel as one array per column into a statement that is always the
same for a table and a set of columns (``INSERT ... SELECT * FROM unnest(...)``): it is
compiled and prepared once, and asyncpg encodes the arrays in C. Core's multi-row ``VALUES``
processed every parameter of every row in Python (a tenth of the scheduler's CPU). Columns
left out get their defaults as Core would give them: a constant, a call per row, and for a
primary key made by ``uuid4``, ``gen_random_uuid()`` in the database (nobody reads those ids
back). SQLite keeps Core's executemany, which fills the same defaults.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from typing import Any
from typing import cast as typing_cast

from sqlalchemy import (
    JSON,
    Column,
    Table,
    Text,
    bindparam,
    cast,
    column,
    func,
    insert,
    literal,
    select,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.db import core


def table_of(model: type[Any]) -> Table:
    """The mapped class's table, for Core statements."""
    return typing_cast(Table, model.__table__)


async def insert_rows(
    session: AsyncSession, model: type[Any], rows: Sequence[dict[str, Any]]
) -> None:
    """INSERT ``rows`` (dictionaries with the same keys) into ``model``'s table in one
    statement, in the session's transaction. Objects pending in the session are flushed
    first, as the ORM's bulk INSERT would, so rows may refer to them."""
    if not rows:
        return
    await session.flush()
    table = table_of(model)
    if session.get_bind().dialect.name != "postgresql":
        await core.execute(session, insert(table), list(rows))
        return
    statement, given, called, encoded = _unnest_insert(table, tuple(rows[0]))
    parameters = {f"rows_c_{i}": [row[name] for row in rows] for i, name in enumerate(given)}
    for i, (_name, make) in enumerate(called):
        parameters[f"rows_d_{i}"] = [make() for _ in rows]
    for param in encoded:
        key = f"rows_{param}"
        parameters[key] = [json.dumps(value) for value in parameters[key]]
    await core.execute(session, statement, parameters)


def unnest(name: str, columns: Sequence[tuple[str, Any]]) -> Any:
    """PostgreSQL's ``unnest(:name_a, :name_b, ...) AS name(a, b, ...)``: a table of rows made
    from one array parameter per column (``columns``: name and type), to join or select from
    in a statement whose shape never changes. Each parameter is named ``<name>_<column>``
    (a bind parameter may not share a name with a column the statement sets)."""
    return (
        func.unnest(*(bindparam(f"{name}_{c}", type_=pg.ARRAY(kind)) for c, kind in columns))
        .table_valued(*(column(c, kind) for c, kind in columns))
        .render_derived(name=name)
    )


@functools.lru_cache(maxsize=64)
def _unnest_insert(
    table: Table, given: tuple[str, ...]
) -> tuple[Any, tuple[str, ...], tuple[tuple[str, Any], ...], tuple[str, ...]]:
    """PostgreSQL's INSERT of ``given`` columns from arrays; also returns the columns whose
    default is a call made per row in Python (their values travel as arrays too), and the
    array parameters of JSON columns. Those travel as text and are cast in the statement: an
    array of JSON values that are lists would be read as a multi-dimensional array."""
    called: list[tuple[str, Any]] = []
    constant: list[tuple[str, Any]] = []
    generated: list[str] = []
    for col in table.columns:
        if col.name in given or col.server_default is not None or col.default is None:
            continue
        default = col.default
        if default.is_scalar:
            constant.append((col.name, default.arg))  # type: ignore[attr-defined]
            continue
        function = getattr(default.arg, "__wrapped__", None)  # type: ignore[attr-defined]
        if function is uuid.uuid4 and col.primary_key:
            generated.append(col.name)
        elif function is not None:
            called.append((col.name, function))
        else:  # a default that needs the execution context: leave it to Core
            raise ValueError(f"{table.name}.{col.name}: no array form for its default")
    sources = [(name, f"c_{i}") for i, name in enumerate(given)]
    sources += [(name, f"d_{i}") for i, (name, _f) in enumerate(called)]
    typed: list[tuple[Column[Any], str]] = [(table.c[name], param) for name, param in sources]
    encoded = tuple(param for col, param in typed if isinstance(col.type, JSON))
    rows = unnest(
        "rows", [(param, Text() if param in encoded else col.type) for col, param in typed]
    )
    selected: list[Any] = [
        cast(rows.c[param], col.type) if param in encoded else rows.c[param] for col, param in typed
    ]
    selected += [literal(value, table.c[name].type) for name, value in constant]
    selected += [func.gen_random_uuid() for _name in generated]
    names = [name for name, _param in sources] + [n for n, _v in constant] + generated
    statement = insert(table).from_select(names, select(*selected))
    return statement, given, tuple(called), encoded

"""Set-wise INSERTs in SQLAlchemy Core, for the hot paths that write many rows at once.

``session.execute(insert(Model), rows)`` is the ORM's bulk INSERT: it walks every row through
the mapper (defaults, primary keys, versioning) before the same executemany Core runs
directly. The hot paths (job events, ledger entries, job charges) build plain dictionaries
with every column they set, so they skip that walk: Core still fills each column's default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession


def table_of(model: type[Any]) -> Table:
    """The mapped class's table, for Core statements."""
    return cast(Table, model.__table__)


async def insert_rows(
    session: AsyncSession, model: type[Any], rows: Sequence[dict[str, Any]]
) -> None:
    """INSERT ``rows`` (dictionaries with the same keys) into ``model``'s table in one
    executemany, in the session's transaction. Objects pending in the session are flushed
    first, as the ORM's bulk INSERT would, so rows may refer to them."""
    if not rows:
        return
    await session.flush()
    await session.execute(insert(table_of(model)), list(rows))

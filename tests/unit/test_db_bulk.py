"""``bulk.insert_rows`` against the real database: what it writes is what Core would write
(defaults for the columns left out, JSON values as given), on either backend."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import LedgerTransactionModel
from peergpu.server.db.bulk import insert_rows
from peergpu.server.db.job_models import JobEventModel
from tests.unit.scheduling import make_job, make_renter


async def test_rows_get_their_values_and_the_left_out_columns_their_defaults(
    context: ServerContext,
) -> None:
    owner = await make_renter(context)
    job_id = await make_job(context, owner)
    now = utcnow()
    rows = [
        {
            "job_id": job_id,
            "at": now,
            "from_state": None if n == 0 else "queued",
            "to_state": "queued" if n == 0 else "assigned",
            "host_id": None,
        }
        for n in range(3)
    ]
    async with context.sessionmaker() as session:
        await insert_rows(session, JobEventModel, rows)
        await session.commit()
        events = list(
            await session.scalars(select(JobEventModel).where(JobEventModel.job_id == job_id))
        )
    assert sorted((e.from_state or "", e.to_state) for e in events) == [
        ("", "queued"),
        ("queued", "assigned"),
        ("queued", "assigned"),
    ]
    # The primary key made for each row, the constant defaults filled in.
    assert len({e.id for e in events}) == 3 and all(isinstance(e.id, uuid.UUID) for e in events)
    assert {(e.reason, e.message) for e in events} == {("", "")}


async def test_json_values_of_every_shape_come_back_as_written(context: ServerContext) -> None:
    details = [{}, {"a": [1, 2, {"b": None}]}, {"text": "\u00e9\"'\\", "n": 1.5, "ok": True}]
    keys = [f"bulk-{uuid.uuid4()}" for _ in details]
    rows = [
        {"idempotency_key": key, "kind": "test", "details": value}
        for key, value in zip(keys, details, strict=True)
    ]
    async with context.sessionmaker() as session:
        await insert_rows(session, LedgerTransactionModel, rows)
        await session.commit()
        found = {
            t.idempotency_key: t
            for t in await session.scalars(
                select(LedgerTransactionModel).where(
                    LedgerTransactionModel.idempotency_key.in_(keys)
                )
            )
        }
    assert [found[key].details for key in keys] == details
    # A default made by a call (created_at) and a constant one (memo) for every row.
    assert all(found[key].created_at is not None and found[key].memo == "" for key in keys)

"""``job_queue.rank``: the batch from each queue's first jobs only, or "read more"."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from peergpu.server.services import job_queue

START = datetime(2026, 1, 1, tzinfo=UTC)


def _queue(owner: uuid.UUID, priority: int, count: int, rng: random.Random) -> list[tuple]:
    return [
        (uuid.uuid4(), owner, priority, START + timedelta(seconds=rng.randint(0, 50)))
        for _ in range(count)
    ]


def _ranked(rows: list[tuple]) -> list[uuid.UUID]:
    """Every job in queue order: priority, then turn within its queue, then age."""
    turns: dict[tuple, int] = {}
    keyed = []
    for job_id, owner, priority, created in sorted(rows, key=lambda r: (r[3], r[0])):
        turns[(owner, priority)] = turn = turns.get((owner, priority), 0) + 1
        keyed.append((-priority, turn, created, job_id))
    return [key[3] for key in sorted(keyed)]


def _firsts(rows: list[tuple], per_queue: int) -> list[tuple]:
    """What ``order_query`` reads: each queue's first ``per_queue`` jobs."""
    queues: dict[tuple, list[tuple]] = {}
    for row in sorted(rows, key=lambda r: (r[3], r[0])):
        queues.setdefault((row[1], row[2]), []).append(row)
    return [row for jobs in queues.values() for row in jobs[:per_queue]]


def test_even_queues_are_told_from_their_fair_share() -> None:
    rng = random.Random(1)
    rows = [row for _ in range(20) for row in _queue(uuid.uuid4(), 0, 60, rng)]
    per_queue = job_queue.first_read(100, 20)
    assert per_queue == 6
    assert job_queue.rank(_firsts(rows, per_queue), 100, per_queue) == _ranked(rows)[:100]


def test_a_lopsided_queue_asks_for_more() -> None:
    """One renter with many jobs, three with one each: the batch of 10 needs seven of the
    first renter's jobs, more than its fair share (3 + 1)."""
    rng = random.Random(2)
    big = _queue(uuid.uuid4(), 0, 50, rng)
    small = [row for _ in range(3) for row in _queue(uuid.uuid4(), 0, 1, rng)]
    rows = big + small
    per_queue = job_queue.first_read(10, 4)
    assert job_queue.rank(_firsts(rows, per_queue), 10, per_queue) is None
    assert job_queue.rank(_firsts(rows, 10), 10, 10) == _ranked(rows)[:10]


@pytest.mark.parametrize("seed", range(40))
def test_an_answer_is_always_the_whole_ranking_s_first_jobs(seed: int) -> None:
    rng = random.Random(seed)
    owners = [uuid.uuid4() for _ in range(rng.randint(1, 8))]
    rows = [
        row
        for owner in owners
        for priority in rng.sample([0, 1, 5], rng.randint(1, 3))
        for row in _queue(owner, priority, rng.choice([1, 2, 5, 30]), rng)
    ]
    expected = _ranked(rows)
    size = rng.choice([1, 3, 10, 40, 200])
    queues = len({(r[1], r[2]) for r in rows})
    per_queue = job_queue.first_read(size, queues)
    answer = job_queue.rank(_firsts(rows, per_queue), size, per_queue)
    if answer is not None:
        assert answer == expected[:size]
    assert job_queue.rank(_firsts(rows, size), size, size) == expected[:size]

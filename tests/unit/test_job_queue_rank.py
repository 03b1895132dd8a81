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


def _firsts(rows: list[tuple], limits: dict[int, int]) -> list[tuple]:
    """What ``order_query`` reads: each queue's first ``limits[priority]`` jobs."""
    queues: dict[tuple, list[tuple]] = {}
    for row in sorted(rows, key=lambda r: (r[3], r[0])):
        queues.setdefault((row[1], row[2]), []).append(row)
    return [row for (_o, p), jobs in queues.items() for row in jobs[: limits[p]]]


def _heads(rows: list[tuple]) -> list[tuple]:
    return sorted({(r[1], r[2]) for r in rows}, key=lambda h: -h[1])


def test_even_queues_are_told_from_their_fair_share() -> None:
    rng = random.Random(1)
    rows = [row for _ in range(20) for row in _queue(uuid.uuid4(), 0, 60, rng)]
    limits = job_queue.first_read(100, _heads(rows))
    assert limits == {0: 6}
    assert job_queue.rank(_firsts(rows, limits), 100, limits) == _ranked(rows)[:100]


def test_a_higher_priority_is_read_by_its_own_share() -> None:
    """20 renters with a few urgent jobs each and many ordinary ones (the benchmark's
    queue): the batch is all urgent jobs, 20 of each renter's, told from the first read."""
    rng = random.Random(3)
    owners = [uuid.uuid4() for _ in range(20)]
    rows = [row for o in owners for row in _queue(o, 1, 30, rng) + _queue(o, 0, 300, rng)]
    limits = job_queue.first_read(400, _heads(rows))
    assert limits == {1: 21, 0: 21}
    assert job_queue.rank(_firsts(rows, limits), 400, limits) == _ranked(rows)[:400]


def test_a_lopsided_queue_asks_for_more() -> None:
    """One renter with many jobs, three with one each: the batch of 10 needs seven of the
    first renter's jobs, more than its fair share (3 + 1)."""
    rng = random.Random(2)
    big = _queue(uuid.uuid4(), 0, 50, rng)
    small = [row for _ in range(3) for row in _queue(uuid.uuid4(), 0, 1, rng)]
    rows = big + small
    limits = job_queue.first_read(10, _heads(rows))
    assert job_queue.rank(_firsts(rows, limits), 10, limits) is None
    assert job_queue.rank(_firsts(rows, {0: 10}), 10, {0: 10}) == _ranked(rows)[:10]


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
    limits = job_queue.first_read(size, _heads(rows))
    answer = job_queue.rank(_firsts(rows, limits), size, limits)
    if answer is not None:
        assert answer == expected[:size]
    everything = dict.fromkeys(limits, size)
    assert job_queue.rank(_firsts(rows, everything), size, everything) == expected[:size]

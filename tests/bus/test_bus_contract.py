"""The ``Bus`` contract, run against ``InProcessBus`` and ``RedisBus`` alike (see conftest)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest
import redis

from peergpu.config import ServerSettings
from peergpu.errors import ServiceUnavailable
from peergpu.server.bus import Bus, InProcessBus, Message, RedisBus, Subscription, create_bus
from peergpu.server.bus.base import parse_stream_id

#: Generous upper bound for things that should happen at once; never actually waited out.
ARRIVES_WITHIN = 5.0
#: How long "nothing arrives" checks wait.
QUIET_PERIOD = 0.2
#: Nothing listens on port 1: connections are refused at once.
UNREACHABLE_REDIS_URL = "redis://127.0.0.1:1/0"
BINARY = bytes(range(256)) + b"\x00\r\n" + "ünïcødé".encode()


async def receive(subscription: Subscription, count: int) -> list[Message]:
    messages: list[Message] = []
    for _ in range(count):
        message = await subscription.get(timeout=ARRIVES_WITHIN)
        assert message is not None, f"only {len(messages)} of {count} messages arrived"
        messages.append(message)
    return messages


# --- pub/sub -------------------------------------------------------------------------------


async def test_subscriber_gets_every_message_in_publish_order(bus: Bus) -> None:
    async with bus.subscribe("jobs") as subscription:
        for number in range(200):
            await bus.publish("jobs", str(number).encode())
        messages = await receive(subscription, 200)
    assert [m.channel for m in messages] == ["jobs"] * 200
    assert [m.data for m in messages] == [str(n).encode() for n in range(200)]


async def test_drain_drops_what_has_arrived_up_to_its_limit(bus: Bus) -> None:
    async with bus.subscribe("wake") as subscription:
        await bus.publish_many([("wake", b"1")] * 150)
        await receive(subscription, 1)  # everything has arrived once the first has
        await asyncio.sleep(QUIET_PERIOD)
        assert await subscription.drain(100) == 100
        assert await subscription.drain(100) == 49
        assert await subscription.drain() == 0
        await bus.publish("wake", b"after")
        assert (await receive(subscription, 1))[0].data == b"after"


async def test_drain_ends_under_a_steady_stream(bus: Bus) -> None:
    """A publisher faster than one reader: "until none is left" would never end."""
    flooding = True

    async def flood() -> None:
        while flooding:
            await bus.publish_many([("wake", b"1")] * 50)
            await asyncio.sleep(0)

    async with bus.subscribe("wake") as subscription:
        publisher = asyncio.create_task(flood())
        try:
            await receive(subscription, 1)
            for _ in range(20):
                assert await asyncio.wait_for(subscription.drain(100), ARRIVES_WITHIN) <= 100
        finally:
            flooding = False
            await publisher


async def test_two_subscribers_each_get_every_message(bus: Bus) -> None:
    async with bus.subscribe("news") as first, bus.subscribe("news") as second:
        for number in range(50):
            await bus.publish("news", str(number).encode())
        expected = [str(n).encode() for n in range(50)]
        assert [m.data for m in await receive(first, 50)] == expected
        assert [m.data for m in await receive(second, 50)] == expected


async def test_one_subscription_to_several_channels_keeps_order_per_channel(bus: Bus) -> None:
    async with bus.subscribe("a", "b", "c") as subscription:
        for number in range(30):
            for channel in ("a", "b", "c"):
                await bus.publish(channel, f"{channel}{number}".encode())
        messages = await receive(subscription, 90)
    for channel in ("a", "b", "c"):
        on_channel = [m.data for m in messages if m.channel == channel]
        assert on_channel == [f"{channel}{n}".encode() for n in range(30)]


async def test_channel_not_subscribed_is_not_delivered(bus: Bus) -> None:
    async with bus.subscribe("mine") as subscription:
        await bus.publish("other", b"not for you")
        await bus.publish("mine-but-longer", b"not for you either")
        await bus.publish("mine", b"for you")
        message = await subscription.get(timeout=ARRIVES_WITHIN)
        assert message == Message(channel="mine", data=b"for you")
        assert await subscription.get(timeout=QUIET_PERIOD) is None


async def test_no_delivery_after_leaving_the_block(bus: Bus) -> None:
    async with bus.subscribe("events") as watcher:
        async with bus.subscribe("events") as departed:
            pass
        await bus.publish("events", b"after exit")
        # The publish did happen: a live subscriber sees it...
        assert (await receive(watcher, 1))[0].data == b"after exit"
        # ...but the closed subscription gets nothing, and iterating it ends at once.
        assert await departed.get(timeout=QUIET_PERIOD) is None
        assert [message async for message in departed] == []


async def test_close_drops_undelivered_messages(bus: Bus) -> None:
    async with bus.subscribe("events") as watcher, bus.subscribe("events") as subscription:
        await bus.publish("events", b"queued")
        await receive(watcher, 1)  # delivered to everyone, not yet read by `subscription`
        await subscription.close()
        await subscription.close()  # idempotent
        assert await subscription.get(timeout=QUIET_PERIOD) is None


async def test_close_wakes_a_blocked_get(bus: Bus) -> None:
    async with bus.subscribe("quiet") as subscription:
        waiter = asyncio.create_task(subscription.get())
        await asyncio.sleep(0)  # let the waiter start waiting
        assert not waiter.done()
        await subscription.close()
        assert await asyncio.wait_for(waiter, ARRIVES_WITHIN) is None


async def test_async_iteration_yields_messages_until_closed(bus: Bus) -> None:
    received: list[bytes] = []
    got_three = asyncio.Event()

    async with bus.subscribe("feed") as subscription:

        async def consume() -> None:
            async for message in subscription:
                received.append(message.data)
                if len(received) == 3:
                    got_three.set()

        consumer = asyncio.create_task(consume())
        for data in (b"1", b"2", b"3"):
            await bus.publish("feed", data)
        await asyncio.wait_for(got_three.wait(), ARRIVES_WITHIN)
        await subscription.close()
        await asyncio.wait_for(consumer, ARRIVES_WITHIN)
    assert received == [b"1", b"2", b"3"]


async def test_get_times_out_with_none(bus: Bus) -> None:
    async with bus.subscribe("silence") as subscription:
        assert await subscription.get(timeout=QUIET_PERIOD) is None
        assert await subscription.get(timeout=0) is None


async def test_binary_payloads_round_trip_through_pubsub(bus: Bus) -> None:
    async with bus.subscribe("bin") as subscription:
        await bus.publish("bin", BINARY)
        await bus.publish("bin", b"")
        assert [m.data for m in await receive(subscription, 2)] == [BINARY, b""]


async def test_publish_without_subscribers_is_accepted(bus: Bus) -> None:
    await bus.publish("nobody-listens", b"hello")


async def test_publish_many_delivers_what_separate_publishes_deliver(bus: Bus) -> None:
    batch = [
        (channel, f"{channel}{number}".encode())
        for number in range(20)
        for channel in ("a", "b", "c", "unwatched")
    ]
    async with bus.subscribe("a", "b", "c") as all_three, bus.subscribe("b") as only_b:
        for channel, data in batch:
            await bus.publish(channel, data)
        separately, separately_b = await receive(all_three, 60), await receive(only_b, 20)
        await bus.publish_many(batch)
        batched, batched_b = await receive(all_three, 60), await receive(only_b, 20)
        assert await all_three.get(timeout=QUIET_PERIOD) is None
        assert await only_b.get(timeout=QUIET_PERIOD) is None
    for channel in ("a", "b", "c"):
        expected = [f"{channel}{n}".encode() for n in range(20)]
        assert [m.data for m in batched if m.channel == channel] == expected
        assert [m.data for m in separately if m.channel == channel] == expected
    assert (
        batched_b
        == separately_b
        == [Message(channel="b", data=f"b{n}".encode()) for n in range(20)]
    )


async def test_publish_many_keeps_binary_payloads_and_duplicates(bus: Bus) -> None:
    async with bus.subscribe("bin") as subscription:
        await bus.publish_many([("bin", BINARY), ("bin", b""), ("bin", BINARY)])
        assert [m.data for m in await receive(subscription, 3)] == [BINARY, b"", BINARY]


async def test_publish_many_of_nothing_delivers_nothing(bus: Bus) -> None:
    async with bus.subscribe("idle") as subscription:
        await bus.publish_many([])
        await bus.publish("idle", b"after")
        assert await receive(subscription, 1) == [Message(channel="idle", data=b"after")]
        assert await subscription.get(timeout=QUIET_PERIOD) is None


async def test_subscribe_needs_a_channel(bus: Bus) -> None:
    with pytest.raises(ValueError):
        bus.subscribe()


# --- streams -------------------------------------------------------------------------------


async def test_append_returns_strictly_increasing_ids_and_read_returns_entries(bus: Bus) -> None:
    ids = [await bus.append("log", f"line {n}".encode()) for n in range(50)]
    keys = [parse_stream_id(entry_id) for entry_id in ids]
    assert all(earlier < later for earlier, later in zip(keys, keys[1:], strict=False))
    assert all(entry_id.count("-") == 1 for entry_id in ids)
    entries = await bus.read("log")
    assert [e.id for e in entries] == ids
    assert [e.data for e in entries] == [f"line {n}".encode() for n in range(50)]


async def test_read_after_an_id_is_exclusive(bus: Bus) -> None:
    ids = [await bus.append("log", str(n).encode()) for n in range(5)]
    entries = await bus.read("log", after=ids[2])
    assert [e.id for e in entries] == ids[3:]
    assert await bus.read("log", after=ids[-1]) == []


async def test_count_limits_and_paging_sees_each_entry_once(bus: Bus) -> None:
    ids = [await bus.append("log", str(n).encode()) for n in range(10)]
    assert [e.id for e in await bus.read("log", count=3)] == ids[:3]
    seen: list[str] = []
    after = "0"
    for _ in range(4):  # 10 entries in pages of 4: the 4th page must be empty
        page = await bus.read("log", after=after, count=4)
        if not page:
            break
        assert len(page) <= 4
        seen.extend(entry.id for entry in page)
        after = page[-1].id
    else:
        pytest.fail("paging did not come to an end")
    assert seen == ids


async def test_missing_stream_reads_empty_and_has_length_zero(bus: Bus) -> None:
    assert await bus.read("never-written") == []
    assert await bus.stream_length("never-written") == 0


async def test_blocking_read_wakes_when_another_task_appends(bus: Bus) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader = asyncio.create_task(bus.read("fresh", block=ARRIVES_WITHIN))
    # Give the reader a moment to reach its blocking wait (Redis offers nothing to await here);
    # the test also passes if it has not, but then it checks less.
    await asyncio.sleep(0.05)
    assert not reader.done(), "a blocking read on an empty stream returned early"
    entry_id = await bus.append("fresh", b"wake up")
    entries = await asyncio.wait_for(reader, ARRIVES_WITHIN)
    assert [(e.id, e.data) for e in entries] == [(entry_id, b"wake up")]
    assert loop.time() - started < ARRIVES_WITHIN / 2


async def test_blocking_read_after_last_id_wakes_on_the_next_entry(bus: Bus) -> None:
    last = await bus.append("log", b"old")
    reader = asyncio.create_task(bus.read("log", after=last, block=ARRIVES_WITHIN))
    await asyncio.sleep(0.05)
    assert not reader.done()
    new = await bus.append("log", b"new")
    assert [e.id for e in await asyncio.wait_for(reader, ARRIVES_WITHIN)] == [new]


async def test_blocking_read_times_out_with_empty_list(bus: Bus) -> None:
    await bus.append("log", b"seen")
    (seen,) = await bus.read("log")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await bus.read("log", after=seen.id, block=0.3) == []
    assert 0.25 <= loop.time() - started < 2.0


async def test_blocking_read_returns_at_once_when_entries_exist(bus: Bus) -> None:
    entry_id = await bus.append("log", b"ready")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert [e.id for e in await bus.read("log", block=ARRIVES_WITHIN)] == [entry_id]
    assert loop.time() - started < 1.0


async def test_maxlen_trims_exactly_to_the_newest_entries(bus: Bus) -> None:
    ids = [await bus.append("capped", str(n).encode(), maxlen=5) for n in range(20)]
    assert await bus.stream_length("capped") == 5
    entries = await bus.read("capped")
    assert [e.id for e in entries] == ids[-5:]
    assert [e.data for e in entries] == [str(n).encode() for n in range(15, 20)]
    later = await bus.append("capped", b"later", maxlen=5)
    assert parse_stream_id(later) > parse_stream_id(ids[-1])


async def test_stream_length_counts_entries(bus: Bus) -> None:
    for n in range(7):
        await bus.append("counted", str(n).encode())
    assert await bus.stream_length("counted") == 7


async def test_delete_stream_removes_everything(bus: Bus) -> None:
    await bus.append("doomed", b"1")
    await bus.append("doomed", b"2")
    await bus.append("kept", b"k")
    await bus.delete_stream("doomed")
    assert await bus.stream_length("doomed") == 0
    assert await bus.read("doomed") == []
    assert await bus.stream_length("kept") == 1
    await bus.delete_stream("doomed")  # idempotent
    await bus.append("doomed", b"reborn")
    assert [e.data for e in await bus.read("doomed")] == [b"reborn"]


async def test_binary_payloads_round_trip_through_streams(bus: Bus) -> None:
    await bus.append("bin", BINARY)
    await bus.append("bin", b"")
    assert [e.data for e in await bus.read("bin")] == [BINARY, b""]


@pytest.mark.parametrize(
    ("after", "count", "block"),
    [("$", 10, None), ("not-an-id", 10, None), ("1-x", 10, None), ("0", 0, None), ("0", 1, -1.0)],
)
async def test_read_rejects_bad_arguments(
    bus: Bus, after: str, count: int, block: float | None
) -> None:
    with pytest.raises(ValueError):
        await bus.read("log", after=after, count=count, block=block)


async def test_append_rejects_maxlen_below_one(bus: Bus) -> None:
    with pytest.raises(ValueError):
        await bus.append("log", b"x", maxlen=0)


async def test_append_many_returns_ids_in_order_and_read_returns_the_entries(bus: Bus) -> None:
    first = await bus.append("left", b"before")
    batch = [(stream, f"{stream} {n}".encode()) for n in range(25) for stream in ("left", "right")]
    ids = await bus.append_many(batch)
    last = await bus.append("left", b"after")
    assert len(ids) == len(batch)
    assert all(entry_id.count("-") == 1 for entry_id in ids)
    left_ids, right_ids = ids[0::2], ids[1::2]
    for stream_ids in ([first, *left_ids, last], right_ids):
        keys = [parse_stream_id(entry_id) for entry_id in stream_ids]
        assert all(earlier < later for earlier, later in zip(keys, keys[1:], strict=False))
    left = await bus.read("left")
    assert [(e.id, e.data) for e in left] == [
        (first, b"before"),
        *((entry_id, f"left {n}".encode()) for n, entry_id in enumerate(left_ids)),
        (last, b"after"),
    ]
    right = await bus.read("right")
    assert [(e.id, e.data) for e in right] == [
        (entry_id, f"right {n}".encode()) for n, entry_id in enumerate(right_ids)
    ]


async def test_append_many_keeps_binary_payloads(bus: Bus) -> None:
    ids = await bus.append_many([("bin", BINARY), ("bin", b""), ("bin", BINARY)])
    assert [(e.id, e.data) for e in await bus.read("bin")] == list(
        zip(ids, [BINARY, b"", BINARY], strict=True)
    )


async def test_append_many_of_nothing_appends_nothing(bus: Bus) -> None:
    assert await bus.append_many([]) == []
    assert await bus.append_many([], maxlen=3) == []
    await bus.append("log", b"only")
    assert [e.data for e in await bus.read("log")] == [b"only"]


async def test_append_many_maxlen_trims_each_stream_exactly(bus: Bus) -> None:
    await bus.append_many([("capped", b"old 0"), ("capped", b"old 1"), ("short", b"old")])
    await bus.append_many([("untouched", str(n).encode()) for n in range(8)])
    batch = [("capped", f"new {n}".encode()) for n in range(12)]
    batch[3:3] = [("short", b"new")]
    ids = await bus.append_many(batch, maxlen=5)
    capped_ids = [
        entry_id for entry_id, (stream, _) in zip(ids, batch, strict=True) if stream == "capped"
    ]
    assert await bus.stream_length("capped") == 5
    capped = await bus.read("capped")
    assert [(e.id, e.data) for e in capped] == [
        (entry_id, f"new {n}".encode()) for n, entry_id in enumerate(capped_ids) if n >= 7
    ]
    assert [e.data for e in await bus.read("short")] == [b"old", b"new"]
    assert await bus.stream_length("untouched") == 8
    later = await bus.append("capped", b"later", maxlen=5)
    assert parse_stream_id(later) > parse_stream_id(capped_ids[-1])


@pytest.mark.parametrize("maxlen", [0, -1])
@pytest.mark.parametrize("entries", [[], [("log", b"x"), ("other", b"y")]])
async def test_append_many_rejects_maxlen_below_one_before_appending(
    bus: Bus, maxlen: int, entries: list[tuple[str, bytes]]
) -> None:
    with pytest.raises(ValueError):
        await bus.append_many(entries, maxlen=maxlen)
    assert await bus.stream_length("log") == 0
    assert await bus.stream_length("other") == 0


async def test_blocking_read_wakes_when_append_many_appends(bus: Bus) -> None:
    reader = asyncio.create_task(bus.read("fresh", block=ARRIVES_WITHIN))
    await asyncio.sleep(0.05)
    assert not reader.done(), "a blocking read on an empty stream returned early"
    ids = await bus.append_many([("fresh", b"1"), ("elsewhere", b"x"), ("fresh", b"2")])
    entries = await asyncio.wait_for(reader, ARRIVES_WITHIN)
    # The reader may be served after the first XADD or after both: a prefix, oldest first.
    expected = [(ids[0], b"1"), (ids[2], b"2")]
    assert entries and [(e.id, e.data) for e in entries] == expected[: len(entries)]


async def test_ping(bus: Bus) -> None:
    await bus.ping()


# --- Redis only ------------------------------------------------------------------------------


async def test_redis_prefixes_isolate_deployments(
    redis_url: str, redis_prefix: Callable[[], str]
) -> None:
    ours, theirs = (RedisBus(redis_url, prefix=redis_prefix()) for _ in range(2))
    try:
        async with ours.subscribe("shared") as subscription:
            await theirs.publish("shared", b"theirs")
            await ours.publish("shared", b"ours")
            assert (await receive(subscription, 1))[0].data == b"ours"
            assert await subscription.get(timeout=QUIET_PERIOD) is None
        async with ours.subscribe("shared") as subscription:
            await theirs.publish_many([("shared", b"theirs")])
            await ours.publish_many([("shared", b"ours")])
            assert (await receive(subscription, 1))[0].data == b"ours"
            assert await subscription.get(timeout=QUIET_PERIOD) is None
        await theirs.append("stream", b"theirs")
        await theirs.append_many([("stream", b"theirs too")])
        assert await ours.stream_length("stream") == 0
        assert await ours.read("stream") == []
        await ours.delete_stream("stream")
        assert await theirs.stream_length("stream") == 2
    finally:
        await ours.close()
        await theirs.close()


async def test_unreachable_redis_raises_service_unavailable() -> None:
    bus = RedisBus(UNREACHABLE_REDIS_URL, prefix="peergpu-test-unreachable:")
    try:
        operations: list[Callable[[], Awaitable[object]]] = [
            bus.ping,
            lambda: bus.publish("channel", b"x"),
            lambda: bus.publish_many([("channel", b"x"), ("other", b"y")]),
            lambda: bus.append("stream", b"x"),
            lambda: bus.append_many([("stream", b"x"), ("other", b"y")]),
            lambda: bus.append_many([("stream", b"x")], maxlen=5),
            lambda: bus.read("stream"),
            lambda: bus.read("stream", block=0.1),
            lambda: bus.stream_length("stream"),
            lambda: bus.delete_stream("stream"),
        ]
        for operation in operations:
            with pytest.raises(ServiceUnavailable) as caught:
                await operation()
            assert caught.value.message == "Redis is unreachable"
            assert caught.value.details["operation"]
        with pytest.raises(ServiceUnavailable):
            async with bus.subscribe("channel"):
                pytest.fail("subscribed to an unreachable Redis")
    finally:
        await bus.close()


async def test_unreachable_redis_names_the_batch_operation() -> None:
    bus = RedisBus(UNREACHABLE_REDIS_URL, prefix="peergpu-test-unreachable:")
    try:
        with pytest.raises(ServiceUnavailable) as caught:
            await bus.publish_many([("channel", b"x")])
        assert caught.value.details["operation"] == "publish_many"
        with pytest.raises(ServiceUnavailable) as caught:
            await bus.append_many([("stream", b"x")])
        assert caught.value.details["operation"] == "append_many"
        # Empty batches never reach Redis, so they succeed even though it is unreachable.
        await bus.publish_many([])
        assert await bus.append_many([]) == []
    finally:
        await bus.close()


async def test_redis_append_many_sends_the_whole_batch_and_reports_a_rejected_entry(
    redis_url: str, redis_prefix: Callable[[], str]
) -> None:
    """One pipeline: Redis runs every XADD even when one of them fails, and the failure surfaces
    as ``ServiceUnavailable("Redis command failed")`` like any other rejected command."""
    prefix = redis_prefix()
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(f"{prefix}not-a-stream", b"plain string")
    finally:
        client.close()
    bus = RedisBus(redis_url, prefix=prefix)
    try:
        with pytest.raises(ServiceUnavailable) as caught:
            await bus.append_many([("log", b"1"), ("not-a-stream", b"x"), ("log", b"2")])
        assert caught.value.message == "Redis command failed"
        assert caught.value.details["operation"] == "append_many"
        assert [e.data for e in await bus.read("log")] == [b"1", b"2"]
    finally:
        await bus.close()


# --- factory -------------------------------------------------------------------------------


async def test_create_bus_follows_settings() -> None:
    in_process = create_bus(ServerSettings(redis_url=""))
    assert isinstance(in_process, InProcessBus)
    await in_process.close()
    redis_bus = create_bus(
        ServerSettings(redis_url=UNREACHABLE_REDIS_URL, redis_prefix="peergpu-test-factory:")
    )
    assert isinstance(redis_bus, RedisBus)
    await redis_bus.close()


async def test_cancelling_a_waiting_reader_always_stops_it(bus: Bus) -> None:
    """A task blocked in ``get(timeout=...)`` ends when cancelled, whatever the moment: a loop
    around ``get`` (the scheduler's, the hub's) must never outlive its cancellation."""
    async with bus.subscribe("cancel-me") as subscription:

        async def loop() -> None:
            while True:
                await subscription.get(timeout=0.05)

        for attempt in range(40):
            task = asyncio.create_task(loop())
            await asyncio.sleep(0.001 + (attempt % 10) * 0.007)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2)
            assert done, f"the reader outlived its cancellation (attempt {attempt})"
            assert task.cancelled()


async def test_hundreds_of_subscriptions_at_once(bus: Bus) -> None:
    """One subscription per connected agent: a replica holds hundreds (redis-py's default pool
    of 100 connections once capped a replica at 98 agents)."""
    async with contextlib.AsyncExitStack() as stack:
        subscriptions = [
            await stack.enter_async_context(bus.subscribe(f"many-{n}")) for n in range(150)
        ]
        for n in (0, 77, 149):
            await bus.publish(f"many-{n}", b"hi")
            message = await subscriptions[n].get(timeout=5)
            assert message is not None and message.data == b"hi"

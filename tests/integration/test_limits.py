"""The account's quotas in RabbitMQ, exercised on a real broker: permits per minute, running slots and
daily tokens shared exactly by several replicas (each its own connection), the reconciliation of
permits a dead replica left, and the election of the one replica that reconciles."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from contracts.api import MAX_TOKENS
from tests.factories import tier_settings
from tests.integration.conftest import rabbitmqctl
from worker import topology
from worker.errors import LimitReached
from worker.job_ids import JobIds
from worker.leader import Leadership
from worker.limits import Permits, TierLimits
from worker.metrics import Metrics
from worker.settings import Settings

pytestmark = [pytest.mark.broker]


Replica = Callable[..., Any]


class Clock:
    """The replicas' monotonic clock, moved by hand: a refused permit pauses its replica for a moment."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def pass_pauses(self) -> None:
        self.now += 60


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def replica(vhost: str, clock: Clock) -> AsyncIterator[Replica]:
    """Factory: the limits of one tier as one replica holds them (a connection of its own)."""
    connections: list[aio_pika.abc.AbstractRobustConnection] = []

    async def make(minute: float = 60.0, reconcile_window_seconds: float = 60.0, **fields: Any) -> TierLimits:
        connection = await aio_pika.connect_robust(vhost)
        connections.append(connection)
        limits = TierLimits(
            "default",
            # No limit but the ones a test names.
            tier_settings(**{"rpm": None, "max_in_flight": None, "queue_ahead": 0, **fields}),
            minute_seconds=minute,
            reconcile_window_seconds=reconcile_window_seconds,
            clock=clock,
        )
        await limits.attach(Permits(connection))
        return limits

    yield make
    for connection in connections:
        await connection.close()


async def attempt(limits: TierLimits, tokens: int = 1, *, keep: bool = True) -> bool:
    """One submit's worth of permits: True when granted (and kept), False when a limit was full."""
    try:
        async with limits.slot(tokens) as slot:
            if keep:
                slot.keep()
    except LimitReached:
        return False
    return True


async def test_running_slots_are_shared_exactly_by_replicas_and_freed_at_once(replica: Replica, clock: Clock) -> None:
    replicas = [await replica(max_in_flight=5, queue_ahead=2) for _ in range(3)]
    granted = await asyncio.gather(*(attempt(replicas[i % 3]) for i in range(30)))
    assert sum(granted) == 7, "max_in_flight + queue_ahead, across all replicas at once"
    assert await replicas[0].slots_taken() == 7
    assert replicas[2].wait_time() > 0, "a replica refused pauses before it tries again"
    await replicas[1].task_ended()  # a task ends on one replica...
    clock.pass_pauses()
    assert await attempt(replicas[2]), "...and its slot is another replica's at once"
    assert not await attempt(replicas[0]), "full again"


async def test_replicas_starting_together_fill_a_new_pool_once(vhost: str) -> None:
    """Each finds the pool missing; only the one whose claim the job-id stream holds first fills it (each
    filled it before: 2 to 3 times the running limit, passed until the leader's recount took the
    surplus off)."""
    connections = [await aio_pika.connect_robust(vhost) for _ in range(3)]
    channel = await connections[0].channel()
    await topology.declare(channel, Settings())
    remembered = [JobIds(Metrics(CollectorRegistry())) for _ in connections]
    await asyncio.gather(*(ids.open(c, lambda: False) for ids, c in zip(remembered, connections, strict=True)))
    for capacity in range(4, 9):  # each a new pool
        replicas = [
            TierLimits("default", tier_settings(rpm=None, max_in_flight=capacity, queue_ahead=0)) for _ in connections
        ]
        await asyncio.gather(
            *(
                limits.attach(Permits(c), ids.claim)
                for limits, c, ids in zip(replicas, connections, remembered, strict=True)
            )
        )
        declared = await (await channel.get_underlay_channel()).queue_declare(replicas[0].slots_queue, passive=True)
        assert declared.message_count == capacity
    for ids in remembered:
        await ids.close()
    for connection in connections:
        await connection.close()


async def test_a_pool_another_replica_is_still_creating_is_filled_in_full(vhost: str) -> None:
    """A quorum queue declared by one connection answers another's declare at once and nacks publishes
    until its members have started: the filler lost its first permit that way (CI saw a pool of 7 hold 6).
    The creator starts 0.1 ms later each round, so that some rounds land its declare between the filler's
    check for the pool and the filler's own declare (here about 8 ms in)."""
    creator, filler = await aio_pika.connect_robust(vhost), await aio_pika.connect_robust(vhost)
    channel = await (await creator.channel()).get_underlay_channel()  # a robust one answers from its cache
    filled = 0
    try:
        for round_ in range(200):
            limits = TierLimits("default", tier_settings(rpm=None, max_in_flight=7, queue_ahead=0))

            async def create(pool: str = limits.slots_queue, delay: float = round_ / 10_000) -> None:
                await asyncio.sleep(delay)
                await channel.queue_declare(pool, durable=True, arguments=topology.QUORUM)

            await asyncio.gather(create(), limits.attach(Permits(filler)))
            held = (await channel.queue_declare(limits.slots_queue, passive=True)).message_count
            assert held in (0, limits.capacity), f"round {round_}: {held} of {limits.capacity}"
            filled += held > 0
            await channel.queue_delete(limits.slots_queue)
        assert filled, "the filler found the pool missing in some rounds"
    finally:
        await creator.close()
        await filler.close()


async def test_a_submit_that_does_not_keep_its_slot_gives_it_back(replica: Replica) -> None:
    limits = await replica(max_in_flight=1)
    assert await attempt(limits, keep=False)
    assert await limits.slots_taken() == 0
    assert await attempt(limits, keep=True)
    assert not await attempt(limits)


async def test_the_per_minute_window_is_exact_and_slides(replica: Replica, clock: Clock) -> None:
    first, second = await replica(rpm=6, minute=1.0), await replica(rpm=6, minute=1.0)
    granted = await asyncio.gather(*(attempt(r) for r in [first, second] * 6))
    assert sum(granted) == 6
    assert await first.submits_last_minute() == 6
    clock.pass_pauses()

    async def window_passed() -> bool:
        return await first.submits_last_minute() == 0

    for _ in range(60):
        if await window_passed():
            break
        await asyncio.sleep(0.05)
    assert await window_passed(), "every permit expires with its minute"
    assert sum(await asyncio.gather(*(attempt(r) for r in [first, second] * 6))) == 6


async def test_a_refused_rate_permit_gives_the_slot_back(replica: Replica) -> None:
    limits = await replica(rpm=1, max_in_flight=5)
    assert await attempt(limits)
    assert not await attempt(limits)
    assert await limits.slots_taken() == 1, "only the granted submit holds a slot"


async def test_the_daily_token_budget_is_shared_and_never_exceeded(replica: Replica, clock: Clock) -> None:
    # A quorum queue refuses only once over its limit: the limit is one largest request under the budget.
    budget = 2 * MAX_TOKENS + 100
    first, second = await replica(daily_tokens=budget), await replica(daily_tokens=budget)
    assert await attempt(first, MAX_TOKENS)
    assert await attempt(second, MAX_TOKENS)
    assert not await attempt(first, MAX_TOKENS), "a third would pass the budget"
    clock.pass_pauses()
    assert not await attempt(second, 50), "within the last largest request of the budget: refused, never over"
    clock.pass_pauses()
    assert not await attempt(first, 1), "still spent after the pause: the budget is the day's"


async def test_permits_a_dead_replica_left_are_reclaimed_and_missing_ones_restored(replica: Replica) -> None:
    limits = await replica(max_in_flight=4, reconcile_window_seconds=0.5)
    for _ in range(4):
        assert await attempt(limits)  # four permits; only two tasks really run
    for _ in range(8):
        await limits.reconcile(in_flight=2)
        await asyncio.sleep(0.1)
    assert await limits.slots_taken() == 2, "the two nobody holds are gone"
    await limits.task_ended()
    await limits.task_ended()  # handled twice: one permit too few for the two tasks
    for _ in range(3):
        await limits.reconcile(in_flight=2)
    assert await limits.slots_taken() == 2


async def test_permits_of_submits_in_progress_are_not_taken_for_leaks_while_the_tier_has_room(
    replica: Replica,
) -> None:
    limits = await replica(max_in_flight=10, reconcile_window_seconds=0.3)
    for _ in range(3):
        assert await attempt(limits)
    for _ in range(6):
        await limits.reconcile(in_flight=1)
        await asyncio.sleep(0.1)
    assert await limits.slots_taken() == 3, "not full: nothing to reclaim yet"


async def test_one_replica_leads_and_another_takes_over_when_it_goes(vhost: str) -> None:
    connections = [await aio_pika.connect_robust(vhost) for _ in range(3)]
    replicas = [Leadership() for _ in connections]

    async def leaders() -> list[int]:
        for _ in range(50):
            held = [i for i, (r, c) in enumerate(zip(replicas, connections, strict=True)) if await r.claim(c)]
            if held:
                return held
            await asyncio.sleep(0.1)
        return []

    try:
        first = await leaders()
        assert len(first) == 1, "one leader at a time"
        for _ in range(5):
            assert await leaders() == first, "the leader keeps leading"
        await connections[first[0]].close()
        replicas.pop(first[0]), connections.pop(first[0])
        second = await leaders()
        assert len(second) == 1, "another replica took over"
    finally:
        for connection in connections:
            await connection.close()


async def test_replicas_that_wait_for_the_leadership_cause_no_broker_errors(vhost: str) -> None:
    """Waiting replicas neither have declares refused nor channels closed (the exclusive queue of old
    made each of them fail a declare every second)."""
    connections = [await aio_pika.connect_robust(vhost) for _ in range(3)]
    replicas = [Leadership() for _ in connections]
    closed: list[object] = []
    try:
        for _ in range(20):
            for replica, connection in zip(replicas, connections, strict=True):
                await replica.claim(connection)
            await asyncio.sleep(0.05)
        for replica in replicas:
            assert replica._channel is not None
            channel = await replica._channel.get_underlay_channel()
            channel.closing.add_done_callback(closed.append)
        for _ in range(20):
            for replica, connection in zip(replicas, connections, strict=True):
                await replica.claim(connection)
            await asyncio.sleep(0.05)
        assert sum(r.leader for r in replicas) == 1
        assert closed == [], "no channel was closed by the broker"
    finally:
        for connection in connections:
            await connection.close()


async def test_a_slot_given_back_while_the_connection_is_lost_is_owed_until_it_returns(vhost: str) -> None:
    """A submit that did not keep its slot met a connection being restored: the slot is owed, not lost
    until the leader's window has passed (a minute of a tier held back), and given back once."""
    name = f"permits-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect_robust(vhost, client_properties={"connection_name": name})
    try:
        limits = TierLimits("default", tier_settings(rpm=None, max_in_flight=2, queue_ahead=0))
        await limits.attach(Permits(connection))
        assert await attempt(limits)  # one task runs
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        async with limits.slot(1):  # a second submit takes the other slot, and fails meanwhile
            assert await limits.slots_taken() == 2
            for line in rabbitmqctl("list_connections", "--no-table-headers", "pid", "client_properties").splitlines():
                if name in line:
                    rabbitmqctl("close_connection", line.split("\t")[0], "test: connection loss")
            await asyncio.wait_for(lost.wait(), 10)
        await asyncio.wait_for(connection.connected.wait(), 30)
        for _ in range(100):
            await limits.check()
            if limits.unreachable is None and await limits.slots_taken() == 1:
                break
            await asyncio.sleep(0.1)
        assert await limits.slots_taken() == 1, "the owed slot is back, without any leader"
        await limits.check()
        assert await limits.slots_taken() == 1, "given back once: the running task still holds its own"
    finally:
        await connection.close()

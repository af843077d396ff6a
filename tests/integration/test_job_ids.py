"""The remembered job ids on a real broker: the stream, its snapshots, cancels landing in it, and a
replica resuming after its connection was lost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiormq.abc import DeliveredMessage
from prometheus_client import CollectorRegistry

from contracts.brokers import ClusterConnection
from contracts.client import Client
from tests.integration.conftest import rabbitmqctl, wait_for
from worker import topology
from worker.job_ids import JobIds, Known
from worker.metrics import Metrics
from worker.settings import Settings
from worker.topology import IDS_STREAM, SNAPSHOT_STREAM

pytestmark = [pytest.mark.broker]


@pytest.fixture
async def connect(vhost: str) -> AsyncIterator[Callable[[], asyncio.Future[ClusterConnection]]]:
    opened: list[ClusterConnection] = []

    async def open_() -> ClusterConnection:
        connection = ClusterConnection([vhost], reconnect_interval=0.2)
        await connection.connect(timeout=10)
        opened.append(connection)
        return connection

    first = await open_()
    channel = await first.channel()
    await topology.declare(channel, Settings())
    await channel.close()
    yield open_  # type: ignore[misc]
    for connection in opened:
        await connection.close()


async def remembered(connection: ClusterConnection, leads: bool = False) -> JobIds:
    ids = JobIds(Metrics(CollectorRegistry()))
    await asyncio.wait_for(ids.open(connection, lambda: leads), timeout=30)
    return ids


async def snapshots(connection: ClusterConnection) -> int:
    channel = await connection.channel()
    try:
        declared = await (await channel.get_underlay_channel()).queue_declare(SNAPSHOT_STREAM, passive=True)
        return declared.message_count or 0
    finally:
        await channel.close()


async def test_a_new_replica_starts_from_the_snapshot_and_reads_the_records_after_it(
    vhost: str, connect: Callable[[], asyncio.Future[ClusterConnection]]
) -> None:
    connection = await connect()
    first = await remembered(connection, leads=True)
    await first.taken("a", 11)
    await first.ended("a")
    first.apply("in-snapshot-only", 1)  # never recorded: only the snapshot can tell another replica
    await first.taken("d", 33)
    assert await first.freed("d")  # on to the copy stage
    assert await first.snapshot() > 0
    await first.taken("b", 22)
    assert await first.freed("e")  # after the snapshot: read as a record
    async with await Client.connect(vhost) as client:
        await client.cancel("c", "no longer wanted")
    await wait_for(lambda: first.known("c").cancelled, what="the cancel read by the first replica")
    await wait_for(lambda: snapshots(connection), what="the broker counting the snapshot")

    second = await remembered(await connect())
    assert second.known("a") == Known(taken=True, ended=True, take=11)
    assert second.known("in-snapshot-only").taken
    assert second.known("b") == Known(taken=True, take=22)
    assert second.known("d") == Known(taken=True, take=33, freed=True)
    assert second.known("e") == Known(taken=True, freed=True)
    assert not await second.freed("d"), "a copy of its state after a lost ack frees nothing"
    assert second.known("c") == Known(cancelled=True, reason="no longer wanted")
    assert second.known("never") == Known()
    await first.close()
    await second.close()


async def test_a_replica_without_any_snapshot_reads_the_stream_from_its_start(
    connect: Callable[[], asyncio.Future[ClusterConnection]],
) -> None:
    first = await remembered(await connect())
    for n in range(50):
        await first.taken(f"job-{n}", n + 1)
    second = await remembered(await connect())
    assert len(second) == 50
    assert second.known("job-49").take == 50
    await first.close()
    await second.close()


async def test_after_a_lost_connection_a_replica_is_not_current_until_it_has_read_what_it_missed(
    vhost: str, connect: Callable[[], asyncio.Future[ClusterConnection]]
) -> None:
    writer = await remembered(await connect())
    reader = await remembered(await connect())
    await writer.taken("before", 1)
    await wait_for(lambda: reader.known("before").taken, what="the record read live")
    name = vhost.rsplit("/", 1)[1]
    rabbitmqctl("close_all_connections", "-p", name, "a test closes every connection")
    await wait_for(lambda: not reader.current, what="the reader no longer current")
    await wait_for(lambda: writer.current, timeout=30, what="the writer current again")
    await writer.taken("while-away", 2)
    await wait_for(lambda: reader.current, timeout=30, what="the reader current again")
    await wait_for(lambda: reader.known("while-away").taken, what="the record written meanwhile")
    assert reader.known("before").taken
    await writer.close()
    await reader.close()


async def test_of_two_replicas_recording_one_jobs_end_at_once_exactly_one_is_first(
    connect: Callable[[], asyncio.Future[ClusterConnection]],
) -> None:
    """Two handlings of one task's end (a state whose ack was lost, and the state that replaced it): only
    the one whose record the stream holds first frees the task's running slot, on whichever replica."""
    one = await remembered(await connect())
    two = await remembered(await connect())
    for n in range(20):
        firsts = await asyncio.gather(one.ended(f"end-{n}"), two.ended(f"end-{n}"))
        assert sorted(firsts) == [False, True], f"end-{n}: {firsts}"
    assert await one.ended("end-0") is False  # a later copy, long after
    await one.close()
    await two.close()


async def test_a_claim_wins_once_per_round_and_a_later_round_starts_afresh(
    connect: Callable[[], asyncio.Future[ClusterConnection]],
) -> None:
    """Replicas that start together agree on one filler of a new permit pool; a pool deleted and declared
    again later is filled again."""
    one = await remembered(await connect())
    two = await remembered(await connect())
    now = [1000.0]
    one._clock = two._clock = lambda: now[0]
    firsts = await asyncio.gather(one.claim("pool"), two.claim("pool"), one.claim("pool"))
    assert sorted(firsts) == [False, False, True]
    now[0] += 31  # past CLAIM_SECONDS: the pool was deleted and is declared again
    assert await two.claim("pool") is True
    assert await one.claim("pool") is False
    await one.close()
    await two.close()


async def test_records_read_are_acknowledged_soon_even_when_few(
    vhost: str, connect: Callable[[], asyncio.Future[ClusterConnection]]
) -> None:
    """A stream's records count against the reader's prefetch until acked; acked only every ACK_EVERY
    records, a quiet replica's reader would hold its last few for ever (and stop reading at PREFETCH)."""
    ids = await remembered(await connect())
    for n in range(3):
        assert await ids.taken(f"few-{n}", n + 1)
    name = vhost.rsplit("/", 1)[1]

    def held() -> int:
        lines = (
            line.split("\t") for line in rabbitmqctl("list_channels", "vhost", "messages_unacknowledged").splitlines()
        )
        return sum(int(fields[1]) for fields in lines if len(fields) == 2 and fields[0] == name)

    await wait_for(lambda: held() == 0, what="the reader to ack the records it read")
    await ids.close()


async def stream_records(connection: ClusterConnection, wanted: Callable[[list[dict[str, Any]]], bool]) -> list[int]:
    """Read the ids stream from its start until the records in it satisfy `wanted`: how many records each
    job-record message held (a single record counts 1, a batch its length)."""
    channel = await (await connection.channel()).get_underlay_channel()
    records: list[dict[str, Any]] = []
    sizes: list[int] = []

    async def on_message(message: DeliveredMessage) -> None:
        record = json.loads(message.body)
        held = record["records"] if record.get("record") == "batch" else [record]
        held = [r for r in held if r.get("record") in ("taken", "ended", "freed")]
        if held:
            records.extend(held)
            sizes.append(len(held))
        await channel.basic_ack(message.delivery_tag or 0)

    await channel.basic_qos(prefetch_count=1000)
    await channel.basic_consume(IDS_STREAM, on_message, arguments={"x-stream-offset": "first"})
    try:
        await wait_for(lambda: wanted(records), what="the records in the stream")
    finally:
        await channel.close()
    return sizes


async def test_records_made_at_once_go_out_together_and_every_replica_reads_each_in_order(
    connect: Callable[[], asyncio.Future[ClusterConnection]],
) -> None:
    """A flood of jobs taken at once costs the stream (and every replica reading it) one message per
    confirm's round trip, not one per record, and the order within a batch is the order of the stream:
    of two copies taken in one batch, the first goes on, on every replica."""
    connection = await connect()
    one = await remembered(connection)
    two = await remembered(await connect())
    firsts = await asyncio.gather(
        one.taken("copy", 1), one.taken("copy", 2), *(one.taken(f"flood-{n}", n + 1) for n in range(300))
    )
    assert firsts[:2] == [True, False]
    assert all(firsts[2:])
    await wait_for(lambda: all(two.known(f"flood-{n}").take == n + 1 for n in range(300)), what="the other replica")
    assert two.known("copy").take == 1
    sizes = await stream_records(connection, lambda records: len(records) >= 302)
    assert sum(sizes) == 302
    assert len(sizes) < 302 / 10, f"{len(sizes)} messages for 302 records: {sizes}"
    await one.close()
    await two.close()

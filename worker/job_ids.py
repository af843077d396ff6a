"""The job ids every replica remembers for 72 h (the longest execution window), across restarts: which
jobs were taken, which ended, which a producer cancelled. Nothing beyond RabbitMQ holds them.

    seedance.jobs --job.cancel--> seedance.jobs.ids (stream, 72 h) <-- "taken" / "ended" records of the
                                        |                              replicas (default exchange)
                                        +--> every replica reads it from its snapshot's offset (or the
                                             start) and then live, keeping one small int per id
    seedance.jobs.ids.snapshots (stream, hours): the leader's snapshot of every id, with the offset of
                                             the last record it covers, every SNAPSHOT_SECONDS

A stream is a replicated, append-only log that every consumer reads on its own (nothing is taken off
it); `x-max-age` drops whole segments older than the retention, so every record is kept at least that
long. A producer's cancel lands in it directly, so a cancel is remembered even before its job arrives
and while no worker runs.

A replica is *current* once it has read back a mark it published itself: everything in the stream
before the mark has been applied. It takes no job before that (at start-up, and again after a lost
connection, when it resumes from the last offset it applied). Reading 300,000 records one by one costs
about 15 s of CPU in aiormq; the snapshot makes start-up the snapshot (one message) plus the records
written since it.

A record is published (confirmed) before the job's first submit, and read back from the stream before
the submit goes out: when a record of another copy of the job comes first in the stream, this copy is the
duplicate. A copy that arrives after the first's record was read is known at once. Both hold on every
replica, since all read one stream in one order (see the README for the case that is not covered: a copy
that RabbitMQ itself hands out again, its holder dead, while the first is still being submitted).

A task's end is recorded the same way (`ended`, after its terminal event's confirm, read back): a task's
end can be handled twice, when a tracking state whose ack was lost with its connection comes back beside
the state that replaced it, and only the handling whose record the stream holds first frees the task's
running slot; a copy that finds its job ended is dropped unpolled. Where the end of the task is not the end
of the job (the video goes on to the copy stage; a cancelled job's task, followed until it ends), a `freed`
record plays that part for the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.common import FieldTable, FieldValue
from pydantic import ValidationError

from contracts import validation_message
from contracts.messages import CANCEL_ROUTING_KEY, DEAD_LETTER_QUEUE, JOBS_EXCHANGE, CancelRequest
from worker.metrics import Metrics
from worker.topology import IDS_STREAM, SNAPSHOT_STREAM

log = logging.getLogger(__name__)

RETENTION_SECONDS = 72 * 3600
# The stream keeps a day more than promised: x-max-age drops whole segments, and a replica replaying a
# snapshot must still find every record written after it.
IDS_ARGUMENTS: dict[str, FieldValue] = {
    "x-queue-type": "stream",
    "x-max-age": "96h",
    "x-stream-max-segment-size-bytes": 16_000_000,
}
SNAPSHOT_ARGUMENTS: dict[str, FieldValue] = {
    "x-queue-type": "stream",
    "x-max-age": "12h",
    "x-stream-max-segment-size-bytes": 50_000_000,
}
SNAPSHOT_SECONDS = 600.0  # the leader writes a snapshot this often when records came in since the last
SNAPSHOT_WAIT_SECONDS = 30.0  # for the newest snapshot, when the broker counts one
SNAPSHOT_UNCOUNTED_WAIT_SECONDS = 1.0  # when it counts none (its count lags)
SNAPSHOT_ATTEMPTS = 20  # a stream's member on this node not running yet (a cluster), tried this often
SNAPSHOT_RETRY_SECONDS = 0.5
SNAPSHOT_MAX_BYTES = 12 * 1024 * 1024
SNAPSHOT_CHUNK = 1024 * 1024  # under RabbitMQ 4.x's default max_message_size (16 MiB)
PREFETCH = 2000
ACK_EVERY = 500
ACK_DELAY = 0.05  # seconds
TAKE_HEADER = "x-seedance-take"
CLAIM_SECONDS = 30.0  # claims this close to the winning one are the same round (replicas starting together)
BATCH_MAX = 500  # records in one message of the stream, at most (about 50 kB)
READ_BACK_SECONDS = 10.0  # a taken record not read back by then: the delivery fails, and is tried again

# One int per id: flags in the low bits, the minute it was first seen above them, then the take token, and
# above it FREED (a `freed` record): a version before FREED reads only a freed job's take token wrong, and
# every copy of such a job is one all the same.
TAKEN, ENDED, CANCELLED = 1, 2, 4
_FLAGS = 3
_MINUTE_BITS = 27
_TAKE_SHIFT = _FLAGS + _MINUTE_BITS
_TAKE_MASK = (1 << 32) - 1  # new_take() is at most 2**31
FREED = 1 << (_TAKE_SHIFT + 32)
_LOW = (1 << _FLAGS) - 1


_TOKEN_FIELDS = {"taken": "take", "ended": "end", "freed": "free"}  # a job record's kind: its token's field


def new_take() -> int:
    """A token naming one taking of a job message: the record carries it, and so does the job message the
    worker puts back in its queue, so the worker knows its own job from a producer's copy."""
    return secrets.randbits(31) + 1


@dataclass(frozen=True, slots=True)
class Known:
    """What the replicas know of one job id."""

    taken: bool = False
    ended: bool = False
    cancelled: bool = False
    take: int = 0
    reason: str | None = None
    freed: bool = False  # a `freed` record: the task's end was handled before its job's end

    def duplicate(self, take: int | None, redelivered: bool) -> bool:
        """Whether a job message with this id is a copy of a job already taken: its own message put back
        by the worker carries the take token of the record; one RabbitMQ hands out again (its holder died
        before it was replaced) carries none and goes on, as it did before these records existed."""
        if self.ended:
            return True
        if not self.taken:
            return False
        if take is not None:
            return take != self.take
        return not redelivered


def _pack(flags: int, minute: int, take: int) -> int:
    return (flags & FREED) | (take << _TAKE_SHIFT) | (minute << _FLAGS) | (flags & _LOW)


def _minute(value: int) -> int:
    return (value >> _FLAGS) & ((1 << _MINUTE_BITS) - 1)


class JobIds:
    """The remembered ids of this replica, kept current from the stream (see the module's docstring)."""

    def __init__(self, metrics: Metrics, *, clock: Callable[[], float] = time.time) -> None:
        self._metrics = metrics
        self._clock = clock
        self._ids: dict[str, int] = {}
        self._reasons: dict[str, str | None] = {}  # cancels only: a few, with their reason text
        self._connection: AbstractRobustConnection | None = None
        self._offset = -1  # the last record applied
        self._snapshot_offset = -1  # the last record the newest snapshot covers
        self._mark: str | None = None
        self._caught_up = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._publisher: aiormq.abc.AbstractChannel | None = None
        self._leads: Callable[[], bool] = lambda: False
        # A record of this replica waiting to be read back, by (kind, job id or name, token): the answer.
        self._reading_back: dict[tuple[str, str, int], asyncio.Future[bool]] = {}
        self._claims: dict[str, tuple[int, float]] = {}  # name -> the winning claim and its time
        # Records waiting for the publish in flight to be confirmed, to go out together in one message.
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._sending: asyncio.Task[None] | None = None
        self.replay_seconds: float | None = None
        self.snapshot_ids: int | None = None  # how many ids the snapshot started from held (None: no snapshot)

    # What the replicas know
    @property
    def current(self) -> bool:
        """Whether every record in the stream up to a mark published by this replica has been applied."""
        return self._caught_up.is_set()

    def __len__(self) -> int:
        return len(self._ids)

    def known(self, job_id: str) -> Known:
        value = self._ids.get(job_id)
        if value is None:
            return Known()
        return Known(
            taken=bool(value & TAKEN),
            ended=bool(value & ENDED),
            cancelled=bool(value & CANCELLED),
            take=(value >> _TAKE_SHIFT) & _TAKE_MASK,
            reason=self._reasons.get(job_id),
            freed=bool(value & FREED),
        )

    def apply(self, job_id: str, flags: int, take: int = 0, reason: str | None = None) -> int:
        """Add what a record says; returns the flags the id had before. Records only ever add facts, so
        the order they are read in (snapshot, replay, live) does not matter."""
        before = self._ids.get(job_id)
        if before is None:
            minute = int(self._clock() // 60)
            self._ids[job_id] = _pack(flags, minute, take)
            old = 0
        else:
            old = before & (FREED | _LOW)
            kept = (before >> _TAKE_SHIFT) & _TAKE_MASK
            self._ids[job_id] = _pack(old | flags, _minute(before), kept or take)
        if flags & CANCELLED:
            self._reasons[job_id] = reason
        return old

    def forget_older(self, seconds: float = RETENTION_SECONDS) -> int:
        """Drop ids first seen longer than `seconds` ago; returns how many."""
        oldest = int((self._clock() - seconds) // 60)
        stale = [job_id for job_id, value in self._ids.items() if _minute(value) < oldest]
        for job_id in stale:
            del self._ids[job_id]
            self._reasons.pop(job_id, None)
        return len(stale)

    # Life on the broker
    async def open(self, connection: AbstractRobustConnection, leads: Callable[[], bool]) -> None:
        """Declare the streams, start reading, and return once current (the worker takes no job before)."""
        self._connection = connection
        self._leads = leads
        channel = await _plain_channel(connection)
        try:
            await channel.queue_declare(IDS_STREAM, durable=True, arguments=IDS_ARGUMENTS)
            await channel.queue_declare(SNAPSHOT_STREAM, durable=True, arguments=SNAPSHOT_ARGUMENTS)
            await channel.queue_bind(IDS_STREAM, JOBS_EXCHANGE, routing_key=CANCEL_ROUTING_KEY)
        finally:
            await channel.close()
        started = time.monotonic()
        await self._start_from_snapshot()
        self._reader = asyncio.create_task(self._read_forever())
        await self._caught_up.wait()
        self.replay_seconds = time.monotonic() - started
        start = "its start" if self.snapshot_ids is None else f"a snapshot of {self.snapshot_ids} ids"
        log.info(
            "remembering %d job ids (read in %.1f s, from %s, to offset %d)",
            len(self._ids),
            self.replay_seconds,
            start,
            self._offset,
        )

    async def close(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
            await asyncio.gather(self._sending, return_exceptions=True)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._publisher is not None and not self._publisher.is_closed:
            with contextlib.suppress(Exception):
                await self._publisher.close()

    async def taken(self, job_id: str, take: int) -> bool:
        """Record, confirmed, that this job is about to be submitted under this take token, and read the
        record back: True when it is the job's first in the stream (submit it), False when another copy's
        came first (this one is a duplicate). Every replica reads the stream in the same order, so copies
        taken at the same moment, on one replica or several, agree on which one goes on."""
        return await self._read_back("taken", job_id, take)

    async def ended(self, job_id: str) -> bool:
        """Record, confirmed, that this job's terminal event is out, and read the record back: True when
        it is the job's first `ended` record in the stream, False when another came first. A task's end
        can be handled twice (a tracking state whose ack was lost comes back, and goes on beside the state
        that replaced it); every replica reads the stream in one order, so exactly one handling wins, and
        only the winner frees the task's running slot."""
        return await self._read_back("ended", job_id, new_take())

    async def freed(self, job_id: str) -> bool:
        """As `ended`, for a task whose end is not its job's: it left for the copy stage, or its job ended
        `cancelled` before. True when this is the job's first `freed` record: only then is the task's
        running slot freed."""
        return await self._read_back("freed", job_id, new_take())

    async def claim(self, name: str) -> bool:
        """Claim a duty named `name` (filling a new permit pool) for this replica: True when its claim is
        the first the stream holds of the claims made within CLAIM_SECONDS of each other, for whichever
        replicas claim it at once. A claim made longer after the last one winning (the pool deleted and
        declared again later) starts afresh. The records carry the claimer's time, so every replica
        decides alike."""
        return await self._read_back("claim", name, new_take(), at=self._clock())

    async def _read_back(self, kind: str, key: str, token: int, **fields: Any) -> bool:
        """Publish a `kind` record (confirmed) and wait until the reader applies it: its answer, whether
        the record was the first of its kind for `key` (READ_BACK_SECONDS at most: the delivery fails, and
        is tried again)."""
        read_back = asyncio.get_running_loop().create_future()
        self._reading_back[(kind, key, token)] = read_back
        name, field = ("name", "claim") if kind == "claim" else ("job_id", _TOKEN_FIELDS[kind])
        try:
            await self._grouped({name: key, "record": kind, field: token, **fields})
            return await asyncio.wait_for(read_back, READ_BACK_SECONDS)
        finally:
            self._reading_back.pop((kind, key, token), None)

    def _apply_record(self, record: dict[str, Any]) -> None:
        """Apply one record of the stream (as parsed), and answer this replica's read-back of it."""
        kind = record.get("record")
        if kind == "mark":
            if record.get("mark") == self._mark and not self._caught_up.is_set():
                self._caught_up.set()
            return
        if kind == "batch":
            if not isinstance(record["records"], list):
                raise TypeError("a batch's records are a list")
            for each in record["records"]:
                self._apply_one(each)
            return
        if kind == "claim":
            name, token, at = record["name"], int(record["claim"]), float(record["at"])
            won = self._claims.get(name)
            if won is None or at - won[1] > CLAIM_SECONDS:
                self._claims[name] = won = (token, at)
            self._answer(kind, name, token, won[0] == token)
            return
        if kind not in _TOKEN_FIELDS:
            return  # a record of a later version: nothing this one knows to do with it
        job_id, token = record["job_id"], int(record.get(_TOKEN_FIELDS[kind], 0))
        if kind == "taken":
            self.apply(job_id, TAKEN, token)
            self._answer(kind, job_id, token, self.known(job_id).take == token)
        elif kind == "ended":
            before = self.apply(job_id, ENDED | TAKEN)
            self._answer(kind, job_id, token, not before & ENDED)
        else:  # freed
            before = self.apply(job_id, FREED | TAKEN)
            self._answer(kind, job_id, token, not before & FREED)

    def _apply_one(self, record: Any) -> None:
        """One record of a batch: a bad one is skipped, the rest of the batch still applies."""
        if not isinstance(record, dict) or record.get("record") in ("batch", "mark"):
            log.warning("an unreadable record in a batch of %s: ignored", IDS_STREAM)
            return
        try:
            self._apply_record(record)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("an unreadable record in a batch of %s: ignored", IDS_STREAM)

    def _answer(self, kind: str, key: str, token: int, first: bool) -> None:
        read_back = self._reading_back.get((kind, key, token))
        if read_back is not None and not read_back.done():
            read_back.set_result(first)

    async def _grouped(self, record: dict[str, Any]) -> None:
        """Publish `record`, confirmed, together with the others that come while a publish is in flight
        (a group commit): one record alone goes out at once, as ever; under load, each confirm's round
        trip gathers the next batch, so the stream, and every replica reading it, gets one message per
        batch instead of one per record. The order of the batch is the order the records were made in."""
        confirmed = asyncio.get_running_loop().create_future()
        self._waiting.append((record, confirmed))
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send_waiting())
        await confirmed

    async def _send_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:BATCH_MAX], self._waiting[BATCH_MAX:]
            records = [record for record, _ in batch]
            try:
                await self._record(records[0] if len(records) == 1 else {"record": "batch", "records": records})
            except BaseException as exc:
                for _, confirmed in batch:
                    if not confirmed.done():
                        confirmed.set_exception(exc if isinstance(exc, Exception) else ConnectionError("stopped"))
                if not isinstance(exc, Exception):
                    raise
            else:
                for _, confirmed in batch:
                    if not confirmed.done():
                        confirmed.set_result(None)

    async def _record(self, record: dict[str, Any]) -> None:
        channel = await self._publishing()
        # Bounded: a stream without a leader, or a channel of a connection that just died, must fail the
        # delivery (it backs off and is tried again), never hold it.
        confirm = await channel.basic_publish(
            json.dumps(record, separators=(",", ":")).encode(),
            routing_key=IDS_STREAM,
            properties=aiormq.spec.Basic.Properties(delivery_mode=2, content_type="application/json"),
            mandatory=True,
            timeout=READ_BACK_SECONDS,
        )
        if not isinstance(confirm, Basic.Ack):
            raise aiormq.exceptions.DeliveryError(None, confirm)  # type: ignore[arg-type]

    async def _publishing(self) -> aiormq.abc.AbstractChannel:
        assert self._connection is not None  # noqa: S101 - open() comes first
        transport = self._connection.transport
        if transport is None:
            raise ConnectionError("not connected to RabbitMQ")
        # A channel of the connection before a reconnect may not say it is closed: one of the current one.
        if (
            self._publisher is None
            or self._publisher.is_closed
            or self._publisher.connection is not transport.connection
        ):
            self._publisher = await transport.connection.channel(publisher_confirms=True, on_return_raises=True)
        return self._publisher

    # Reading
    async def _read_forever(self) -> None:
        """Read the stream from the last applied offset on, again after every lost channel or connection."""
        assert self._connection is not None  # noqa: S101
        while True:
            try:
                await self._connection.connected.wait()
                await self._read()
            except (asyncio.CancelledError, Exception) as exc:
                # aiormq fails a channel's operations with CancelledError when the broker closes it.
                if isinstance(exc, asyncio.CancelledError) and _really_cancelled():
                    raise
                log.warning("reading %s stopped (%s); resuming from offset %d", IDS_STREAM, exc, self._offset + 1)
            self._caught_up.clear()
            await asyncio.sleep(1.0)

    async def _read(self) -> None:
        assert self._connection is not None  # noqa: S101
        channel = await _plain_channel(self._connection)
        try:
            await channel.basic_qos(prefetch_count=PREFETCH)
            start: int | str = self._offset + 1 if self._offset >= 0 else "first"
            unacked = 0
            latest = 0
            acking: asyncio.TimerHandle | None = None

            def ack() -> None:
                nonlocal unacked, acking
                unacked, acking = 0, None
                if not channel.is_closed:
                    asyncio.get_running_loop().create_task(_safely(channel.basic_ack(latest, multiple=True)))

            async def on_record(message: DeliveredMessage) -> None:
                nonlocal unacked, latest, acking
                self._on_record(message)
                unacked += 1
                latest = message.delivery_tag or 0
                if unacked >= ACK_EVERY:
                    if acking is not None:
                        acking.cancel()
                    ack()
                elif acking is None and self._caught_up.is_set():
                    # Live, every record is acked within ACK_DELAY (no delivery is held unacknowledged for
                    # long), a burst of them with one ack.
                    acking = asyncio.get_running_loop().call_later(ACK_DELAY, ack)

            await channel.basic_consume(IDS_STREAM, on_record, arguments={"x-stream-offset": start})
            self._mark = uuid.uuid4().hex
            await self._record({"record": "mark", "mark": self._mark})
            await channel.closing
        finally:
            if acking is not None:
                acking.cancel()
            if not channel.is_closed:
                await channel.close()

    def _on_record(self, message: DeliveredMessage) -> None:
        headers = message.header.properties.headers or {}
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int):
            if offset <= self._offset:
                return  # already applied (a snapshot covered it)
            self._offset = offset
        if message.routing_key == CANCEL_ROUTING_KEY:
            self._on_cancel(message.body)
            return
        try:
            self._apply_record(json.loads(message.body))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("an unreadable record in %s at offset %s: ignored", IDS_STREAM, offset)

    def _on_cancel(self, body: bytes) -> None:
        try:
            cancel = CancelRequest.model_validate_json(body)
        except ValidationError as exc:
            if self.current and self._leads():
                asyncio.get_running_loop().create_task(self._dead_letter(body, validation_message(exc)))
            return
        before = self.apply(cancel.job_id, CANCELLED, reason=cancel.reason)
        # A cancel that ends a job is counted by the replica that ends it (worker.consumer); one that
        # comes after the end has no job to meet, so the leader counts it, once for all replicas.
        if before & ENDED and self.current and self._leads():
            self._metrics.cancels.labels("after_end").inc()
            log.info("cancel of job %s read after its end: nothing changes", cancel.job_id)

    async def _dead_letter(self, body: bytes, why: str) -> None:
        """A cancel no worker can read: the leader parks a copy in seedance.jobs.dead (the stream keeps the
        original, as it keeps everything), once for all replicas."""
        reason = f"invalid_cancel: {why}"
        headers: FieldTable = {"x-seedance-reason": reason[:2000], "x-seedance-reason-code": "invalid_cancel"}
        try:
            channel = await self._publishing()
            await channel.basic_publish(
                body,
                routing_key=DEAD_LETTER_QUEUE,
                properties=aiormq.spec.Basic.Properties(delivery_mode=2, headers=headers),
            )
            self._metrics.jobs_rejected.labels("invalid_cancel").inc()
            log.warning("dead-lettered a cancel: %s", reason)
        except Exception as exc:
            log.warning("could not dead-letter an unreadable cancel (%s)", exc)

    # Snapshots
    async def _start_from_snapshot(self) -> None:
        """Load the newest snapshot, trying again for a while when the broker refuses the read: on a cluster,
        a stream just declared by another replica has no running member on this node for a moment
        (`PRECONDITION_FAILED - ... does not have a running replica on the local node`). Without a
        snapshot the stream is read from its start: slower, never wrong."""
        for attempt in range(SNAPSHOT_ATTEMPTS):
            try:
                await self._load_snapshot()
            except (aiormq.exceptions.AMQPError, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and _really_cancelled():
                    raise
                if attempt + 1 == SNAPSHOT_ATTEMPTS:
                    log.warning("cannot read %s (%s); reading %s from its start", SNAPSHOT_STREAM, exc, IDS_STREAM)
                    return
                log.info("cannot read %s yet (%s); trying again", SNAPSHOT_STREAM, exc)
                await asyncio.sleep(SNAPSHOT_RETRY_SECONDS)
            else:
                return

    async def _load_snapshot(self) -> None:
        """Start from the newest snapshot, when there is one: its ids, and the offset its records end at."""
        assert self._connection is not None  # noqa: S101
        channel = await _plain_channel(self._connection)
        try:
            # The broker's count lags a publish by a few seconds: with none counted, a snapshot is still
            # waited for briefly (one just written). Missing one is never wrong: it only saves time.
            declared = await channel.queue_declare(SNAPSHOT_STREAM, passive=True)
            wait = SNAPSHOT_WAIT_SECONDS if declared.message_count else SNAPSHOT_UNCOUNTED_WAIT_SECONDS
            await channel.basic_qos(prefetch_count=1)
            arrived: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

            async def on_snapshot(message: DeliveredMessage) -> None:
                if not arrived.done():
                    arrived.set_result(message.body)

            await channel.basic_consume(SNAPSHOT_STREAM, on_snapshot, arguments={"x-stream-offset": "last"})
            try:
                body = await asyncio.wait_for(arrived, timeout=wait)
            except TimeoutError:
                if declared.message_count:
                    log.warning("no snapshot arrived from %s; reading %s from its start", SNAPSHOT_STREAM, IDS_STREAM)
                return
        finally:
            if not channel.is_closed:
                await channel.close()
        try:
            offset, reasons, count = self._read_snapshot(body)
        except (ValueError, KeyError, TypeError, zlib.error):
            log.warning(
                "the newest snapshot in %s cannot be read; reading %s from its start", SNAPSHOT_STREAM, IDS_STREAM
            )
            return
        self._reasons.update(reasons)
        self._offset = self._snapshot_offset = offset
        self.snapshot_ids = count

    def _read_snapshot(self, body: bytes) -> tuple[int, dict[str, str | None], int]:
        """Apply a snapshot's ids (decompressed a megabyte at a time, so that a few hundred thousand ids
        never exist twice in memory); its offset, cancel reasons and how many ids it held."""
        inflate = zlib.decompressobj()
        pending = inflate.decompress(body, SNAPSHOT_CHUNK)
        while b"\n" not in pending and not inflate.eof:  # a header longer than a chunk (many cancels)
            pending += inflate.decompress(inflate.unconsumed_tail, SNAPSHOT_CHUNK)
        head, _, pending = pending.partition(b"\n")
        header = json.loads(head)
        ids = self._ids  # empty: the snapshot is read before any record
        count = 0
        while True:
            lines = pending.split(b"\n")
            pending = lines.pop()
            for line in lines:
                job_id, _, value = line.partition(b" ")
                ids[job_id.decode()] = int(value)
                count += 1
            if inflate.eof:
                break
            pending += inflate.decompress(inflate.unconsumed_tail, SNAPSHOT_CHUNK)
        return int(header["offset"]), header.get("reasons", {}), count

    async def maintain(self, every: float = SNAPSHOT_SECONDS) -> None:
        """Forever: forget ids past the retention; on the leader, write a snapshot when records came in."""
        while True:
            await asyncio.sleep(every)
            self.forget_older()
            if self._leads() and self.current and self._offset > self._snapshot_offset:
                try:
                    await self.snapshot()
                except Exception as exc:
                    log.warning("could not write a snapshot of the remembered job ids (%s)", exc)

    async def snapshot(self) -> int:
        """Publish every remembered id, with the offset of the last record applied; returns its size."""
        offset = self._offset
        # A header line, then one line per id: read back a chunk at a time (see _read_snapshot).
        deflate = zlib.compressobj(1)
        header = json.dumps({"offset": offset, "reasons": self._reasons}, separators=(",", ":"))
        parts = [deflate.compress(header.encode() + b"\n")]
        ids = list(self._ids.items())
        for start in range(0, len(ids), 10_000):
            lines = "".join(f"{job_id} {value}\n" for job_id, value in ids[start : start + 10_000])
            parts.append(deflate.compress(lines.encode()))
        parts.append(deflate.flush())
        body = b"".join(parts)
        if len(body) > SNAPSHOT_MAX_BYTES:
            log.warning(
                "a snapshot of %d job ids would be %d bytes, over %d: none written (start-up reads every record)",
                len(self._ids),
                len(body),
                SNAPSHOT_MAX_BYTES,
            )
            return 0
        channel = await self._publishing()
        await channel.basic_publish(
            body,
            routing_key=SNAPSHOT_STREAM,
            properties=aiormq.spec.Basic.Properties(delivery_mode=2, content_type="application/zlib"),
            mandatory=True,
        )
        self._snapshot_offset = offset
        log.info("wrote a snapshot of %d job ids (%d bytes, up to offset %d)", len(self._ids), len(body), offset)
        return len(body)


def _really_cancelled() -> bool:
    """Whether a CancelledError is this task being cancelled: aiormq also fails the operations of a channel
    the broker closed with one (its message the broker's reason)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def _safely(action: Awaitable[None]) -> None:
    try:
        await action
    except Exception as exc:
        log.debug("could not ack records of %s (%s)", IDS_STREAM, exc)


async def _plain_channel(connection: AbstractRobustConnection) -> aiormq.abc.AbstractChannel:
    """A channel of the current connection that aio-pika does not restore: the reader resumes from its own
    offset (a restored consumer would start again from the offset it was first given)."""
    await connection.connected.wait()
    transport = connection.transport
    if transport is None:
        raise ConnectionError("not connected to RabbitMQ")
    return await transport.connection.channel()


__all__ = ["IDS_STREAM", "SNAPSHOT_STREAM", "TAKE_HEADER", "JobIds", "Known", "new_take"]

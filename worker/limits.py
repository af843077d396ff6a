"""The API account's quotas, kept in RabbitMQ so every replica shares them: however many replicas run,
together they stay within `SEEDANCE_<TIER>_RPM`, `_MAX_IN_FLIGHT` and `_DAILY_TOKENS`, with no setting that
depends on how many there are.

Quotas live in quorum queues, so they survive the loss of any one node of a cluster. A quorum queue's
length limit is not exact under concurrent publishes (measured on RabbitMQ 3.10: 36 messages over a limit
of 4 with three publishers), so running slots and requests per minute are *pools of free permits* that
replicas take with `basic.get`: the broker hands each message to one taker only, which is exact however
many replicas take at once.

- running slots, `seedance.permits.<tier>.slots.<N + ahead>`: one message per free slot. A submit takes
  one; whoever sees the task end puts one back. N is the API's running limit; `ahead`
  (`SEEDANCE_<TIER>_QUEUE_AHEAD`) more tasks may wait in the API's own queue, so a slot that frees upstream
  is taken at once, between two of our polls.
- requests per minute, `seedance.permits.<tier>.rpm.<N>`: one message per request the account may still
  make. A submit takes one and puts a message into `....rpm.<N>.used.<ttl>ms`, whose TTL (a minute and a
  little, see `rpm_ttl_ms`) dead-letters it back into the pool: a sliding window, for all replicas.
- tokens per UTC day, `seedance.permits.<tier>.tokens.<day>.<budget>`: one message per submit whose body
  is the request's tokens in units of `token_unit(budget)` (rounded up), under `x-max-length-bytes` with
  reject-publish; a new queue each day (the old ones expire). This is the one quota that takes permits by
  publishing: a quorum queue refuses a publish only once it is already over its limit, so the limit is the
  budget less the largest request there is (up to that much of a day's budget may go unused), and
  concurrent submits of several replicas may still pass the budget by a few requests (the API answers those
  429, which backs the tier off). Splitting a day's budget into messages to take would cost hundreds of
  gets per submit.

A pool is filled by the replica that declares it first: replicas that start together all find it missing,
so each claims the filling in the job-id stream (worker.job_ids) and only the first claim fills it (a pool
deleted under running replicas is filled by whichever declares it again). A replica that dies between taking a slot and
recording its task takes a permit away for good; a task whose end is handled twice puts one back too
many. One replica at a time, the leader (see worker.leader), reconciles: with more free permits than the
quota leaves for three counts running it takes the difference off; with fewer for a whole window, it adds
them (permits of submits in progress are missing only for one API request).

The queue names carry the quota: changing a setting starts a fresh pool, full, which the reconciliation
brings down to what the running tasks leave within a few seconds. Any broker failure while taking permits
(a node down, the connection being restored) is "no permit now": the tier waits, its jobs go nowhere, and
`/readyz` says the permits are unreachable until they answer again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.exceptions import DeliveryError, PublishError

from contracts.api import MAX_TOKENS, ServiceTier
from worker import topology
from worker.errors import LimitReached
from worker.logs import Repeats
from worker.settings import TierSettings

log = logging.getLogger(__name__)

PROBE_SECONDS = 0.2  # how soon a replica tries a full limit again (one probe at a time per tier)
MAX_TOKEN_BYTES = 1 << 26  # a day's budget in at most 64 MiB of permit bodies
RPM_MARGIN = 0.02  # a per-minute permit lives 2 % longer than the minute (at most one second longer)
BROKER_SECONDS = 5.0  # one permit operation; longer means the broker cannot answer now (a node lost)
NOT_READY_PAUSE = 0.05  # before a new pool that refused a permit (still starting) is tried again
FILL_BATCH = 100  # permits published together when a pool is filled or topped up
UNREACHABLE_BACKOFF = 1.0  # how long a tier waits before it tries permits that did not answer again
REMIND_SECONDS = 60.0

T = TypeVar("T")
Claim = Callable[[str], Awaitable[bool]]


def token_unit(budget: int) -> int:
    """Tokens per byte of permit body: 1 for budgets up to 64 M tokens, coarser above."""
    return max(1, math.ceil(budget / MAX_TOKEN_BYTES))


class PermitsUnreachable(Exception):
    """The broker did not answer a permit operation (its queue's node lost, the connection being restored)."""


class QueueMissing(PermitsUnreachable):
    """A permit queue is not there (deleted by hand, or a day's queue expired early)."""


class NotSent(PermitsUnreachable):
    """The operation never left this process (its channel was closed, being restored): trying it again
    later cannot count it twice."""


class Permits:
    """The broker side of the limits, on one robust channel of their own (aio-pika reopens it after the
    broker closes it or the connection is restored: it is never replaced, so no failure leaves a channel
    behind). Every operation is bounded by BROKER_SECONDS and fails with PermitsUnreachable."""

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        self._channel: AbstractRobustChannel | None = None
        self._opening = asyncio.Lock()

    @property
    def connected(self) -> bool:
        """Whether the connection is up (its channels may still be being restored)."""
        return self._connection.connected.is_set()

    async def _open(self) -> AbstractRobustChannel:
        async with self._opening:
            if self._channel is None:
                self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        return self._channel

    async def _call(self, operation: Callable[[AbstractRobustChannel], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(BROKER_SECONDS):
                return await operation(await self._open())
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise QueueMissing(str(exc)[:200]) from exc
        except aiormq.exceptions.ChannelInvalidStateError as exc:
            # aiormq and aio-pika raise it before a frame is written; a channel that closes later fails
            # the operation with the reason of its close instead (the broker may have taken it then).
            raise NotSent(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        except (TimeoutError, ConnectionError, OSError, aiormq.exceptions.AMQPError, RuntimeError) as exc:
            raise PermitsUnreachable(f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    async def declare(self, name: str, arguments: dict[str, Any]) -> bool:
        """Declare a quorum queue (idempotent); True when it was not there before (this replica made it)."""

        async def declare(channel: AbstractRobustChannel) -> bool:
            created = not await self._exists(name)
            # robust=False: declared again by attach or the leader when missing, not behind our back.
            await channel.declare_queue(name, durable=True, arguments={**topology.QUORUM, **arguments}, robust=False)
            return created

        return await self._call(declare)

    async def _exists(self, name: str) -> bool:
        """Whether `name` exists, asked on a plain aiormq channel of its own, the one place here below
        aio-pika: the broker closes the channel that asks about a queue that is not there, and aio-pika
        opens only robust channels on a robust connection, which it would reopen behind our back."""
        transport = self._connection.transport
        if transport is None:
            raise ConnectionError("not connected")
        probe = await transport.connection.channel()
        try:
            await probe.queue_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            if not probe.is_closed:
                await probe.close()
        return True

    async def put(self, queue: str, body: bytes = b"") -> bool:
        """Publish one permit to `queue`: True when the broker took it, False when the queue is full."""
        return await self._call(lambda channel: _put(channel, queue, body))

    async def put_many(self, queue: str, count: int) -> int:
        """Publish `count` empty permits to `queue` at once (their confirms awaited together, not one
        round trip each: a pool of 600 filled one by one held a worker's start-up for seconds); how
        many the broker took."""

        async def put_many(channel: AbstractRobustChannel) -> int:
            outcomes = await asyncio.gather(*(_put(channel, queue) for _ in range(count)), return_exceptions=True)
            took = 0
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
                took += outcome
            return took

        return await self._call(put_many)

    async def take(self, queue: str) -> bool:
        """Take one permit off `queue`; False when it held none."""

        async def take(channel: AbstractRobustChannel) -> bool:
            pool = await channel.get_queue(queue, ensure=False)
            return await pool.get(no_ack=True, fail=False) is not None

        return await self._call(take)

    async def count(self, queue: str) -> int:
        async def count(channel: AbstractRobustChannel) -> int:
            # robust=False: a robust channel answers a passive declare of a queue it knows from its cache.
            pool = await channel.declare_queue(queue, passive=True, robust=False)
            return pool.declaration_result.message_count or 0

        return await self._call(count)


async def _put(channel: AbstractRobustChannel, queue: str, body: bytes = b"") -> bool:
    """Publish one permit, confirmed: False when the queue refused it (full, or still starting)."""
    message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    try:
        await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)
    except PublishError:
        raise QueueMissing(f"{queue} is not there") from None
    except DeliveryError:
        return False
    return True


class Slot:
    """A place for one task, taken for one submit: `keep()` once the API accepted the task."""

    __slots__ = ("kept",)

    def __init__(self) -> None:
        self.kept = False

    def keep(self) -> None:
        self.kept = True


class _Taking:
    """The async context manager of `TierLimits.slot` (a class: a generator-based one costs more per job)."""

    __slots__ = ("_holds", "_limits", "_slot", "_tokens")

    def __init__(self, limits: TierLimits, tokens: int) -> None:
        self._limits = limits
        self._tokens = tokens
        self._slot = Slot()
        self._holds = False

    async def __aenter__(self) -> Slot:
        self._holds = await self._limits._take_all(self._tokens)
        return self._slot

    async def __aexit__(self, *exc: object) -> None:
        if self._holds and not self._slot.kept:
            await self._limits._give_back()


class _Pool:
    """Free permits of one quota against what should be free, sampled at each recount (leader only)."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._samples: deque[tuple[float, int, int]] = deque()

    def correction(self, now: float, free: int, excess: int) -> int:
        """How many permits to take off (> 0) or add (< 0), given `free` permits now, `excess` of them
        more than the quota leaves (negative: missing)."""
        self._samples.append((now, free, excess))
        while self._samples and self._samples[0][0] < now - self._window:
            self._samples.popleft()
        last = [excess for _, _, excess in list(self._samples)[-3:]]
        if len(last) == 3 and min(last) > 0:
            self._samples.clear()
            return min(last)  # a task's end handled twice, a pool filled twice: never transient
        # Missing permits are added only when the pool stayed empty for a whole window: a submit in
        # progress holds a permit for one API request, and while permits are free nobody is held back.
        covered = self._samples[0][0] <= now - self._window + 1.0
        empty = all(free == 0 for _, free, _ in self._samples)
        worst = max(excess for _, _, excess in self._samples)
        if covered and empty and worst < 0:
            self._samples.clear()
            return worst
        return 0


class TierLimits:
    """One tier's quotas. Without `attach`, and for quotas left unset, nothing is limited."""

    def __init__(
        self,
        tier: ServiceTier,
        config: TierSettings,
        *,
        minute_seconds: float = 60.0,
        reconcile_window_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.tier = tier
        self.rpm = config.rpm
        self.capacity = None if config.max_in_flight is None else config.max_in_flight + config.queue_ahead
        self.daily_tokens = config.daily_tokens
        self._minute = minute_seconds
        self._clock = clock
        self._wall = wall
        self._permits: Permits | None = None
        self._blocked: dict[str, float] = {}
        self._token_day = ""
        self._slots = _Pool(reconcile_window_seconds)
        self._requests = _Pool(reconcile_window_seconds)
        self.unreachable: str | None = None  # why the permits did not answer, until they do again
        self._repeats = Repeats(REMIND_SECONDS)
        self._declare_later = False  # a permit queue was found missing: declare them all again
        self._owed = 0  # running slots of ended tasks not given back yet (the broker did not answer)
        self._claim: Claim | None = None

    @property
    def rpm_ttl_ms(self) -> int:
        # A permit outlives its minute a little: the request it stands for reaches the API a little later
        # (and a later one may get there faster), and the API counts arrivals, not permits.
        return max(1, round(1000 * min(self._minute * (1 + RPM_MARGIN), self._minute + 1.0)))

    @property
    def rpm_queue(self) -> str:
        return topology.rpm_permits(self.tier, self.rpm)

    @property
    def rpm_used_queue(self) -> str:
        return topology.rpm_permits_used(self.tier, self.rpm, self.rpm_ttl_ms)

    @property
    def slots_queue(self) -> str:
        return topology.slot_permits(self.tier, self.capacity)

    def tokens_queue(self, day: str) -> str:
        return topology.token_permits(self.tier, day, self.daily_tokens)

    async def attach(self, permits: Permits, claim: Claim | None = None) -> None:
        """Declare this tier's permit queues (idempotent) and take permits from now on. A pool this replica
        finds missing, it fills, when `claim(pool)` says its claim to do so came first (worker.job_ids:
        replicas that start together all find it missing); without `claim`, whenever it finds it missing."""
        self._permits = permits
        self._claim = claim
        await self._declare(starting=True)

    async def _declare(self, *, starting: bool = False) -> None:
        """Declare the permit queues; fill a pool this replica finds missing (at start-up only when its
        claim came first: replicas start together; later, a pool deleted under running replicas, whichever
        finds it missing first fills it, and two at once may fill it twice until the leader's recount)."""
        permits = self._permits
        assert permits is not None  # noqa: S101 - only called once attached
        if self.rpm is not None:
            created = await permits.declare(self.rpm_queue, {})
            used = {"x-message-ttl": self.rpm_ttl_ms, **topology.dead_letter_to(self.rpm_queue)}
            await permits.declare(self.rpm_used_queue, used)
            if created and (not starting or await self._claimed(self.rpm_queue)):
                await self._add(self.rpm_queue, self.rpm)
        created = self.capacity is not None and await permits.declare(self.slots_queue, {})
        if created and self.capacity is not None and (not starting or await self._claimed(self.slots_queue)):
            await self._add(self.slots_queue, self.capacity)
        self._token_day = ""

    async def _claimed(self, pool: str) -> bool:
        """Whether this replica fills the new pool `pool`; a claim that cannot be made leaves the pool to
        the leader, which adds permits missing for a whole window."""
        if self._claim is None:
            return True
        try:
            return await self._claim(pool)
        except Exception as exc:
            log.warning("could not claim the filling of %s (%s); the leader fills it", pool, exc)
            return False

    async def _add(self, queue: str, count: int) -> int:
        """Add `count` permits to the unbounded pool `queue`, FILL_BATCH at a time. It refuses one only
        while it is not ready: a quorum queue another replica is still creating answers its declare at
        once and nacks a publish until its members have started (the filler's first permit was lost that
        way, the pool one short until the leader's recount). Such a refusal is tried again, for up to
        BROKER_SECONDS."""
        assert self._permits is not None  # noqa: S101 - only called once attached
        added = 0
        refusals = 0
        while added < count:
            batch = min(FILL_BATCH, count - added)
            took = await self._permits.put_many(queue, batch)
            added += took
            if took == batch:
                continue
            if refusals * NOT_READY_PAUSE >= BROKER_SECONDS:
                log.warning("%s refused %d of %d permits; the leader adds them", queue, count - added, count)
                break
            refusals += 1
            await asyncio.sleep(NOT_READY_PAUSE)
        return added

    async def _remove(self, queue: str, count: int) -> int:
        assert self._permits is not None  # noqa: S101 - only called once attached
        removed = 0
        while removed < count and await self._permits.take(queue):
            removed += 1
        return removed

    # Submitting
    def wait_time(self) -> float:
        """Seconds before a submit is worth trying (a limit found full, a 429); 0 when it may be tried now."""
        now = self._clock()
        return max(0.0, max((until - now for until in self._blocked.values()), default=0.0))

    def block_for(self, seconds: float, limit: str = "429") -> None:
        """Nobody in this replica tries `limit` for `seconds` (the API said 429, or a permit was refused)."""
        self._blocked[limit] = max(self._blocked.get(limit, 0.0), self._clock() + seconds)

    def slot(self, tokens: int) -> _Taking:
        """`async with limits.slot(tokens) as slot:` takes the permits of one submit of `tokens` tokens, or
        raises LimitReached (nothing taken then).

        The running slot is given back when the block ends, unless `slot.keep()` was called: then the task
        holds it until `task_ended()`.
        """
        return _Taking(self, tokens)

    async def _take_all(self, tokens: int) -> bool:
        """Take a submit's permits; True when a running slot was among them. LimitReached when one is full
        or does not answer."""
        wait = self.wait_time()
        if wait > 0:
            limit = max(self._blocked, key=lambda name: self._blocked[name])
            raise LimitReached(limit, wait)
        permits = self._permits
        if permits is None:
            return False
        holds = False
        try:
            if self._declare_later:
                await self._declare()
                self._declare_later = False
            await self._give_back_owed()
            if self.capacity is not None:
                if not await permits.take(self.slots_queue):
                    self._refused("running slots", PROBE_SECONDS)
                holds = True
            if self.rpm is not None:
                if not await permits.take(self.rpm_queue):
                    self._refused("requests per minute", max(PROBE_SECONDS, min(1.0, self._minute / self.rpm)))
                # Lost on the way (a crash now), the permit is missing until the leader adds it back.
                await permits.put(self.rpm_used_queue)
            if self.daily_tokens is not None:
                queue = await self._todays_tokens(permits)
                body = b"\0" * math.ceil(tokens / token_unit(self.daily_tokens))
                if not await permits.put(queue, body):
                    self._refused("tokens per day", min(60.0, self._seconds_to_midnight()))
        except PermitsUnreachable as exc:
            if holds:
                await self._give_back()
            self._unreachable(exc)
        except BaseException:
            if holds:
                await self._give_back()
            raise
        self._reached()
        return holds

    async def task_ended(self) -> None:
        """A task that held a running slot ended (or left for the copy stage), and the delivery that said so
        is acknowledged: free its slot for another. Never fails.

        A put that never left this process while the connection is up (only the permits' channel being
        restored) is owed: the ack before it went through, so the next permit operation or check that
        reaches the broker gives it back. With the connection down, the ack may have been lost with it and
        the task's state come back to free the slot again, and a put that got no confirm may have reached
        the broker: both are left to the leader, which adds a slot missing for a whole window, rather than
        risk freeing it twice (the account's running limit would be passed)."""
        if self._permits is None or self.capacity is None:
            return
        try:
            await self._permits.put(self.slots_queue)
        except NotSent as exc:
            self.note_unreachable(exc)
            if self._permits.connected:
                self._owed += 1
            else:
                log.info("a running slot was not freed (%s); the leader restores it if its task does not", exc)
        except PermitsUnreachable as exc:
            self.note_unreachable(exc)
            log.warning("a running slot may not have been freed (%s); the leader restores it if not", exc)

    async def _give_back(self) -> None:
        """A slot taken for a submit that did not keep it: owed until the broker takes it (no delivery was
        settled meanwhile, so it cannot come back twice)."""
        self._owed += 1
        try:
            await self._give_back_owed()
        except PermitsUnreachable as exc:
            log.debug("a running slot is owed until the broker answers (%s)", exc)

    async def _give_back_owed(self) -> None:
        """Put the owed running slots back; PermitsUnreachable (with the rest still owed) when one was not
        sent. Each is counted off before its put, so concurrent callers never give one back twice."""
        assert self._permits is not None  # noqa: S101 - only called once attached
        while self._owed > 0:
            self._owed -= 1
            try:
                await self._permits.put(self.slots_queue)
            except NotSent:
                self._owed += 1
                raise
            except PermitsUnreachable as exc:
                log.warning("a running slot may not have been given back (%s); the leader restores it if not", exc)
                raise

    def _refused(self, limit: str, seconds: float) -> NoReturn:
        self.block_for(seconds, limit)
        raise LimitReached(limit, seconds)

    def _unreachable(self, exc: PermitsUnreachable) -> NoReturn:
        self.note_unreachable(exc)
        self.block_for(UNREACHABLE_BACKOFF, "permits (RabbitMQ does not answer)")
        raise LimitReached("permits (RabbitMQ does not answer)", UNREACHABLE_BACKOFF) from None

    def note_unreachable(self, exc: PermitsUnreachable) -> None:
        """The permits did not answer: say so (once, then every minute) and report it until they do."""
        why = f"the {self.tier} tier's permits in RabbitMQ do not answer ({exc})"
        if isinstance(exc, QueueMissing):
            why = f"a permit queue of the {self.tier} tier is missing ({exc}); declaring it again"
            self._token_day = ""
            self._declare_later = True
        self.unreachable = why
        if self._repeats.news(type(exc).__name__) is not None:
            log.warning("%s: the tier waits and tries again", why)

    def _reached(self) -> None:
        if self.unreachable is not None:
            log.warning("the %s tier's permits answer again", self.tier)
            self.unreachable = None
            self._repeats.clear()

    async def _todays_tokens(self, permits: Permits) -> str:
        day = datetime.fromtimestamp(self._wall(), UTC).date().isoformat()
        queue = self.tokens_queue(day)
        if day != self._token_day:
            assert self.daily_tokens is not None  # noqa: S101 - only called with a budget
            unit = token_unit(self.daily_tokens)
            budget, largest = math.ceil(self.daily_tokens / unit), math.ceil(MAX_TOKENS / unit)
            # A quorum queue refuses a publish only once it is over its limit: keeping the limit one largest
            # request under the budget, a publish it takes never passes the budget.
            limit = budget - largest if budget > largest else 1
            # Unused for two days (no declare, no consumer), a day's queue deletes itself.
            arguments = {"x-max-length-bytes": limit, "x-expires": 2 * 86_400_000, "x-overflow": "reject-publish"}
            await permits.declare(queue, arguments)
            self._token_day = day
        return queue

    def _seconds_to_midnight(self) -> float:
        now = datetime.fromtimestamp(self._wall(), UTC)
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return (midnight - now).total_seconds()

    # Counting and reconciling
    async def check(self) -> None:
        """Count this tier's permits once (at each recount): a tier whose permits did not answer is
        reported until they do, whether or not a job comes to try them."""
        if self._permits is None or (self.capacity is None and self.rpm is None):
            return
        try:
            if self._declare_later:
                await self._declare()
                self._declare_later = False
            await self._give_back_owed()
            await self._permits.count(self.slots_queue if self.capacity is not None else self.rpm_queue)
        except PermitsUnreachable as exc:
            self.note_unreachable(exc)
        else:
            self._reached()

    async def slots_taken(self) -> int | None:
        """Running slots taken now (all replicas), or None without such a limit."""
        if self._permits is None or self.capacity is None:
            return None
        return max(0, self.capacity - await self._permits.count(self.slots_queue))

    async def submits_last_minute(self) -> int | None:
        if self._permits is None or self.rpm is None:
            return None
        return await self._permits.count(self.rpm_used_queue)

    async def reconcile(self, in_flight: int) -> None:
        """Leader only: make the free permits match what the quotas leave (see the module docstring).
        Declares the permit queues again first when one was found missing."""
        if self._permits is None:
            return
        if self._declare_later:
            await self._declare()
            self._declare_later = False
        now = self._clock()
        if self.capacity is not None:
            free = await self._permits.count(self.slots_queue)
            fix = self._slots.correction(now, free, free - max(0, self.capacity - in_flight))
            await self._correct(self.slots_queue, fix, f"{in_flight} tasks in flight")
        if self.rpm is not None:
            # Used first, then free: a permit moving back during the count is seen twice, never missed.
            used = await self._permits.count(self.rpm_used_queue)
            free = await self._permits.count(self.rpm_queue)
            fix = self._requests.correction(now, free, used + free - self.rpm)
            await self._correct(self.rpm_queue, fix, f"{used} requests in the last minute")

    async def _correct(self, queue: str, fix: int, context: str) -> None:
        if fix > 0:
            removed = await self._remove(queue, fix)
            log.warning("%s: took %d permits off %s that no task held (%s)", self.tier, removed, queue, context)
        elif fix < 0:
            added = await self._add(queue, -fix)
            log.warning("%s: added %d missing permits to %s (%s)", self.tier, added, queue, context)

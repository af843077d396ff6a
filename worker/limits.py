"""The API account's quotas, kept in RabbitMQ so every replica shares them: however many replicas run,
together they stay within `SEEDANCE_<TIER>_RPM`, `_MAX_IN_FLIGHT` and `_DAILY_TOKENS`, with no setting that
depends on how many there are.

Each quota is a classic queue whose length limit is the quota, with `x-overflow: reject-publish`: a
message the broker confirms is a permit, one it nacks means "full" (classic queues count exactly; quorum
queues do not enforce a length limit exactly under concurrent publishes, so they are not used here):

- requests per minute, `seedance.limits.<tier>.rpm.<N>.61000ms`: one message per submit, with a TTL of a
  minute (and a second, see `rpm_ttl_ms`). The queue holds the account's submits of the last minute and
  never more than N: a sliding window, exact for all replicas, that no crash can leave full (permits are
  never consumed: they expire).
- running slots, `seedance.limits.<tier>.slots.<N + ahead>`: one message per task, from its submit to
  its end (whoever sees the task end takes one message off). N is the API's running limit; `ahead`
  (`SEEDANCE_<TIER>_QUEUE_AHEAD`) more tasks may wait in the API's own queue, so a slot that frees upstream
  is taken at once, between two of our polls.
- tokens per UTC day, `seedance.limits.<tier>.tokens.<day>.<budget>`: one message per submit whose body
  is the request's tokens in units of `token_unit(budget)` (rounded up, so never over the budget), under
  `x-max-length-bytes`; a new queue each day (the old ones expire).

A replica that dies between taking a slot and recording its task leaves a permit nobody will take off; a
task whose end is handled twice (a crash between the two) takes one off too many. One replica at a time,
the leader (holder of the exclusive queue `seedance.limits.leader`), reconciles: with fewer permits than
tasks in flight for three counts running it adds the difference; with more, for a whole window while the
tier was full, it removes them (permits of submits in progress exist only for one API request).

The queue names carry the quota: changing a setting starts a fresh queue (RabbitMQ refuses to change a
queue's arguments), which the reconciliation fills with the running tasks within a few seconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import DeliveryError, PublishError

from contracts.api import ServiceTier
from worker.errors import LimitReached
from worker.settings import TierSettings

log = logging.getLogger(__name__)

LEADER_QUEUE = "seedance.limits.leader"
PROBE_SECONDS = 0.2  # how soon a replica tries a full limit again (one probe at a time per tier)
MAX_TOKEN_BYTES = 1 << 26  # a day's budget in at most 64 MiB of permit bodies
RPM_MARGIN = 0.02  # a per-minute permit lives 2 % longer than the minute (at most one second longer)


def token_unit(budget: int) -> int:
    """Tokens per byte of permit body: 1 for budgets up to 64 M tokens, coarser above."""
    return max(1, math.ceil(budget / MAX_TOKEN_BYTES))


class Permits:
    """The broker side of the limits: confirmed publishes, gets and counts on a channel of their own.

    The channel is opened again whenever it is found closed (after a lost connection aio-pika restores
    most channels by itself, but a channel that was busy when the connection went may stay closed).
    """

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None

    async def _open(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        return self._channel

    async def _raw(self) -> aiormq.abc.AbstractChannel:
        raw = await (await self._open()).get_underlay_channel()
        if raw.is_closed:
            self._channel = None
            raw = await (await self._open()).get_underlay_channel()
        return raw

    async def declare(self, name: str, arguments: dict[str, Any]) -> None:
        raw = await self._raw()
        await raw.queue_declare(name, durable=True, arguments={"x-queue-type": "classic", **arguments})

    async def take(self, queue: str, body: bytes = b"", *, persistent: bool = True) -> bool:
        """Publish a permit to `queue`: True when the broker took it, False when the queue is full."""
        mode = aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        channel = await self._open()
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=mode), routing_key=queue, mandatory=True
            )
        except PublishError:
            raise  # unroutable: the queue is gone, which is no "full"
        except DeliveryError:
            return False
        except aiormq.exceptions.ChannelInvalidStateError:
            self._channel = None
            raise
        return True

    async def drop(self, queue: str) -> bool:
        """Take one permit off `queue`; False when it held none."""
        got = await (await self._raw()).basic_get(queue, no_ack=True)
        return got.delivery_tag is not None

    async def count(self, queue: str) -> int:
        declared = await (await self._raw()).queue_declare(queue, passive=True)
        return declared.message_count or 0


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
            await self._limits.task_ended()


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
        self._window = reconcile_window_seconds
        self._clock = clock
        self._wall = wall
        self._permits: Permits | None = None
        self._blocked: dict[str, float] = {}
        self._samples: deque[tuple[float, int, int]] = deque()
        self._token_day = ""

    @property
    def rpm_ttl_ms(self) -> int:
        # A permit outlives its minute a little: the request it stands for reaches the API a little later
        # (and a later one may get there faster), and the API counts arrivals, not permits.
        return max(1, round(1000 * min(self._minute * (1 + RPM_MARGIN), self._minute + 1.0)))

    @property
    def rpm_queue(self) -> str:
        return f"seedance.limits.{self.tier}.rpm.{self.rpm}.{self.rpm_ttl_ms}ms"

    @property
    def slots_queue(self) -> str:
        return f"seedance.limits.{self.tier}.slots.{self.capacity}"

    def tokens_queue(self, day: str) -> str:
        return f"seedance.limits.{self.tier}.tokens.{day}.{self.daily_tokens}"

    async def attach(self, permits: Permits) -> None:
        """Declare this tier's permit queues (idempotent) and take permits from now on."""
        if self.rpm is not None:
            arguments = {"x-max-length": self.rpm, "x-message-ttl": self.rpm_ttl_ms, **_REJECT}
            await permits.declare(self.rpm_queue, arguments)
        if self.capacity is not None:
            await permits.declare(self.slots_queue, {"x-max-length": self.capacity, **_REJECT})
        self._permits = permits

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
        """Take a submit's permits; True when a running slot was among them. LimitReached when one is full."""
        wait = self.wait_time()
        if wait > 0:
            limit = max(self._blocked, key=lambda name: self._blocked[name])
            raise LimitReached(limit, wait)
        permits = self._permits
        if permits is None:
            return False
        holds = False
        if self.capacity is not None:
            if not await self._take(permits, self.slots_queue):
                self._refused("running slots", PROBE_SECONDS)
            holds = True
        try:
            if self.rpm is not None and not await self._take(permits, self.rpm_queue, persistent=False):
                self._refused("requests per minute", max(PROBE_SECONDS, min(1.0, self._minute / self.rpm)))
            if self.daily_tokens is not None:
                queue = await self._todays_tokens(permits)
                body = b"\0" * math.ceil(tokens / token_unit(self.daily_tokens))
                if not await self._take(permits, queue, body):
                    self._refused("tokens per day", min(60.0, self._seconds_to_midnight()))
        except BaseException:
            if holds:
                await self._give_back()
            raise
        return holds

    async def task_ended(self) -> None:
        """A task that held a running slot ended (or left for the copy stage): free its slot for another."""
        await self._give_back()

    async def _take(self, permits: Permits, queue: str, body: bytes = b"", *, persistent: bool = True) -> bool:
        try:
            return await permits.take(queue, body, persistent=persistent)
        except aiormq.exceptions.ChannelInvalidStateError:
            # The connection is being restored: no permit can be had now; the job waits, nothing fails.
            self.block_for(1.0, "permits (reconnecting to RabbitMQ)")
            raise LimitReached("permits (reconnecting to RabbitMQ)", 1.0) from None
        except PublishError:
            # The queue is gone (deleted by hand, or a day's queue expired early): declare again, try later.
            log.warning("permit queue %s was missing; declaring it again", queue)
            self._token_day = ""
            await self.attach(permits)
            return False

    def _refused(self, limit: str, seconds: float) -> NoReturn:
        self.block_for(seconds, limit)
        raise LimitReached(limit, seconds)

    async def _give_back(self) -> None:
        if self._permits is not None and self.capacity is not None:
            await self._permits.drop(self.slots_queue)

    async def _todays_tokens(self, permits: Permits) -> str:
        day = datetime.fromtimestamp(self._wall(), UTC).date().isoformat()
        queue = self.tokens_queue(day)
        if day != self._token_day:
            assert self.daily_tokens is not None  # noqa: S101 - only called with a budget
            limit = math.ceil(self.daily_tokens / token_unit(self.daily_tokens))
            # Unused for two days (no declare, no consumer), a day's queue deletes itself.
            await permits.declare(queue, {"x-max-length-bytes": limit, "x-expires": 2 * 86_400_000, **_REJECT})
            self._token_day = day
        return queue

    def _seconds_to_midnight(self) -> float:
        now = datetime.fromtimestamp(self._wall(), UTC)
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return (midnight - now).total_seconds()

    # Counting and reconciling
    async def slots_taken(self) -> int | None:
        """Permits in the running-slot queue now (all replicas), or None without such a limit."""
        if self._permits is None or self.capacity is None:
            return None
        return await self._permits.count(self.slots_queue)

    async def submits_last_minute(self) -> int | None:
        if self._permits is None or self.rpm is None:
            return None
        return await self._permits.count(self.rpm_queue)

    async def reconcile(self, in_flight: int) -> None:
        """Leader only: make the running-slot permits match the tasks in flight (see the module docstring)."""
        taken = await self.slots_taken()
        if taken is None or self._permits is None or self.capacity is None:
            return
        now = self._clock()
        self._samples.append((now, taken - in_flight, taken))
        while self._samples and self._samples[0][0] < now - self._window:
            self._samples.popleft()
        last = [excess for _, excess, _ in list(self._samples)[-3:]]
        if len(last) == 3 and max(last) < 0:
            missing = -max(last)
            added = 0
            while added < missing and await self._permits.take(self.slots_queue):
                added += 1
            log.warning("%s: %d tasks in flight held no slot permit; added %d", self.tier, missing, added)
            self._samples.clear()
            return
        covered = self._samples[0][0] <= now - self._window + 1.0
        full = all(count >= self.capacity for _, _, count in self._samples)
        extra = min(excess for _, excess, _ in self._samples)
        if covered and full and extra > 0:
            removed = 0
            while removed < extra and await self._permits.drop(self.slots_queue):
                removed += 1
            log.warning("%s: removed %d slot permits that no task held (a replica died submitting)", self.tier, removed)
            self._samples.clear()


_REJECT = {"x-overflow": "reject-publish"}


class Leadership:
    """One replica at a time reconciles the limits: the holder of the exclusive queue LEADER_QUEUE (the
    broker deletes it when its connection goes, and another replica takes over)."""

    def __init__(self) -> None:
        self._channel: AbstractChannel | None = None
        self.leader = False

    async def claim(self, connection: AbstractRobustConnection) -> bool:
        """Hold (or keep holding) the leadership; False while another replica holds it."""
        try:
            if self._channel is None:
                self._channel = await connection.channel()
            raw = await self._channel.get_underlay_channel()
            await raw.queue_declare(LEADER_QUEUE, exclusive=True)
        except Exception:
            if self.leader:
                log.warning("no longer the leader reconciling the account's limits")
            self.leader = False
            return False
        if not self.leader:
            log.info("leading the reconciliation of the account's limits")
        self.leader = True
        return True

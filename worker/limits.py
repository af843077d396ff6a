"""Per-tier limits on submitting: requests per minute, tasks in flight, a daily token budget, and the
pauses a 429 imposes. Pure bookkeeping, driven by the caller's clock; nothing here sleeps.

How the limits combine across N replicas:
- tasks in flight are counted in the broker (tracking messages of the tier), so the limit is global; the
  count is refreshed every `in_flight_refresh_seconds`, and between refreshes each replica adds what it
  submitted or moved itself. A replica's own count never falls short; what it cannot see is another
  replica's submits since the last recount and the tracking messages another replica holds at that
  instant, so N replicas can overshoot by at most (N - 1) x (prefetch + tracking_prefetch), briefly;
- requests per minute and the daily token budget are counted per replica: set them to quota / N, or
  leave them at the quota and let the API's 429 (honoured by every replica) do the rest.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from worker.errors import LimitReached

MINUTE = 60.0


class Slot:
    """A place for one task in the tier, taken for one submit: `keep()` once the API accepted the task."""

    __slots__ = ("kept",)

    def __init__(self) -> None:
        self.kept = False

    def keep(self) -> None:
        self.kept = True


@dataclass
class TierLimits:
    rpm: int
    max_in_flight: int
    daily_tokens: int | None
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    _sent: deque[float] = field(default_factory=deque)
    _blocked_until: float = 0.0
    _broker_in_flight: int = 0
    _last_count: int = 0
    _pending: int = 0
    _confirmed: deque[float] = field(default_factory=deque)
    _tokens_day: str = ""
    _tokens_used: int = 0

    @property
    def in_flight(self) -> int:
        """Best estimate of unfinished tasks: the broker's count, plus this replica's submits since."""
        return self._broker_in_flight + self._pending + len(self._confirmed)

    def wait_time(self, tokens: int = 0) -> float:
        """Seconds until a submit of `tokens` tokens may go; 0 when it may go now."""
        now = self.clock()
        waits = [self._blocked_until - now]
        while self._sent and self._sent[0] <= now - MINUTE:
            self._sent.popleft()
        if len(self._sent) >= self.rpm:
            waits.append(self._sent[0] + MINUTE - now)
        if self.in_flight >= self.max_in_flight:
            waits.append(1.0)  # unknown: until the next recount shows a finished task
        if self.daily_tokens is not None and self._tokens_today() + tokens > self.daily_tokens:
            waits.append(self._seconds_to_midnight())
        return max(0.0, *waits)

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[Slot]:
        """Take a place for one submit of `tokens` tokens, or raise LimitReached.

        The place is given back when the block ends, unless `keep()` was called: then the task holds it
        (its tracking message counts in the broker) until the task ends.
        """
        wait = self.try_acquire(tokens)
        if wait > 0:
            raise LimitReached("tier", wait)
        taken = Slot()
        try:
            yield taken
        finally:
            self.release(tracked=taken.kept)

    def try_acquire(self, tokens: int) -> float:
        """Take a slot for one submit and return 0, or take nothing and return the seconds to wait."""
        wait = self.wait_time(tokens)
        if wait > 0:
            return wait
        self._sent.append(self.clock())
        self._pending += 1
        self._tokens_today()
        self._tokens_used += tokens
        return 0.0

    def release(self, *, tracked: bool) -> None:
        """The submit that took a slot is over: `tracked` when its task now sits in the broker."""
        self._pending -= 1
        if tracked:
            self.moved()

    def moved(self) -> None:
        """This replica just put a tracking message into a queue: count it until a recount has seen it."""
        self._confirmed.append(self.clock())

    def block_for(self, seconds: float) -> None:
        """The API said 429: nobody in this tier submits for `seconds`."""
        self._blocked_until = max(self._blocked_until, self.clock() + seconds)

    def recount_started(self) -> float:
        return self.clock()

    def recounted(self, broker_in_flight: int, started: float) -> None:
        """The broker counted `broker_in_flight` tracking messages in a count begun at `started`.

        A message between two queues (being dead-lettered, or delivered to a replica and not yet in its
        hands) is seen by no count; taking the larger of the last two counts covers any message that was
        not in transit at both, at the price of noticing a finished task one recount later.
        """
        self._broker_in_flight = max(broker_in_flight, self._last_count)
        self._last_count = broker_in_flight
        while self._confirmed and self._confirmed[0] < started:
            self._confirmed.popleft()

    def _tokens_today(self) -> int:
        day = datetime.fromtimestamp(self.wall(), UTC).date().isoformat()
        if day != self._tokens_day:
            self._tokens_day, self._tokens_used = day, 0
        return self._tokens_used

    def _seconds_to_midnight(self) -> float:
        now = datetime.fromtimestamp(self.wall(), UTC)
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return (midnight - now).total_seconds()

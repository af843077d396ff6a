"""The recount: tasks in flight per tier, counted from the broker every SEEDANCE_IN_FLIGHT_REFRESH_SECONDS.

Tasks in flight of a tier = the tracking messages of the tier in the broker (any replica's) plus those in
this replica's hands. The queues are read in the direction messages flow (delay queues, then the tracking
queue, then the deliveries in hand), so a message moving during the count is seen twice rather than
missed. Each round also counts the account's use of its limits, ticks the leader queue (worker.leader),
and, on the leader only, reconciles the permits with the count (worker.limits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from contracts.api import ServiceTier
from contracts.messages import DEAD_LETTER_QUEUE, TIERS
from worker import topology
from worker.leader import Leadership
from worker.limits import TierLimits
from worker.logs import Repeats
from worker.metrics import Metrics
from worker.settings import Settings
from worker.stopping import Stopping

log = logging.getLogger(__name__)

REMIND_SECONDS = 60.0


class InHand(Protocol):
    """The deliveries this replica holds (worker.consumer.Consumer)."""

    def tracking_in_hand(self, tier: ServiceTier) -> int: ...


class Recount:
    def __init__(
        self,
        settings: Settings,
        limits: Mapping[ServiceTier, TierLimits],
        metrics: Metrics,
        stopping: Stopping,
        leadership: Leadership,
        *,
        counted: Callable[[], None],
        queue_missing: Callable[[], None],
    ) -> None:
        """`counted()` is called after every complete round, `queue_missing()` when a queue was not there
        (the topology must be declared again)."""
        self._settings = settings
        self._limits = limits
        self._metrics = metrics
        self._stopping = stopping
        self._leadership = leadership
        self._counted = counted
        self._queue_missing = queue_missing

    async def run(self, connection: AbstractRobustConnection, channel: AbstractChannel, consumer: InHand) -> None:
        """Count on `channel` until stopping. A failed round (a missing queue, a node down) leaves the
        limits on the last counts; it is said at warning, once per kind of failure and then every minute."""
        repeats = Repeats(REMIND_SECONDS)
        while not self._stopping.is_set():
            try:
                await self._round(connection, channel, consumer)
                self._counted()
                repeats.clear()
            except Exception as exc:
                if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                    self._queue_missing()
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
                if repeats.news(why) is not None:
                    log.warning("the recount of tasks in flight failed (%s); next round retries", why)
                log.debug("why", exc_info=True)
            await self._stopping.sleep(self._settings.in_flight_refresh_seconds)

    async def _round(self, connection: AbstractRobustConnection, channel: AbstractChannel, consumer: InHand) -> None:
        leader = await self._leadership.claim(connection)
        self._metrics.limits_leader.set(1 if leader else 0)
        raw = await channel.get_underlay_channel()
        for tier in TIERS:
            limits = self._limits[tier]
            await limits.check()
            if limits.unreachable is not None:
                continue  # said by the limits themselves; the other tier is counted all the same
            total = 0
            for name in reversed(topology.tracking_queues(tier, self._settings)):
                declared = await raw.queue_declare(name, passive=True)
                total += declared.message_count or 0
            total += consumer.tracking_in_hand(tier)
            self._metrics.tasks_in_flight.labels(tier).set(total)
            if leader:
                await limits.reconcile(total)
            taken = await limits.slots_taken()
            if taken is not None:
                self._metrics.account_slots_taken.labels(tier).set(taken)
            minute = await limits.submits_last_minute()
            if minute is not None:
                self._metrics.account_submits_last_minute.labels(tier).set(minute)
        for name in (*(topology.job_queue(t) for t in TIERS), DEAD_LETTER_QUEUE):
            declared = await raw.queue_declare(name, passive=True)
            self._metrics.queue_messages.labels(name).set(declared.message_count or 0)

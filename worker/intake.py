"""Intake: which queues this replica consumes.

A tier's job queue is consumed while the API accepts the worker's key, the video store (when there is
one) accepts its credentials, and the tier's limits could admit the cheapest job now; otherwise its
consumer is cancelled and jobs wait in RabbitMQ, not in memory. The tracking queues are consumed while
the API accepts the key, the copy-stage queues while the store accepts the credentials. A consumer the
broker cancelled is consumed again, after the topology is declared again.

Intake runs beside it the recount of tasks in flight (worker.recount), which also keeps the leader
(worker.leader) ticking.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from contracts.api import ServiceTier
from contracts.messages import TIERS
from worker import topology
from worker.access import Access
from worker.consumer import Consumer
from worker.job_ids import JobIds
from worker.leader import Leadership
from worker.limits import TierLimits
from worker.metrics import Metrics
from worker.recount import Recount
from worker.settings import Settings
from worker.stopping import Stopping

log = logging.getLogger(__name__)

HAND_BACK_SECONDS = 5.0  # a paused tier's jobs in hand are settled before its consumer is cancelled

Callback = Callable[[ServiceTier, AbstractIncomingMessage], Awaitable[None]]


@dataclass
class _Feed:
    """One queue this replica may consume, and what to call for each of its deliveries."""

    queue: AbstractQueue
    tier: ServiceTier
    callback: Callback
    tag: str | None = None
    on_cancel: Callable[[aiormq.spec.Basic.Cancel], None] | None = None

    async def lost(self) -> bool:
        """Whether RabbitMQ cancelled our consumer on its own (its queue deleted, a node lost, a quorum
        consumer timeout). aiormq only drops the tag from its channel (aiormq#116): ask the channel."""
        if self.tag is None:
            return False
        channel = await self.queue.channel.get_underlay_channel()
        if not isinstance(channel, aiormq.Channel) or self.tag in channel.consumers:
            return False
        tag, self.tag = self.tag, None
        with contextlib.suppress(Exception):
            await self.queue.cancel(tag)  # forget it in aio-pika too, so a reconnect does not revive it
        return True

    async def want(self, on: bool, hand_back: HandBack | None = None) -> None:
        if on and self.tag is None:
            tier, callback = self.tier, self.callback

            async def deliver(message: AbstractIncomingMessage) -> None:
                await callback(tier, message)

            self.tag = await self.queue.consume(deliver)
            channel = await self.queue.channel.get_underlay_channel()
            if isinstance(channel, aiormq.Channel) and self.on_cancel is not None:
                # aio-pika may restore a consumer the broker cancelled before `lost()` looks: every cancel
                # is heard here all the same.
                channel.on_consumer_cancel_callbacks.add(self.on_cancel)
            log.info("consuming %s", self.queue.name)
        elif not on and self.tag is not None:
            # RabbitMQ 3.10 can strand the unacknowledged deliveries of a cancelled quorum consumer whose
            # channel's node then dies: a job consumer is never cancelled while it holds any.
            if hand_back is not None and hand_back.release:
                await hand_back.settle()  # the jobs in hand go back to the queue now, untried
            elif hand_back is not None and hand_back.in_hand():
                return  # jobs held for a limit: each is submitted or back in the queue within the hold limit
            tag, self.tag = self.tag, None
            await self.queue.cancel(tag)
            if hand_back is not None:
                await hand_back.settle()  # deliveries already on their way when the cancel went out
            log.info("paused %s", self.queue.name)


@dataclass
class HandBack:
    """What a job feed asks the consumer before and after its consumer is cancelled."""

    in_hand: Callable[[], int]
    settle: Callable[[], Awaitable[object]]
    release: bool  # pausing for a refusal (not a limit): jobs in hand go back at once, untried


class Intake:
    def __init__(
        self,
        settings: Settings,
        limits: Mapping[ServiceTier, TierLimits],
        api_access: Access,
        store_access: Access | None,
        metrics: Metrics,
        stopping: Stopping,
        ids: JobIds | None = None,
    ) -> None:
        self._settings = settings
        self._ids = ids
        self._limits = limits
        self._api_access = api_access
        self._store_access = store_access
        self._metrics = metrics
        self._stopping = stopping
        self._wake = asyncio.Event()
        self._jobs: dict[ServiceTier, _Feed] = {}
        self._tracking: dict[ServiceTier, _Feed] = {}
        self._store: dict[ServiceTier, _Feed] = {}
        self._leadership = Leadership()
        self._recount = Recount(
            settings, limits, metrics, stopping, self._leadership, counted=self.wake, queue_missing=self._queue_missing
        )
        self._unconsumed: list[str] = []  # queues meant to be consumed that are not, now
        self._redeclare = False
        self._declarer: AbstractChannel | None = None
        self._consumer: Consumer | None = None

    def leads(self) -> bool:
        """Whether this replica is the limits leader now (worker.leader)."""
        return self._leadership.leader

    def _queue_missing(self) -> None:
        self._redeclare = True  # the supervisor declares the topology again at its next round

    def wake(self) -> None:
        """Re-decide now (the API's verdict on the key changed, say) rather than at the next round."""
        self._wake.set()

    def consuming(self) -> list[str]:
        return sorted(feed.queue.name for feed in self._feeds() if feed.tag)

    def unconsumed(self) -> list[str]:
        """Queues this replica means to consume but does not (a consumer RabbitMQ cancelled, not yet
        restored): the worker is not ready while there are any."""
        return list(self._unconsumed)

    def _cancel_heard(self, queue: str) -> Callable[[aiormq.spec.Basic.Cancel], None]:
        def heard(frame: aiormq.spec.Basic.Cancel) -> None:
            self._metrics.consumers_cancelled.labels(queue).inc()
            log.warning(
                "RabbitMQ cancelled the consumer of %s (queue deleted, node lost or consumer timeout): restoring it",
                queue,
            )

        return heard

    def _feeds(self) -> list[_Feed]:
        return [*self._jobs.values(), *self._tracking.values(), *self._store.values()]

    async def run(self, connection: AbstractRobustConnection, consumer: Consumer) -> None:
        """Open a channel per queue (each with its own prefetch) and supervise them until stopping."""
        for tier in TIERS:
            jobs = await connection.channel()
            await jobs.set_qos(prefetch_count=self._settings.tiers[tier].prefetch)
            self._jobs[tier] = _Feed(await jobs.get_queue(topology.job_queue(tier)), tier, consumer.on_job)
            tracking = await connection.channel()
            await tracking.set_qos(prefetch_count=self._settings.tracking_prefetch)
            queue = await tracking.get_queue(topology.tracking_queue(tier))
            self._tracking[tier] = _Feed(queue, tier, consumer.on_tracking)
            store = await connection.channel()
            await store.set_qos(prefetch_count=self._settings.storage_concurrency)
            self._store[tier] = _Feed(await store.get_queue(topology.store_queue(tier)), tier, consumer.on_store)
        self._consumer = consumer
        for feed in self._feeds():
            feed.on_cancel = self._cancel_heard(feed.queue.name)
        counter = await connection.channel()
        self._declarer = await connection.channel()
        # Both loops end by themselves once stopping is set (cancelling a passive declare mid-way would
        # make aiormq close its channel with a warning).
        try:
            await asyncio.gather(self._supervise(), self._recount.run(connection, counter, consumer))
        finally:
            await self._leadership.close()

    async def close(self) -> None:
        """Stop consuming everything (deliveries in hand carry on)."""
        for feed in self._feeds():
            with contextlib.suppress(Exception):
                await feed.want(False)

    async def _restore_if_lost(self, feed: _Feed) -> None:
        """A consumer RabbitMQ cancelled is consumed again this round, after declaring the topology again
        (the queue may have been deleted: declaring is idempotent)."""
        try:
            lost = await feed.lost()
        except Exception:
            log.debug("cannot check the consumer of %s", feed.queue.name, exc_info=True)
            return
        if lost:
            self._redeclare = True
        if self._redeclare and self._declarer is not None:
            try:
                await topology.declare(self._declarer, self._settings)
                self._redeclare = False
            except Exception as exc:
                log.warning("cannot declare the topology again (%s); next round tries again", exc)

    async def _supervise(self) -> None:
        while not self._stopping.is_set():
            unconsumed: list[str] = []
            api_ok = self._api_access.ok
            store_ok = self._store_access is None or self._store_access.ok
            for tier in TIERS:
                # Open only while no limit of the tier was found full (or unreachable) just now: jobs wait
                # in RabbitMQ, not in this replica's hands.
                limits = self._limits[tier]
                # ... and while this replica knows every job id taken so far (worker.job_ids): a copy of a
                # job taken elsewhere must be recognised as one.
                ids_current = self._ids is None or self._ids.current
                open_ = api_ok and store_ok and ids_current and limits.wait_time() == 0
                self._metrics.consumer_paused.labels(tier).set(0 if open_ else 1)
                self._metrics.permits_unreachable.labels(tier).set(0 if limits.unreachable is None else 1)
                wanted = ((self._jobs[tier], open_), (self._tracking[tier], api_ok), (self._store[tier], store_ok))
                for feed, on in wanted:
                    await self._restore_if_lost(feed)
                    hand_back = None
                    if feed is self._jobs[tier] and self._consumer is not None:
                        consumer = self._consumer
                        hand_back = HandBack(
                            functools.partial(consumer.jobs_in_hand, tier),
                            functools.partial(consumer.hand_back, tier, HAND_BACK_SECONDS),
                            release=not (api_ok and store_ok),
                        )
                    try:
                        await feed.want(on, hand_back)
                    except Exception as exc:
                        log.warning("cannot consume %s (%s); next round tries again", feed.queue.name, exc)
                        log.debug("why", exc_info=True)
                        self._redeclare = True
                    if on and feed.tag is None:
                        unconsumed.append(feed.queue.name)
            self._unconsumed = unconsumed
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._settings.in_flight_refresh_seconds)

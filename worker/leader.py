"""Which replica reconciles the account's limits (worker.limits): the one RabbitMQ makes the active
consumer of the single-active-consumer quorum queue `seedance.leader`.

Every replica consumes that queue and publishes a tick to it at each recount; RabbitMQ delivers all of
them to its one active consumer. A replica leads while ticks reach it (within LEAD_SECONDS). When the
leader's connection or node goes, RabbitMQ makes another consumer active and the ticks go there: the
role moves within a tick or two, across nodes, with no declare refused and no channel closed on the
replicas that wait (the exclusive queue used before was re-declared every second by each of them, and
on RabbitMQ 4.2+ outlives a crashed node).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from worker import topology

log = logging.getLogger(__name__)

LEAD_SECONDS = 3.0  # a replica that got no tick for this long no longer leads
TICK_TTL_MS = 5000  # ticks nobody consumed are dropped (and never more than a few are kept)
LEADER_ARGUMENTS = {
    **topology.QUORUM,
    "x-single-active-consumer": True,
    "x-message-ttl": TICK_TTL_MS,
    "x-max-length": 16,
    "x-overflow": "drop-head",
}


class Leadership:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._channel: AbstractChannel | None = None
        self._last_tick: float | None = None
        self.leader = False

    async def _on_tick(self, message: AbstractIncomingMessage) -> None:
        self._last_tick = self._clock()

    async def _start(self, connection: AbstractRobustConnection) -> AbstractChannel:
        if self._channel is None:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=4)
            queue = await channel.declare_queue(topology.LEADER_QUEUE, durable=True, arguments=LEADER_ARGUMENTS)
            # aio-pika restores the queue and this consumer after a lost connection or channel.
            await queue.consume(self._on_tick, no_ack=True)
            self._channel = channel
        return self._channel

    async def claim(self, connection: AbstractRobustConnection) -> bool:
        """Tick, and say whether this replica leads now (False while it waits, or cannot reach RabbitMQ)."""
        try:
            channel = await self._start(connection)
            await channel.default_exchange.publish(
                aio_pika.Message(b"", delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT),
                routing_key=topology.LEADER_QUEUE,
            )
        except Exception as exc:
            log.debug("cannot tick the leader queue (%s)", exc)
        leads = self._last_tick is not None and self._clock() - self._last_tick < LEAD_SECONDS
        if leads != self.leader:
            if leads:
                log.info("leading the reconciliation of the account's limits")
            else:
                log.warning("no longer the leader reconciling the account's limits")
        self.leader = leads
        return leads

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        self._channel = None

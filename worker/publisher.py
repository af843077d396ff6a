"""Publishing with publisher confirms: every method returns once the broker has confirmed the message, and
raises when it refused or could not route it. Built after the connection is up, so it always has a
channel; the consumer (worker.consumer) acks a delivery only after these calls return.

`Publishing` and `Received` are the seams the consumer's ack rules are tested against without a broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from contracts.messages import EVENTS_EXCHANGE, JobEvent
from worker import topology
from worker.tracking import TrackingState, pick_delay_level

PERSISTENT = aio_pika.DeliveryMode.PERSISTENT


class Received(Protocol):
    """What the worker reads off a delivery and does with it (aio-pika's IncomingMessage is one)."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any]: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def redelivered(self) -> bool | None: ...

    async def ack(self, multiple: bool = False) -> None: ...
    async def nack(self, multiple: bool = False, requeue: bool = True) -> None: ...


class Publishing(Protocol):
    """Confirmed publishing, as the consumer needs it."""

    async def track(self, state: TrackingState, delay: float) -> None:
        """Send a tracking state to come back after about `delay` seconds (to its stage's queues)."""

    async def event(self, event: JobEvent, reply_to: str | None, correlation_id: str | None) -> None:
        """Publish an event to seedance.events (and a terminal one to `reply_to`)."""

    async def republish(
        self, message: Received, queue: str, headers: Mapping[str, Any], timestamp: datetime | None
    ) -> None:
        """Publish a delivery's body and properties unchanged, plus `headers`, to `queue`."""


class Publisher:
    def __init__(self, channel: AbstractChannel, events: AbstractExchange, delays_ms: tuple[int, ...]) -> None:
        self._default = channel.default_exchange
        self._events = events
        self._delays_ms = delays_ms

    @classmethod
    async def open(cls, channel: AbstractChannel, delays_ms: tuple[int, ...]) -> Publisher:
        """A publisher on `channel`, which must have publisher confirms on (and the topology declared)."""
        return cls(channel, await channel.get_exchange(EVENTS_EXCHANGE, ensure=False), delays_ms)

    async def track(self, state: TrackingState, delay: float) -> None:
        if state.stage == "store":
            queue = (
                topology.store_queue(state.tier)
                if delay <= 0
                else topology.store_delay_queue(state.tier, pick_delay_level(topology.STORE_DELAYS_MS, delay))
            )
        else:
            queue = topology.delay_queue(state.tier, pick_delay_level(self._delays_ms, delay))
        body = state.model_dump_json().encode()
        message = aio_pika.Message(body, delivery_mode=PERSISTENT, content_type="application/json")
        await self._default.publish(message, routing_key=queue)

    async def event(self, event: JobEvent, reply_to: str | None, correlation_id: str | None) -> None:
        body = event.model_dump_json().encode()

        def message() -> aio_pika.Message:
            return aio_pika.Message(
                body,
                delivery_mode=PERSISTENT,
                content_type="application/json",
                message_id=f"{event.job_id}:{event.status}",
                correlation_id=correlation_id,
                timestamp=event.emitted_at,
                type=f"seedance.job.{event.status}",
                headers={"job_id": event.job_id, "status": event.status},
            )

        # Nobody may be bound to seedance.events yet: that is the subscribers' business, not an error.
        sends = [self._events.publish(message(), routing_key=f"job.{event.status}", mandatory=False)]
        if event.terminal and reply_to:
            sends.append(self._default.publish(message(), routing_key=reply_to, mandatory=False))
        await asyncio.gather(*sends)

    async def republish(
        self, message: Received, queue: str, headers: Mapping[str, Any], timestamp: datetime | None
    ) -> None:
        copy = aio_pika.Message(
            message.body,
            headers={**(message.headers or {}), **headers},
            delivery_mode=PERSISTENT,
            content_type=message.content_type,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
            timestamp=timestamp,
        )
        await self._default.publish(copy, routing_key=queue)

"""Publishing with publisher confirms: every method returns once the broker has confirmed the message, and
raises when it refused or could not route it. Built after the connection is up, so it always has a
channel; the consumer (worker.consumer) acks a delivery only after these calls return.

`Publishing` and `Received` are the seams the consumer's ack rules are tested against without a broker.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from aio_pika.abc import AbstractChannel
from aiormq import spec

from contracts.messages import EVENTS_EXCHANGE, JobEvent
from worker import topology
from worker.tracking import TrackingState, pick_delay_level

PERSISTENT = 2  # AMQP delivery mode: written to disk
JSON = "application/json"


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
    """Publishes through the channel's aiormq channel with prebuilt AMQP properties: aio-pika's Message
    objects cost as much CPU as the publish itself, and the worker publishes three messages per job."""

    def __init__(self, channel: AbstractChannel, delays_ms: tuple[int, ...]) -> None:
        self._channel = channel  # a robust channel: its aiormq channel is asked for on each publish
        self._delays_ms = delays_ms
        self._ids = itertools.count()  # aiormq matches a returned (unroutable) message by its id

    @classmethod
    async def open(cls, channel: AbstractChannel, delays_ms: tuple[int, ...]) -> Publisher:
        """A publisher on `channel`, which must have publisher confirms on and return unroutable messages
        as errors (`on_return_raises`), with the topology declared."""
        await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
        return cls(channel, delays_ms)

    async def track(self, state: TrackingState, delay: float) -> None:
        if state.stage == "store":
            queue = (
                topology.store_queue(state.tier)
                if delay <= 0
                else topology.store_delay_queue(state.tier, pick_delay_level(topology.STORE_DELAYS_MS, delay))
            )
        else:
            queue = topology.delay_queue(state.tier, pick_delay_level(self._delays_ms, delay))
        properties = spec.Basic.Properties(
            delivery_mode=PERSISTENT, content_type=JSON, message_id=f"seedance-{next(self._ids)}"
        )
        channel = await self._channel.get_underlay_channel()
        await channel.basic_publish(
            state.model_dump_json().encode(), routing_key=queue, properties=properties, mandatory=True
        )

    async def event(self, event: JobEvent, reply_to: str | None, correlation_id: str | None) -> None:
        body = event.model_dump_json().encode()
        properties = spec.Basic.Properties(
            delivery_mode=PERSISTENT,
            content_type=JSON,
            message_id=f"{event.job_id}:{event.status}",
            correlation_id=correlation_id,
            timestamp=event.emitted_at,
            message_type=f"seedance.job.{event.status}",
            headers={"job_id": event.job_id, "status": event.status},
        )
        channel = await self._channel.get_underlay_channel()
        # Nobody may be bound to seedance.events yet: that is the subscribers' business, not an error.
        to_events = channel.basic_publish(
            body, exchange=EVENTS_EXCHANGE, routing_key=f"job.{event.status}", properties=properties
        )
        if event.terminal and reply_to:
            await asyncio.gather(to_events, channel.basic_publish(body, routing_key=reply_to, properties=properties))
        else:
            await to_events

    async def republish(
        self, message: Received, queue: str, headers: Mapping[str, Any], timestamp: datetime | None
    ) -> None:
        kept = {k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"}  # the queue's own
        properties = spec.Basic.Properties(
            delivery_mode=PERSISTENT,
            headers={**kept, **headers},
            content_type=message.content_type,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            # The producer's id goes along (dead letters are kept unchanged); aiormq needs one to match a return.
            message_id=message.message_id or f"seedance-{next(self._ids)}",
            timestamp=timestamp,
        )
        channel = await self._channel.get_underlay_channel()
        await channel.basic_publish(message.body, routing_key=queue, properties=properties, mandatory=True)

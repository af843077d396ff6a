"""The producer's client: submit jobs, await and follow their events, cancel them, over RabbitMQ alone.

    async with await Client.connect("amqp://guest:guest@localhost:5672/") as client:
        job = await client.submit(image="https://example.com/boat.png", prompt="a paper boat", tier="flex")
        event = await job.result(timeout=3600)      # the terminal JobEvent: succeeded, failed, ...
        await client.cancel("some-other-job-id")

It speaks only the public wire contract (README, "Wire contract") with the models of `contracts`, and
imports nothing of the worker. One connection and one reply queue serve any number of jobs: every job
names the queue in `reply_to`, so its terminal event comes back there; with `follow=True` the queue is
also bound to every job's `submitted` and `progress` events on `seedance.events`, and the client keeps
those of its own jobs. Every publish is confirmed; one whose confirm is lost (a timeout, a lost
connection) is sent again with the same `job_id`, which the worker never submits twice.

`BlockingClient` is the same for scripts without an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue
from pydantic import JsonValue, ValidationError

from contracts import validation_message
from contracts.api import ServiceTier, SubmitRequest
from contracts.brokers import broker_urls, connect_first
from contracts.messages import (
    CANCEL_ROUTING_KEY,
    EVENTS_EXCHANGE,
    JOBS_EXCHANGE,
    CancelRequest,
    JobEvent,
    JobMessage,
)

log = logging.getLogger(__name__)

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
REPLY_QUEUE_EXPIRES_MS = 30 * 60 * 1000  # a reply queue nobody consumes (its client gone) goes after 30 min
FOLLOWED = ("submitted", "progress")  # with follow=True; terminal events come through reply_to

T = TypeVar("T")


class ClientError(Exception):
    """Base of what the client raises on purpose."""


class InvalidJob(ClientError, ValueError):
    """The job (or cancel) is not valid under the wire contract; nothing was published."""


class NotRouted(ClientError):
    """RabbitMQ had no queue for the message: no worker has declared the topology yet."""


class NotConfirmed(ClientError):
    """The broker never confirmed the message, after every attempt (it may still have arrived)."""


@dataclass
class _Watch:
    """What the client knows of one of its jobs: the events that came in, the terminal one."""

    events: asyncio.Queue[JobEvent] = field(default_factory=asyncio.Queue)
    terminal: asyncio.Future[JobEvent] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Job:
    """A handle on a submitted job."""

    def __init__(self, client: Client, job_id: str, tier: ServiceTier, watch: _Watch) -> None:
        self._client = client
        self.job_id = job_id
        self.tier = tier
        self._watch = watch

    def __repr__(self) -> str:
        return f"Job({self.job_id!r}, tier={self.tier!r})"

    async def result(self, timeout: float | None = None) -> JobEvent:  # noqa: ASYNC109 - the API users expect
        """The job's terminal event (`succeeded`, `failed`, `expired`, `rejected` or `cancelled`);
        TimeoutError after `timeout` seconds (the job goes on)."""
        return await asyncio.wait_for(asyncio.shield(self._watch.terminal), timeout)

    async def events(self, timeout: float | None = None) -> AsyncIterator[JobEvent]:  # noqa: ASYNC109
        """The job's events as they arrive, ending with its terminal one (`submitted` and `progress` only
        when the client follows them, see `Client.connect`); TimeoutError when `timeout` seconds pass
        without the job ending."""
        # A deadline rather than asyncio.timeout: a timeout's cancel must not land in the caller's code
        # between two events.
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {self.job_id} did not end within {timeout} s")
            getting = asyncio.ensure_future(self._watch.events.get())
            try:
                await asyncio.wait({getting, self._watch.terminal}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getting.done():
                    getting.cancel()
            if getting.done() and not getting.cancelled():
                yield getting.result()  # never a terminal one: those end the watch
                continue
            if not self._watch.terminal.done():
                continue
            while not self._watch.events.empty():  # what came in before the end, in order
                yield self._watch.events.get_nowait()
            yield self._watch.terminal.result()
            return

    async def cancel(self, reason: str | None = None) -> None:
        await self._client.cancel(self.job_id, reason)


class Client:
    """One connection, one channel with publisher confirms, one reply queue; see the module's docstring."""

    def __init__(
        self,
        connection: aio_pika.abc.AbstractRobustConnection,
        channel: AbstractChannel,
        jobs: AbstractExchange,
        replies: AbstractQueue,
        *,
        confirm_timeout: float,
        attempts: int,
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._jobs = jobs
        self._replies = replies
        self._confirm_timeout = confirm_timeout
        self._attempts = attempts
        self._watches: dict[str, _Watch] = {}

    @classmethod
    async def connect(
        cls,
        amqp_url: str = DEFAULT_AMQP_URL,
        *,
        follow: bool = False,
        confirm_timeout: float = 10.0,
        attempts: int = 5,
        connect_timeout: float = 10.0,
    ) -> Client:
        """Connect to RabbitMQ: one URL, or several URLs of one cluster separated by commas (the first that
        answers; a lost node's connection moves to the next). With `follow`, every job's `submitted` and
        `progress` events come to this client too (it keeps its own jobs')."""
        urls = broker_urls(amqp_url)
        connection = await connect_first(
            urls,
            connect_timeout=connect_timeout,
            client_properties={"connection_name": "seedance-client"},
            reconnect_interval=1.0,
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            jobs = await channel.get_exchange(JOBS_EXCHANGE, ensure=False)
            # A named queue that outlives a lost connection, so the terminal events that arrive meanwhile
            # wait for the client; x-expires removes it once unused. Durable: RabbitMQ 4.x deprecates
            # transient queues that are not exclusive.
            replies = await channel.declare_queue(
                f"seedance.client.{uuid.uuid4().hex}",
                durable=True,
                auto_delete=False,
                arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS},
            )
            if follow:
                events = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
                for status in FOLLOWED:
                    await replies.bind(events, routing_key=f"job.{status}")
        except BaseException:
            await connection.close()
            raise
        client = cls(connection, channel, jobs, replies, confirm_timeout=confirm_timeout, attempts=attempts)
        await replies.consume(client._on_event, no_ack=True)
        return client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._replies.delete(if_unused=False, if_empty=False)
        await self._connection.close()

    @property
    def reply_queue(self) -> str:
        return self._replies.name

    # Jobs
    async def submit(
        self,
        request: SubmitRequest | Mapping[str, Any] | None = None,
        *,
        tier: ServiceTier | None = None,
        job_id: str | None = None,
        metadata: Mapping[str, JsonValue] | None = None,
        created_at: datetime | None = None,
        **fields: Any,
    ) -> Job:
        """Publish a job and return its handle once the broker confirmed it.

        `request` is the API's submit body (a `SubmitRequest` or a mapping); keyword `fields` (`image`,
        `prompt`, `duration`, ...) are merged over it, and `tier` sets its `service_tier`. `job_id`
        defaults to a random uuid. InvalidJob when the result is no valid job; NotRouted when no worker
        has declared the queues yet."""
        body: dict[str, Any] = {}
        if isinstance(request, SubmitRequest):
            body = request.model_dump(exclude_unset=True)
        elif request is not None:
            body = dict(request)
        body.update(fields)
        if tier is not None:
            body["service_tier"] = tier
        message: dict[str, Any] = {"job_id": job_id or str(uuid.uuid4()), "request": body}
        if metadata is not None:
            message["metadata"] = dict(metadata)
        if created_at is not None:
            message["created_at"] = created_at
        try:
            job = JobMessage.model_validate(message)
        except ValidationError as exc:
            raise InvalidJob(validation_message(exc)) from None
        return await self.submit_job(job)

    async def submit_job(self, job: JobMessage) -> Job:
        """Publish a validated job message as it is; see `submit`."""
        watch = self._watches.setdefault(job.job_id, _Watch())
        message = aio_pika.Message(
            job.model_dump_json(exclude_none=True).encode(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            message_id=job.job_id,
            correlation_id=job.job_id,
            reply_to=self._replies.name,
            timestamp=datetime.now(UTC),
        )
        tier = job.request.service_tier
        try:
            await self._publish(message, f"job.{tier}")
        except BaseException:
            self._watches.pop(job.job_id, None)
            raise
        return Job(self, job.job_id, tier, watch)

    async def cancel(self, job_id: str, reason: str | None = None) -> None:
        """Ask the workers to cancel a job (README, "Cancelling a job"): returns once the broker confirmed
        the cancel. Its outcome is the job's terminal event, when the job has not ended already."""
        try:
            cancel = CancelRequest(job_id=job_id, reason=reason)
        except ValidationError as exc:
            raise InvalidJob(validation_message(exc)) from None
        message = aio_pika.Message(
            cancel.model_dump_json(exclude_none=True).encode(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            message_id=f"cancel:{job_id}",
            timestamp=datetime.now(UTC),
        )
        await self._publish(message, CANCEL_ROUTING_KEY)

    async def _publish(self, message: aio_pika.Message, routing_key: str) -> None:
        """Publish, confirmed; a lost confirm (timeout, lost connection, the broker's nack) is sent again,
        the same message, after a pause of at least a second (the worker's duplicate window)."""
        for attempt in range(1, self._attempts + 1):
            try:
                await self._jobs.publish(message, routing_key, mandatory=True, timeout=self._confirm_timeout)
                return  # noqa: TRY300 - the except clauses below are the retries of this one call
            except (aio_pika.exceptions.PublishError, aiormq.exceptions.ChannelNotFoundEntity):
                # Returned unroutable, or no seedance.jobs exchange at all (a vhost no worker has declared).
                raise NotRouted(
                    f"no queue took the message (routing key {routing_key}): start seedance-worker once so it "
                    "declares them"
                ) from None
            except (
                TimeoutError,
                ConnectionError,
                aio_pika.exceptions.DeliveryError,
                aio_pika.exceptions.ChannelInvalidStateError,
                aiormq.exceptions.ConnectionClosed,
            ) as exc:
                if attempt == self._attempts:
                    raise NotConfirmed(
                        f"no confirm from RabbitMQ after {attempt} attempts ({type(exc).__name__})"
                    ) from None
                log.warning("no confirm for %s (%s): sending it again", routing_key, type(exc).__name__)
                await asyncio.sleep(min(10.0, float(attempt)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._connection.connected.wait(), self._confirm_timeout)

    async def _on_event(self, incoming: AbstractIncomingMessage) -> None:
        try:
            event = JobEvent.model_validate_json(incoming.body)
        except ValidationError:
            log.warning("an event that is no JobEvent arrived on %s: ignored", self._replies.name)
            return
        watch = self._watches.get(event.job_id)
        if watch is None:
            return  # another producer's job (following), or a job whose end came already
        if event.terminal:
            if not watch.terminal.done():
                watch.terminal.set_result(event)
            del self._watches[event.job_id]
            return
        watch.events.put_nowait(event)

    # Every job's events
    async def watch(
        self,
        statuses: Iterable[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a generator: the caller cannot wrap it in a timeout
    ) -> AsyncIterator[JobEvent]:
        """Every event published to seedance.events (of these statuses), any producer's, as they arrive,
        on a queue of its own that goes with the iterator; ends after `timeout` seconds."""
        channel = await self._connection.channel()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            events = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for status in statuses or ["#"]:
                await queue.bind(events, routing_key=f"job.{status}")
            arrived: asyncio.Queue[bytes] = asyncio.Queue()

            async def on_event(incoming: AbstractIncomingMessage) -> None:
                arrived.put_nowait(incoming.body)

            await queue.consume(on_event, no_ack=True)
            while True:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    return
                try:
                    body = await asyncio.wait_for(arrived.get(), left)
                except TimeoutError:
                    return
                try:
                    yield JobEvent.model_validate_json(body)
                except ValidationError:
                    log.warning("an event that is no JobEvent arrived: ignored")
        finally:
            with contextlib.suppress(Exception):
                await channel.close()


class BlockingClient:
    """`Client` for code without an event loop: the client runs on a loop in a thread of its own.

    with BlockingClient("amqp://guest:guest@localhost:5672/") as client:
        job = client.submit(image="https://example.com/boat.png", prompt="a paper boat")
        print(job.result(timeout=600).status)
    """

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="seedance-client", daemon=True)
        self._thread.start()
        try:
            self._client = self._run(Client.connect(amqp_url, **options))
        except BaseException:
            self._stop()
            raise

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def submit(self, request: SubmitRequest | Mapping[str, Any] | None = None, **options: Any) -> BlockingJob:
        """See `Client.submit`."""
        return BlockingJob(self, self._run(self._client.submit(request, **options)))

    def cancel(self, job_id: str, reason: str | None = None) -> None:
        self._run(self._client.cancel(job_id, reason))

    def close(self) -> None:
        try:
            self._run(self._client.close())
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class BlockingJob:
    def __init__(self, client: BlockingClient, job: Job) -> None:
        self._client = client
        self._job = job
        self.job_id = job.job_id
        self.tier = job.tier

    def result(self, timeout: float | None = None) -> JobEvent:
        """The job's terminal event; TimeoutError after `timeout` seconds."""
        return self._client._run(self._job.result(timeout))

    def cancel(self, reason: str | None = None) -> None:
        self._client._run(self._job.cancel(reason))


def dump(event: JobEvent) -> str:
    """An event as one line of JSON, as the worker published it (fields it did not set left out)."""
    return json.dumps(event.model_dump(mode="json", exclude_unset=True), ensure_ascii=False)


__all__ = [
    "BlockingClient",
    "BlockingJob",
    "Client",
    "ClientError",
    "InvalidJob",
    "Job",
    "NotConfirmed",
    "NotRouted",
    "dump",
]

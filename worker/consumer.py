"""The only module that talks to RabbitMQ: it consumes, publishes with confirms, and acks.

For every delivery, the handler decides (worker.handler) and this module carries the decision out in one
order: publish what replaces the delivery (tracking state, events, dead letter, or the job itself),
wait for the broker's confirms, and only then ack. A crash anywhere before the ack leaves the delivery in
its queue; a crash after it has nothing left to lose. The one gap: between the API accepting a task and
the broker confirming its tracking state, a crash makes the job be delivered and submitted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from contracts.api import MIN_TOKENS, ServiceTier
from contracts.messages import DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, TIERS, JobEvent
from worker import topology
from worker.api_client import ApiClient
from worker.backoff import backoff_delay
from worker.errors import ApiError, ConfigurationFault, InvalidJob
from worker.handler import Defer, Delivery, Finish, JobHandler, Outcome, Track
from worker.limits import TierLimits
from worker.metrics import Metrics
from worker.settings import Settings
from worker.tracking import TrackingState, pick_delay_level

log = logging.getLogger(__name__)

PERSISTENT = aio_pika.DeliveryMode.PERSISTENT
ATTEMPTS_HEADER = "x-seedance-attempts"


class Worker:
    """Consumes the tier queues and the tracking queues until `stopping` is set, then drains."""

    def __init__(
        self,
        settings: Settings,
        handler: JobHandler,
        api: ApiClient,
        limits: Mapping[ServiceTier, TierLimits],
        metrics: Metrics,
        stopping: asyncio.Event,
    ) -> None:
        self._settings = settings
        self._handler = handler
        self._api = api
        self._limits = limits
        self._metrics = metrics
        self._stopping = stopping
        self._wake = asyncio.Event()
        self._api_ok = True
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._events: AbstractExchange | None = None
        self._queues: dict[str, AbstractQueue] = {}
        self._tags: dict[str, str | None] = {}
        # Strong references to everything spawned: the loop keeps only weak ones, and a task collected
        # mid-flight would vanish without a trace.
        self._background: set[asyncio.Task[Any]] = set()
        self._handling: set[asyncio.Task[Any]] = set()
        self._tracking_busy: dict[ServiceTier, int] = dict.fromkeys(TIERS, 0)
        self._probe: asyncio.Task[None] | None = None
        self.declared = False

    # Readiness, as /readyz reports it
    @property
    def ready(self) -> bool:
        connected = self._connection is not None and self._connection.connected.is_set()
        return self.declared and connected and self._api_ok and not self._stopping.is_set()

    def readiness(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "broker_connected": self._connection is not None and self._connection.connected.is_set(),
            "topology_declared": self.declared,
            "api_access_ok": self._api_ok,
            "stopping": self._stopping.is_set(),
            "consuming": sorted(name for name, tag in self._tags.items() if tag),
        }

    # Life cycle
    async def _connect(self) -> AbstractRobustConnection | None:
        """Connect to RabbitMQ, retrying with back-off until it answers or the worker is stopped."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                return await aio_pika.connect_robust(
                    self._settings.amqp_url.get_secret_value(),
                    client_properties={"connection_name": "seedance-worker"},
                )
            except (ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
                attempt += 1
                delay = backoff_delay(attempt, base=1.0, cap=30.0)
                log.warning("cannot reach RabbitMQ (%s); retrying in %.0f s", type(exc).__name__, delay)
                await self.sleep(delay)
        return None

    async def run(self) -> None:
        """Serve until `stopping` is set; /healthz stays up meanwhile, /readyz says whether jobs are taken."""
        settings = self._settings
        connection = await self._connect()
        if connection is None:
            return
        self._connection = connection
        try:
            publisher = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._publisher = publisher
            await topology.declare(publisher, settings)
            self._events = await publisher.get_exchange(EVENTS_EXCHANGE)
            counter = await self._connection.channel()
            for tier in TIERS:
                jobs = await self._connection.channel()
                await jobs.set_qos(prefetch_count=settings.prefetch(tier))
                self._queues[f"jobs.{tier}"] = await jobs.get_queue(topology.job_queue(tier))
                tracking = await self._connection.channel()
                await tracking.set_qos(prefetch_count=settings.tracking_prefetch)
                self._queues[f"tracking.{tier}"] = await tracking.get_queue(topology.tracking_queue(tier))
            self.declared = True
            self._spawn(self._count_in_flight(counter))
            self._spawn(self._supervise())
            log.info("worker started", extra={"tiers": ",".join(TIERS)})
            await self._stopping.wait()
            await self._drain()
        finally:
            self._metrics.worker_ready.set(0)
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            await self._connection.close()

    async def _drain(self) -> None:
        self._metrics.worker_ready.set(0)
        for key in list(self._tags):
            await self._consume(key, want=False)
        busy = len(self._handling)
        log.warning("stopping: intake closed, %d deliveries in hand", busy)
        if self._handling:
            done, pending = await asyncio.wait(set(self._handling), timeout=self._settings.drain_timeout_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning(
                "stopped: %d deliveries finished, %d returned unacknowledged to RabbitMQ",
                len(done),
                len(pending),
            )

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False when the sleep was cut short by shutdown."""
        if self._stopping.is_set():
            return False
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    # Deciding what to consume
    async def _supervise(self) -> None:
        while not self._stopping.is_set():
            connected = self._connection is not None and self._connection.connected.is_set()
            for tier in TIERS:
                # Open only if the cheapest job could go now: a token budget nearly spent closes the tier
                # rather than take jobs that could only wait and go back.
                open_ = self._api_ok and self._limits[tier].wait_time(MIN_TOKENS) == 0
                self._metrics.consumer_paused.labels(tier).set(0 if open_ else 1)
                try:
                    await self._consume(f"jobs.{tier}", want=open_)
                    await self._consume(f"tracking.{tier}", want=self._api_ok)
                except Exception:
                    log.debug("consumer change failed; next round retries", exc_info=True)
            self._metrics.worker_ready.set(1 if self.ready and connected else 0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._settings.in_flight_refresh_seconds)

    async def _consume(self, key: str, *, want: bool) -> None:
        queue = self._queues[key]
        tag = self._tags.get(key)
        if want and tag is None:
            kind, tier = key.split(".")
            callback = self._on_job if kind == "jobs" else self._on_tracking
            self._tags[key] = await queue.consume(_bind(callback, tier))
            log.info("consuming %s", queue.name)
        elif not want and tag is not None:
            self._tags[key] = None
            await queue.cancel(tag)
            log.info("paused %s", queue.name)

    async def _count_in_flight(self, channel: AbstractChannel) -> None:
        """Tasks in flight per tier = tracking messages of the tier in the broker (any replica's).

        The queues are read in the direction messages flow (delay queues, then the tracking queue, then
        the deliveries in hand), so a message moving during the count is seen twice rather than missed;
        what this replica publishes during the count is added by the limits' own bookkeeping.
        """
        while not self._stopping.is_set():
            try:
                raw = await channel.get_underlay_channel()
                for tier in TIERS:
                    limits = self._limits[tier]
                    started = limits.recount_started()
                    total = 0
                    for name in reversed(topology.tracking_queues(tier, self._settings)):
                        declared = await raw.queue_declare(name, passive=True)
                        total += declared.message_count or 0
                    total += self._tracking_busy[tier]
                    limits.recounted(total, started)
                    self._metrics.tasks_in_flight.labels(tier).set(limits.in_flight)
                for name in (*(topology.job_queue(t) for t in TIERS), DEAD_LETTER_QUEUE):
                    declared = await raw.queue_declare(name, passive=True)
                    self._metrics.queue_messages.labels(name).set(declared.message_count or 0)
                self._wake.set()
            except Exception:
                log.debug("in-flight recount failed; next round retries", exc_info=True)
            await self.sleep(self._settings.in_flight_refresh_seconds)

    # Deliveries
    async def _on_job(self, tier: ServiceTier, message: AbstractIncomingMessage) -> None:
        with self._handling_scope():
            self._metrics.jobs_received.labels(tier).inc()
            headers = message.headers or {}
            attempts = headers.get(ATTEMPTS_HEADER, 0)
            delivery = Delivery(
                body=message.body,
                tier=tier,
                timestamp=_aware(message.timestamp),
                reply_to=message.reply_to,
                correlation_id=message.correlation_id,
                attempts=attempts if isinstance(attempts, int) else 0,
            )
            try:
                try:
                    outcome: Outcome = await self._handler.handle_job(delivery)
                except InvalidJob as exc:
                    await self._reject(message, tier, exc)
                    return
                except ConfigurationFault as exc:
                    self._api_fault(exc)
                    _, state = self._handler.parse(delivery)
                    outcome = Defer("API access fault", state.created_at, state.attempts)
                await self._carry_out(outcome, message, tier)
            except Exception:
                # A bug or a broker fault: the delivery goes back; the delivery limit ends a loop.
                log.exception("job delivery failed; returning it to the queue")
                await _safely(message.nack(requeue=True))

    async def _on_tracking(self, tier: ServiceTier, message: AbstractIncomingMessage) -> None:
        with self._handling_scope():
            self._tracking_busy[tier] += 1
            try:
                try:
                    state = TrackingState.model_validate_json(message.body)
                except ValidationError:
                    await self._reject(message, tier, InvalidJob("invalid_tracking_state", "unreadable tracking state"))
                    return
                try:
                    outcome: Outcome = await self._handler.handle_tracking(state)
                except ConfigurationFault as exc:
                    self._api_fault(exc)
                    outcome = Track(state, self._settings.poll_bounds(tier)[1])
                await self._carry_out(outcome, message, tier)
            except Exception:
                log.exception("tracking delivery failed; returning it to the queue")
                await _safely(message.nack(requeue=True))
            finally:
                self._tracking_busy[tier] -= 1

    def _handling_scope(self) -> _Scope:
        return _Scope(self._handling)

    # Carrying out outcomes: publish, await confirms, then ack
    async def _carry_out(self, outcome: Outcome, message: AbstractIncomingMessage, tier: ServiceTier) -> None:
        if isinstance(outcome, Track):
            tracked = False
            try:
                # State and events go out together and the ack follows their confirms at once: the time
                # from the API's answer to the ack is the double-submission window, kept to one round trip.
                await asyncio.gather(
                    self._publish_state(outcome.state, outcome.delay),
                    *(
                        self._publish_event(e, outcome.state.reply_to, outcome.state.correlation_id)
                        for e in outcome.events
                    ),
                )
                tracked = True
            finally:
                if outcome.slot is not None:
                    outcome.slot.release(tracked=tracked)
                elif tracked:
                    self._limits[outcome.state.tier].moved()
            await message.ack()
            if outcome.slot is not None and outcome.state.submitted_at is not None:
                window = datetime.now(UTC) - outcome.state.submitted_at
                self._metrics.submit_window.observe(window.total_seconds())
            if outcome.events and outcome.events[0].status == "submitted":
                log.info("submitted", extra=_ids(outcome.state))
        elif isinstance(outcome, Finish):
            await self._publish_event(outcome.event, outcome.state.reply_to, outcome.state.correlation_id)
            await message.ack()
            self._count_terminal(outcome)
        else:
            await self._defer(message, tier, outcome)

    async def _publish_state(self, state: TrackingState, delay: float) -> None:
        level = pick_delay_level(self._settings.tracking_delays_ms, delay)
        body = state.model_dump_json().encode()
        msg = aio_pika.Message(body, delivery_mode=PERSISTENT, content_type="application/json")
        assert self._publisher is not None  # noqa: S101 - set before any consumer starts
        await self._publisher.default_exchange.publish(msg, routing_key=topology.delay_queue(state.tier, level))

    async def _publish_event(self, event: JobEvent, reply_to: str | None, correlation_id: str | None) -> None:
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

        assert self._events is not None and self._publisher is not None  # noqa: S101
        sends = [self._events.publish(message(), routing_key=f"job.{event.status}", mandatory=False)]
        if event.terminal and reply_to:
            sends.append(self._publisher.default_exchange.publish(message(), reply_to, mandatory=False))
        await asyncio.gather(*sends)
        self._metrics.events_published.labels(event.status).inc()

    async def _reject(self, message: AbstractIncomingMessage, tier: ServiceTier, error: InvalidJob) -> None:
        headers = {
            "x-seedance-reason": f"{error.reason}: {error.message}"[:2000],
            "x-seedance-reason-code": error.reason,
            "x-seedance-routing-key": message.routing_key or "",
            "x-seedance-rejected-at": datetime.now(UTC).isoformat(),
        }
        await self._republish(message, DEAD_LETTER_QUEUE, headers, message.timestamp)
        event = self._handler.rejected_event(error)
        if event is not None:
            await self._publish_event(event, message.reply_to, message.correlation_id)
        await message.ack()
        self._metrics.jobs_rejected.labels(error.reason).inc()
        self._metrics.jobs_completed.labels(tier, "rejected").inc()
        log.warning("dead-lettered a message: %s", error.reason, extra={"job_id": error.job_id or ""})

    async def _defer(self, message: AbstractIncomingMessage, tier: ServiceTier, defer: Defer) -> None:
        # The creation time goes into the timestamp: when the body has none, the deadline must not move.
        await self._republish(message, topology.job_queue(tier), {ATTEMPTS_HEADER: defer.attempts}, defer.created_at)
        await message.ack()
        log.info("job returned to its queue: %s", defer.reason)

    async def _republish(
        self, message: AbstractIncomingMessage, queue: str, headers: dict[str, Any], timestamp: datetime | None
    ) -> None:
        """Publish the delivery's body and properties unchanged, plus `headers`, to `queue` (confirmed)."""
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
        assert self._publisher is not None  # noqa: S101 - set before any consumer starts
        await self._publisher.default_exchange.publish(copy, routing_key=queue)

    def _count_terminal(self, outcome: Finish) -> None:
        state, event = outcome.state, outcome.event
        metrics = self._metrics
        metrics.jobs_completed.labels(state.tier, event.status).inc()
        if event.finished_at is not None:
            elapsed = (event.finished_at - state.created_at).total_seconds()
            metrics.job_duration.labels(state.tier, event.status).observe(elapsed)
            window = (state.deadline - state.created_at).total_seconds()
            if window > 0:
                metrics.deadline_used.labels(state.tier).observe(min(1.0, elapsed / window))
        if event.status == "succeeded":
            metrics.video_seconds.labels(state.tier, state.resolution).inc(state.duration)
            metrics.billed_tokens.labels(state.tier, str(state.generate_audio).lower()).inc(state.tokens)
        level = logging.INFO if event.status == "succeeded" else logging.WARNING
        code = event.error.code if event.error else ""
        log.log(level, "job %s %s", event.status, code, extra=_ids(state))

    # API access faults
    def _api_fault(self, error: ApiError) -> None:
        if self._api_ok:
            log.error(
                "the API refuses this worker's access (%s %s): no more jobs taken until it accepts it again",
                error.status,
                error.reason,
            )
        self._api_ok = False
        self._metrics.worker_ready.set(0)
        self._metrics.api_access_ok.set(0)
        self._wake.set()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_access())
            self._background.add(self._probe)
            self._probe.add_done_callback(self._background.discard)

    async def _probe_access(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            attempt += 1
            delay = backoff_delay(attempt, base=1.0, cap=self._settings.auth_retry_max_seconds)
            if not await self.sleep(delay):
                return
            try:
                await self._api.check_access()
            except ApiError as exc:
                log.info(
                    "API access still refused (%s %s); next check in up to %.0f s",
                    exc.status,
                    exc.reason,
                    self._settings.auth_retry_max_seconds,
                )
                continue
            log.warning("the API accepts this worker's access again: taking jobs")
            self._api_ok = True
            self._metrics.api_access_ok.set(1)
            self._wake.set()
            return


class _Scope:
    """Registers the running delivery task so shutdown can wait for it (and cancel it past the timeout)."""

    def __init__(self, tasks: set[asyncio.Task[Any]]) -> None:
        self._tasks = tasks
        self._task: asyncio.Task[Any] | None = None

    def __enter__(self) -> None:
        self._task = asyncio.current_task()
        if self._task is not None:
            self._tasks.add(self._task)

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._tasks.discard(self._task)


def _bind(
    callback: Callable[[ServiceTier, AbstractIncomingMessage], Awaitable[None]], tier: str
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    chosen: ServiceTier = "flex" if tier == "flex" else "default"

    async def on_message(message: AbstractIncomingMessage) -> None:
        await callback(chosen, message)

    return on_message


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _ids(state: TrackingState) -> dict[str, str]:
    return {"job_id": state.job_id, "task_id": state.task_id or "", "tier": state.tier}


async def _safely(action: Awaitable[None]) -> None:
    try:
        await action
    except Exception:
        log.debug("could not return a delivery", exc_info=True)

"""Deliveries and acks: the only module that acks, nacks or dead-letters a message.

For every delivery the handler (worker.handler) decides, and this module carries the decision out in one
order: publish what replaces the delivery (tracking state and events, terminal event, the job put back,
or the message dead-lettered), wait for the broker's confirms, and only then ack. A crash anywhere before
the ack leaves the delivery in its queue; a crash after it has nothing left to lose. An ack that cannot be
sent (its channel closed with the connection) is left at that: RabbitMQ hands the delivery out again, and
nothing is put back beside it. A task's running slot is freed after the ack, and for a task's end only by
the handling whose `ended` record is the job's first (worker.job_ids), so a state that comes back after a
lost ack never frees it a second time.

A delivery whose handling fails for any other reason (a bug, a broker fault) goes through `_failed`, the
one place that maps an unexpected exception onto a broker action: it is put back after a back-off with its
failure count in `x-seedance-failures` (a job through its own queue, a tracking state or a copy through
its delay queues), and after SEEDANCE_DELIVERY_LIMIT failures it is parked, confirmed, in seedance.jobs.dead
with the reason (a tracking state keeps its task id there, so the paid task can be recovered). When even
that cannot be published, the delivery goes back with a nack, after the same back-off: never a hot loop,
never dropped. The count does not rest on RabbitMQ's `x-delivery-limit`: RabbitMQ 4.3 counts only
`basic.reject` towards it, and the tracking queues have none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from contracts.api import ServiceTier
from contracts.messages import DEAD_LETTER_QUEUE, TERMINAL_STATUSES, TIERS
from worker import topology
from worker.backoff import backoff_delay
from worker.errors import InvalidJob
from worker.handler import Defer, Delivery, Duplicate, Finish, JobHandler, Outcome, Reject, Submit, Track
from worker.job_ids import TAKE_HEADER, new_take
from worker.metrics import Metrics
from worker.publisher import Publishing, Received
from worker.submitting import Pause, Submitter
from worker.tracking import TrackingState, pick_delay_level

log = logging.getLogger(__name__)

ATTEMPTS_HEADER = "x-seedance-attempts"
FAILURES_HEADER = "x-seedance-failures"
FAILURE_BACKOFF_BASE = 1.0
FAILURE_BACKOFF_MAX = 30.0  # a job is held this long at most (well under SEEDANCE_MAX_HOLD_SECONDS's scale)

Kind = Literal["job", "tracking", "store"]
Record = Callable[[str], Awaitable[bool]]
SlotFreed = Callable[[ServiceTier], Awaitable[None]]


async def _sleep(seconds: float) -> bool:
    await asyncio.sleep(seconds)
    return True


class Consumer:
    def __init__(
        self,
        handler: JobHandler,
        submitter: Submitter,
        publisher: Publishing,
        metrics: Metrics,
        *,
        delivery_limit: int = 10,
        tracking_delays_ms: tuple[int, ...] = (1000,),
        pause: Pause = _sleep,
        ended: Record | None = None,
        freed: Record | None = None,
        slot_freed: SlotFreed | None = None,
    ) -> None:
        """`pause(seconds)` waits out a back-off and says False when the worker is stopping instead;
        `ended(job_id)` records, for every replica, that a job's terminal event is out, and says whether
        this was the job's first end (worker.job_ids); `freed(job_id)` the same for a task's end that is
        not its job's (on to the copy stage; a cancelled job's task); `slot_freed(tier)` gives a running
        slot back (worker.limits), once the delivery of a task that left it is acknowledged, and only by
        the handling that recorded the task's first end."""
        self._ended = ended
        self._freed = freed
        self._slot_freed = slot_freed
        self._handler = handler
        self._submitter = submitter
        self._publisher = publisher
        self._metrics = metrics
        self._delivery_limit = delivery_limit
        self._tracking_delays_ms = tracking_delays_ms
        self._pause = pause
        # The delivery tasks in hand, so shutdown can wait for them (and cancel them past its timeout).
        self._handling: set[asyncio.Task[Any]] = set()
        self._tracking_in_hand: dict[ServiceTier, int] = dict.fromkeys(TIERS, 0)
        self._jobs_in_hand: dict[ServiceTier, int] = dict.fromkeys(TIERS, 0)
        self._settled: dict[ServiceTier, asyncio.Event] = {tier: asyncio.Event() for tier in TIERS}
        self._counts: Counter[str] = Counter()

    def tracking_in_hand(self, tier: ServiceTier) -> int:
        """Tracking deliveries of the tier this replica holds now (the broker's count misses them)."""
        return self._tracking_in_hand[tier]

    def jobs_in_hand(self, tier: ServiceTier) -> int:
        return self._jobs_in_hand[tier]

    async def hand_back(self, tier: ServiceTier, within: float) -> int:
        """Right after a tier's consumer was cancelled: jobs of the tier that still arrived and wait for a
        limit go back to their queue now (the handler returns them), and this waits up to `within`
        seconds for every job delivery of the tier in hand to be settled. RabbitMQ 3.10 can strand the
        unacknowledged deliveries of a cancelled quorum consumer whose channel's node then dies.
        Returns how many were still in hand."""
        self._handler.release(tier, True)
        try:
            if self._jobs_in_hand[tier]:
                settled = self._settled[tier] = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(settled.wait(), within)
            return self._jobs_in_hand[tier]
        finally:
            self._handler.release(tier, False)

    @property
    def busy(self) -> int:
        return len(self._handling)

    def summary(self) -> str | None:
        """What happened since the last summary, in one line (None when nothing did); counts start again."""
        counts, self._counts = self._counts, Counter()
        if not counts:
            return None
        ended = ", ".join(f"{counts[s]} {s}" for s in TERMINAL_STATUSES)
        line = f"{counts['received']} jobs received, {counts['submitted']} submitted, {ended}"
        return line + (f", {counts['duplicate']} duplicates" if counts["duplicate"] else "")

    async def on_job(self, tier: ServiceTier, message: Received) -> None:
        self._jobs_in_hand[tier] += 1
        try:
            await self._on_job(tier, message)
        finally:
            self._jobs_in_hand[tier] -= 1
            if not self._jobs_in_hand[tier]:
                self._settled[tier].set()

    async def _on_job(self, tier: ServiceTier, message: Received) -> None:
        with self._in_hand():
            self._counts["received"] += 1
            self._metrics.jobs_received.labels(tier).inc()
            delivery = _delivery(message, tier)
            try:
                outcome = self._handler.handle_job(delivery)
                if isinstance(outcome, Submit):
                    outcome = await self._submitter.submit(outcome)
                await self._carry_out(outcome, message, tier)
            except Exception as exc:
                await self._failed("job", tier, message, exc, None, delivery.take)

    async def on_tracking(self, tier: ServiceTier, message: Received) -> None:
        self._tracking_in_hand[tier] += 1
        try:
            await self._on_state("tracking", tier, message, self._handler.handle_tracking)
        finally:
            self._tracking_in_hand[tier] -= 1

    async def on_store(self, tier: ServiceTier, message: Received) -> None:
        await self._on_state("store", tier, message, self._handler.handle_store)

    async def _first_freed(self, outcome: Track | Finish) -> bool | None:
        """For a task's end that frees its slot but is not its job's end: whether this handling's `freed`
        record is the job's first (None when nothing is recorded: the ack decides)."""
        if not outcome.frees_slot or self._freed is None:
            return None
        return await self._freed(outcome.state.job_id)

    async def _on_state(
        self,
        kind: Kind,
        tier: ServiceTier,
        message: Received,
        handle: Callable[[TrackingState], Awaitable[Outcome]],
    ) -> None:
        """A tracking state in, polled (tracking queues) or its video copied (store queues)."""
        with self._in_hand():
            state = None
            try:
                try:
                    state = TrackingState.model_validate_json(message.body)
                except Exception:
                    outcome: Outcome = Reject(InvalidJob("invalid_state", "unreadable tracking state"), None)
                else:
                    outcome = await handle(state)
                frees = await self._carry_out(outcome, message, tier)
            except Exception as exc:
                await self._failed(kind, tier, message, exc, state)
                return
            if frees and isinstance(outcome, Track | Finish) and outcome.frees_slot and self._slot_freed is not None:
                await self._slot_freed(tier)

    async def _failed(
        self,
        kind: Kind,
        tier: ServiceTier,
        message: Received,
        exc: Exception,
        state: TrackingState | None,
        take: int = 0,
    ) -> None:
        """Handling `message` raised `exc`: put it back after a back-off, or park it once it has failed
        SEEDANCE_DELIVERY_LIMIT times; nack it (after the back-off) only when neither can be published."""
        failures = _failures(message) + 1
        self._metrics.deliveries_failed.labels(kind).inc()
        ids = _ids(state) if state is not None else {"tier": tier}
        why = f"{type(exc).__name__}: {str(exc)[:300]}" if str(exc) else type(exc).__name__
        delay = backoff_delay(failures, base=FAILURE_BACKOFF_BASE, cap=FAILURE_BACKOFF_MAX)
        waited = False
        try:
            if failures >= self._delivery_limit:
                await self._park(kind, message, failures, why, state)
                log.error(
                    "a %s delivery failed %d times (last: %s): parked in %s",
                    kind,
                    failures,
                    why,
                    DEAD_LETTER_QUEUE,
                    extra=ids,
                )
                log.debug("the last failure", exc_info=exc)
                return
            log.warning(
                "a %s delivery failed (%s): again in %.1f s (failure %d of %d)",
                kind,
                why,
                delay,
                failures,
                self._delivery_limit,
                extra=ids,
            )
            log.debug("the failure", exc_info=exc)
            stamp = message.timestamp
            if kind == "job":
                # Jobs have no delay queues: the delivery is held for the back-off, then goes back.
                waited = True
                if not await self._pause(delay):
                    await _safely(message.nack(requeue=True))
                    return
                stamp = stamp or datetime.now(UTC)  # the deadline must not move with the retry
            queue = self._retry_queue(kind, tier, delay)
            headers: dict[str, Any] = {FAILURES_HEADER: failures}
            if kind == "job":
                headers[TAKE_HEADER] = take  # its own message, should the failure come after it was taken
            await self._publisher.republish(message, queue, headers, stamp)
            await _settle(message)
        except Exception:
            # The broker itself fails us: the delivery goes back as it is, but only after the back-off.
            log.warning("could not put a failed %s delivery back; returning it to RabbitMQ", kind, extra=ids)
            log.debug("why", exc_info=True)
            if not waited:
                await self._pause(delay)
            await _safely(message.nack(requeue=True))

    def _retry_queue(self, kind: Kind, tier: ServiceTier, delay: float) -> str:
        """Where a failed delivery goes back: its job queue, or the delay queue of its stage nearest `delay`."""
        if kind == "job":
            return topology.job_queue(tier)
        if kind == "tracking":
            return topology.delay_queue(tier, pick_delay_level(self._tracking_delays_ms, delay))
        return topology.store_delay_queue(tier, pick_delay_level(topology.STORE_DELAYS_MS, delay))

    async def _park(self, kind: Kind, message: Received, failures: int, why: str, state: TrackingState | None) -> None:
        reason = f"handler_error: {kind} delivery failed {failures} times; last: {why}"
        headers = _dead_letter_headers("handler_error", reason, message)
        headers.update({"x-seedance-kind": kind, FAILURES_HEADER: failures})
        if state is not None:
            headers["x-seedance-job-id"] = state.job_id
            headers["x-seedance-task-id"] = state.task_id or ""
        await self._publisher.republish(message, DEAD_LETTER_QUEUE, headers, message.timestamp)
        await _settle(message)
        self._metrics.deliveries_parked.labels(kind).inc()

    async def drain(self, within: float) -> None:
        """Let the deliveries in hand finish for up to `within` seconds; cancel the rest (they go back)."""
        log.warning("stopping: intake closed, %d deliveries in hand", len(self._handling))
        if not self._handling:
            return
        done, pending = await asyncio.wait(set(self._handling), timeout=within)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        log.warning("stopped: %d deliveries finished, %d returned unacknowledged to RabbitMQ", len(done), len(pending))

    @contextlib.contextmanager
    def _in_hand(self) -> Iterator[None]:
        task = asyncio.current_task()
        if task is not None:
            self._handling.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._handling.discard(task)

    # Carrying out outcomes: publish, await confirms, then ack
    async def _carry_out(self, outcome: Outcome, message: Received, tier: ServiceTier) -> bool:
        """Publish what replaces the delivery, then ack it. Returns whether the task's running slot may be
        freed now (when the outcome frees one): the ack reached the channel, or, for a task's end, this
        handling recorded the job's first end (a copy of the state that comes back finds it ended)."""
        publisher = self._publisher
        if isinstance(outcome, Track):
            state = outcome.state
            # State and events go out together and the ack follows their confirms at once: for a fresh
            # submission, the time from the API's answer to the ack is the double-submission window.
            ends = [e for e in outcome.events if e.status in TERMINAL_STATUSES]  # a cancel after submission
            await asyncio.gather(
                publisher.track(state, outcome.delay),
                *(publisher.event(e, state.reply_to, state.correlation_id) for e in outcome.events),
                *((self._ended(state.job_id),) if ends and self._ended is not None else ()),
            )
            first = await self._first_freed(outcome)  # on to the copy stage, once its state is confirmed
            acked = await _settle(message)
            for published in outcome.events:
                self._metrics.events_published.labels(published.status).inc()
            for ended in ends:
                self._count_terminal(Finish(state, ended))
            if outcome.submitted and state.submitted_at is not None:
                self._metrics.submit_window.observe((datetime.now(UTC) - state.submitted_at).total_seconds())
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("submitted", extra=_ids(state))
            self._counts["submitted"] += outcome.submitted
            return acked if first is None else first
        if isinstance(outcome, Finish):
            state, event = outcome.state, outcome.event
            if event is None:  # the job's terminal event went out before (cancelled after submission)
                first = await self._first_freed(outcome)
                acked = await _settle(message)
                return acked if first is None else first
            await publisher.event(event, state.reply_to, state.correlation_id)
            # After the event's confirm: a job recorded as ended has had its terminal event.
            first = await self._ended(state.job_id) if self._ended is not None else None
            acked = await _settle(message)
            self._metrics.events_published.labels(event.status).inc()
            self._count_terminal(outcome)
            return acked if first is None else first
        if isinstance(outcome, Duplicate):
            await _settle(message)
            self._counts["duplicate"] += 1
            self._metrics.jobs_duplicate.labels(outcome.tier).inc()
            log.info(
                "a copy of a job already taken: acknowledged, not submitted again", extra={"job_id": outcome.job_id}
            )
        elif isinstance(outcome, Defer):
            # The creation time goes into the timestamp: when the body has none, the deadline must not move.
            headers = {ATTEMPTS_HEADER: outcome.attempts, TAKE_HEADER: outcome.take}
            await publisher.republish(message, topology.job_queue(tier), headers, outcome.created_at)
            await _settle(message)
            log.info("job returned to its queue: %s", outcome.reason)
        else:
            await self._reject(outcome, message, tier)
        return False

    async def _reject(self, outcome: Reject, message: Received, tier: ServiceTier) -> None:
        error = outcome.error
        headers = _dead_letter_headers(error.reason, f"{error.reason}: {error.message}", message)
        await self._publisher.republish(message, DEAD_LETTER_QUEUE, headers, message.timestamp)
        if outcome.event is not None:
            await self._publisher.event(outcome.event, message.reply_to, message.correlation_id)
            self._metrics.events_published.labels("rejected").inc()
        await _settle(message)
        self._counts["rejected"] += 1
        self._metrics.jobs_rejected.labels(error.reason).inc()
        self._metrics.jobs_completed.labels(tier, "rejected").inc()
        log.warning("dead-lettered a message: %s", error.reason, extra={"job_id": error.job_id or ""})

    def _count_terminal(self, outcome: Finish) -> None:
        state, event = outcome.state, outcome.event
        if event is None:
            return
        metrics = self._metrics
        metrics.jobs_completed.labels(state.tier, event.status).inc()
        if event.finished_at is not None:
            elapsed = (event.finished_at - state.created_at).total_seconds()
            metrics.job_duration.labels(state.tier, event.status).observe(elapsed)
            window = (state.deadline - state.created_at).total_seconds()
            if window > 0:
                metrics.deadline_used.labels(state.tier).observe(min(1.0, elapsed / window))
        if event.status == "cancelled" and event.error is not None:
            metrics.cancels.labels("before_submit" if event.error.code == "CANCELLED" else "after_submit").inc()
        if event.status == "succeeded":
            metrics.video_seconds.labels(state.tier, state.resolution).inc(state.duration)
            metrics.billed_tokens.labels(state.tier, str(state.generate_audio).lower()).inc(state.tokens)
            if event.stored_video is not None:
                metrics.videos_stored.labels(state.tier, "stored").inc()
                metrics.video_stored_bytes.labels(state.tier).inc(event.stored_video.bytes)
            elif event.storage_error is not None:
                metrics.videos_stored.labels(state.tier, "failed").inc()
        self._counts[event.status] += 1
        # Successes are counted in the periodic summary (a line per job costs as much as the job's own work);
        # every job that did not end well gets a line of its own.
        level = logging.DEBUG if event.status == "succeeded" and not event.storage_error else logging.WARNING
        if log.isEnabledFor(level):
            problem = event.error or event.storage_error
            log.log(level, "job %s %s", event.status, problem.code if problem else "", extra=_ids(state))


def _delivery(message: Received, tier: ServiceTier) -> Delivery:
    headers = message.headers or {}
    attempts = headers.get(ATTEMPTS_HEADER, 0)
    take = headers.get(TAKE_HEADER)
    take = take if isinstance(take, int) and not isinstance(take, bool) and take > 0 else None
    stamp = message.timestamp
    return Delivery(
        body=message.body,
        tier=tier,
        timestamp=stamp if stamp is None or stamp.tzinfo is not None else stamp.replace(tzinfo=UTC),
        reply_to=message.reply_to,
        correlation_id=message.correlation_id,
        attempts=attempts if isinstance(attempts, int) and not isinstance(attempts, bool) else 0,
        redelivered=bool(message.redelivered),
        take=take or new_take(),
        take_header=take,
    )


def _dead_letter_headers(code: str, reason: str, message: Received) -> dict[str, Any]:
    """The headers every message put into seedance.jobs.dead carries (see the README)."""
    return {
        "x-seedance-reason": reason[:2000],
        "x-seedance-reason-code": code,
        "x-seedance-routing-key": message.routing_key or "",
        "x-seedance-rejected-at": datetime.now(UTC).isoformat(),
    }


def _failures(message: Received) -> int:
    """How often this delivery failed before: our header, or RabbitMQ's count of its redeliveries."""
    headers = message.headers or {}
    counts = [headers.get(FAILURES_HEADER, 0), headers.get("x-delivery-count", 0)]
    return max((c for c in counts if isinstance(c, int) and not isinstance(c, bool)), default=0)


def _ids(state: TrackingState) -> dict[str, str]:
    return {"job_id": state.job_id, "task_id": state.task_id or "", "tier": state.tier}


async def _settle(message: Received) -> bool:
    """Ack a delivery whose replacement is confirmed; False when the ack could not be sent (its channel
    closed with the connection). Nothing more is done then: RabbitMQ hands the delivery out again, and a
    copy put back here as well would go on beside it (a job submitted twice, a task followed twice)."""
    try:
        await message.ack()
    except Exception as exc:
        log.info("an acknowledgement did not reach RabbitMQ (%s): the delivery comes back", type(exc).__name__)
        return False
    return True


async def _safely(action: Awaitable[None]) -> None:
    try:
        await action
    except Exception:
        log.debug("could not return a delivery", exc_info=True)

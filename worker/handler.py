"""The job logic, free of the broker: what to do with a job message and with a tracking state.

Each call returns a complete outcome for the consumer to carry out (publish, confirm, then ack); the
consumer never calls back in, except for a job that goes to the API (`Submit`): worker.submitting takes
its permits and records it taken, the broker's part, and the handler's `attempt` sends it:

- `Track`: publish this tracking state to come back after `delay` seconds (and these events);
- `Finish`: publish this terminal event (none when the job's terminal event went out already: a cancelled
  job whose task the worker follows to its end);
- `Defer`: put the job back in its queue untouched (a limit or back-off would hold it too long);
- `Reject`: dead-letter the message with its reason (and publish this `rejected` event, when there is one);
- `Duplicate`: acknowledge a copy of a job already taken, and nothing else.

Which jobs were taken, ended or cancelled, on any replica, comes from worker.job_ids.

Nothing here raises on bad input or on API faults: an unreadable message is a `Reject`, an auth or account
fault is reported to worker.access and the job goes back (`Defer`) or the task is polled later (`Track`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

from pydantic import ValidationError

from contracts import validation_message
from contracts.api import EXPIRES_MAX, EXPIRES_MIN, ServiceTier, TaskResult, TaskStatus
from contracts.brokers import default_max_message_size
from contracts.messages import JOB_ID_PATTERN, EventError, JobEvent, JobMessage, StoredVideo
from worker import events, topology
from worker.access import Access
from worker.api_client import ApiClient
from worker.backoff import backoff_delay
from worker.errors import (
    AnswerLost,
    ConfigurationFault,
    CopyFailed,
    InvalidJob,
    LimitReached,
    PermanentApiError,
    RateLimited,
    ResultRefused,
    StoreRefused,
    TransientApiError,
    VideoGone,
)
from worker.job_ids import Known
from worker.limits import TierLimits
from worker.metrics import Metrics
from worker.settings import Settings
from worker.storage import VideoStore
from worker.tracking import PollSchedule, TrackingState, capped

log = logging.getLogger(__name__)

_JOB_ID = re.compile(rb'"job_id"\s*:\s*"([A-Za-z0-9._:-]{1,128})"')


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the handler needs of a job message, read off the AMQP delivery by the consumer."""

    body: bytes
    tier: ServiceTier
    timestamp: datetime | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    attempts: int = 0
    redelivered: bool = False
    take: int = 0  # this taking of the message (worker.job_ids): the header's when it carries one
    take_header: int | None = None


@dataclass(frozen=True, slots=True)
class Track:
    state: TrackingState
    delay: float
    events: tuple[JobEvent, ...] = ()
    submitted: bool = False  # the API just accepted the task: the double-submission window is open
    frees_slot: bool = False  # the task left the API's running slots (on to the copy stage)


@dataclass(frozen=True, slots=True)
class Finish:
    state: TrackingState
    event: JobEvent | None
    frees_slot: bool = False  # the task ended upstream: its running slot is free once this is settled


@dataclass(frozen=True, slots=True)
class Defer:
    reason: str
    created_at: datetime
    attempts: int
    take: int = 0  # put back in the job's headers: its own message is no duplicate when it returns


@dataclass(frozen=True, slots=True)
class Duplicate:
    job_id: str
    tier: ServiceTier


@dataclass(frozen=True, slots=True)
class Reject:
    error: InvalidJob
    event: JobEvent | None  # the `rejected` event, when the message had a readable job_id


Outcome = Track | Finish | Defer | Reject | Duplicate


@dataclass(frozen=True, slots=True)
class Submit:
    """A job to send to the API: worker.submitting takes its permits, records it taken (unless
    `recorded`), and asks `JobHandler.attempt` to send it, again after each `Wait`."""

    job: JobMessage
    state: TrackingState
    take: int
    recorded: bool  # its `taken` record is in the stream already (the job's own message put back)
    held: float = 0.0  # seconds this delivery has been held waiting so far
    failures: int = 0  # transient submit failures so far


@dataclass(frozen=True, slots=True)
class Wait:
    """Try `submit` again in `seconds` (a back-off, a limit found full)."""

    submit: Submit
    seconds: float


class Remembered(Protocol):
    """The job ids all replicas remember (worker.job_ids.JobIds), as far as the handler reads them."""

    def known(self, job_id: str) -> Known: ...


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobHandler:
    def __init__(
        self,
        settings: Settings,
        api: ApiClient,
        limits: Mapping[ServiceTier, TierLimits],
        api_access: Access,
        metrics: Metrics,
        *,
        store: VideoStore | None = None,
        store_access: Access | None = None,
        ids: Remembered | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """With `store` (and its `store_access`), every successful video is copied before its event; with
        `ids`, copies of jobs already taken are never submitted again and cancels are honoured."""
        self._settings = settings
        # Until the service has heard the broker's version (no job arrives before): 3.x's default.
        self.max_message_bytes = settings.max_message_bytes or default_max_message_size(None)
        self._api = api
        self._limits = limits
        self._api_access = api_access
        self._store = store
        self._store_access = store_access
        self._ids = ids
        self._metrics = metrics
        self._schedule = PollSchedule(settings)
        self._clock = clock
        self._released: set[ServiceTier] = set()

    def release(self, tier: ServiceTier, on: bool) -> None:
        """While on, jobs of `tier` waiting for a limit go back to their queue at once (its consumer is
        about to be cancelled: see Consumer.hand_back)."""
        if on:
            self._released.add(tier)
        else:
            self._released.discard(tier)

    # Jobs
    def read(self, delivery: Delivery) -> tuple[JobMessage, TrackingState]:
        """The job in a message and its first tracking state; InvalidJob, whatever is wrong with it."""
        body = delivery.body
        limit = self.max_message_bytes
        if len(body) > limit:
            found = _JOB_ID.search(body[:4096])
            raise InvalidJob(
                "oversize",
                f"message is {len(body)} bytes; at most {limit} accepted (pass large images as URLs)",
                found.group(1).decode() if found else None,
            )
        try:
            job = JobMessage.model_validate_json(body)
        except ValidationError as exc:
            raise _invalid(exc, body) from None
        except Exception as exc:  # whatever else a hostile message finds: it is still only a bad message
            raise InvalidJob("schema", f"message cannot be read ({type(exc).__name__})", None) from None
        created = job.created_at or delivery.timestamp or self._clock()
        request = job.request
        state = TrackingState(
            job_id=job.job_id,
            tier=request.service_tier,
            created_at=created,
            deadline=created + timedelta(seconds=request.execution_expires_after),
            duration=request.duration,
            resolution=request.resolution,
            generate_audio=request.generate_audio,
            tokens=request.tokens(),
            metadata=job.metadata,
            reply_to=delivery.reply_to,
            correlation_id=delivery.correlation_id,
            attempts=delivery.attempts,
        )
        return job, state

    def handle_job(self, delivery: Delivery) -> Outcome | Submit:
        """What to do with a job message; `Submit` when it goes to the API (worker.submitting takes its
        permits and records it, then `attempt` sends it)."""
        try:
            job, state = self.read(delivery)
        except InvalidJob as exc:
            rejected = None
            if exc.job_id is not None:
                rejected = events.rejected(exc.job_id, events.error("INVALID_JOB", exc.message), self._clock())
            return Reject(exc, rejected)
        if job.request.service_tier != delivery.tier:
            log.info("job runs in the tier its request names", extra={"job_id": job.job_id, "tier": state.tier})
        known = self._known(job.job_id)
        if known.duplicate(delivery.take_header, delivery.redelivered):
            return Duplicate(job.job_id, state.tier)
        if known.cancelled:
            return self._cancelled(state, known, "CANCELLED")
        if self._clock() >= state.deadline:
            return self._finish(state, "expired", "DEADLINE_EXCEEDED", "deadline passed before submission")
        if delivery.redelivered:
            # A delivery RabbitMQ hands out again may have been submitted by a worker that then died.
            self._metrics.possible_duplicates.labels(state.tier, "redelivered").inc()
        # Taken before and no copy: its own message put back, or handed out again after its holder died
        # (then submitted again: the documented double-submission window). No second record either way.
        return Submit(job, state, delivery.take, recorded=known.taken)

    def _known(self, job_id: str) -> Known:
        return self._ids.known(job_id) if self._ids is not None else Known()

    def _cancelled(self, state: TrackingState, known: Known, code: str) -> Finish:
        why = known.reason or "cancelled by its producer"
        message = why if code == "CANCELLED" else f"{why} (after submission: the task may still be billed)"
        return Finish(state, events.event(state, "cancelled", self._clock(), error=events.error(code, message)))

    def check(self, submit: Submit) -> Outcome | None:
        """Before each attempt: the outcome when the job must not be submitted now (its deadline passed,
        its tier paused, cancelled while it waited for a limit), else None."""
        state = submit.state
        if self._clock() >= state.deadline:
            return self._finish(state, "expired", "DEADLINE_EXCEEDED", "deadline passed before submission")
        if state.tier in self._released:
            return self._defer(submit, "its tier paused")
        known = self._known(state.job_id)
        if known.cancelled:
            return self._cancelled(state, known, "CANCELLED")
        return None

    async def attempt(self, submit: Submit) -> Track | Finish | Defer | Wait:
        """Send the job to the API once, its permits held and its `taken` record written (worker.submitting):
        its first tracking state when accepted, else what to do (try again after a wait, or an outcome)."""
        settings = self._settings
        now = self._clock()
        state = submit.state
        window = min(EXPIRES_MAX, max(EXPIRES_MIN, math.ceil((state.deadline - now).total_seconds())))
        request = submit.job.request.model_copy(update={"execution_expires_after": window})
        state = state.model_copy(update={"attempts": state.attempts + 1})
        submit = replace(submit, state=state)
        try:
            task_id = await self._api.submit(request)
        except RateLimited as exc:
            self._metrics.api_retries.labels("submit", "429").inc()
            self._limits[state.tier].block_for(
                exc.retry_after or backoff_delay(1, base=settings.retry_base_seconds, cap=settings.retry_max_seconds),
                "the API's 429",
            )
            return Wait(submit, 0.0)  # the block holds the next attempt back
        except TransientApiError as exc:
            return self._after_transient(submit, exc, now)
        except ConfigurationFault as exc:
            self._api_access.refused(exc.summary)
            return self._defer(submit, "the API refuses this worker's access")
        except PermanentApiError as exc:
            return self._finish(state, "failed", exc.reason or f"HTTP_{exc.status}", exc.message)
        return self._submitted(state, task_id)

    def _after_transient(self, submit: Submit, exc: TransientApiError, now: datetime) -> Finish | Defer | Wait:
        settings = self._settings
        state = submit.state
        if isinstance(exc, AnswerLost):
            self._metrics.possible_duplicates.labels(state.tier, "answer_lost").inc()
            if settings.ambiguous_submit == "fail":
                return self._finish(
                    state,
                    "failed",
                    "SUBMIT_AMBIGUOUS",
                    f"the submit's answer was lost, the task may exist; not sent again: {exc}",
                )
        failures = submit.failures + 1
        if failures >= settings.submit_max_attempts:
            return self._finish(state, "failed", "RETRIES_EXHAUSTED", f"{failures} attempts failed: {exc}")
        wait = backoff_delay(
            failures, base=settings.retry_base_seconds, cap=settings.retry_max_seconds, retry_after=exc.retry_after
        )
        if now + timedelta(seconds=wait) >= state.deadline:
            return self._finish(state, "expired", "DEADLINE_EXCEEDED", f"no retry fits before the deadline: {exc}")
        if submit.held + wait > settings.max_hold_seconds:
            return self._defer(submit, "back-off longer than the hold limit")
        self._metrics.api_retries.labels("submit", exc.label).inc()
        log.warning("submit failed, retrying in %.1f s: %s", wait, exc, extra={"job_id": state.job_id})
        return Wait(replace(submit, failures=failures), wait)

    def limit_reached(self, submit: Submit, full: LimitReached) -> Defer | Wait:
        """A limit of the account had no permit for this job: hold it a while, or put it back."""
        if submit.held + full.wait > self._settings.max_hold_seconds or submit.state.tier in self._released:
            return self._defer(submit, f"{full.limit} limit reached")
        return Wait(submit, min(full.wait, self._settings.in_flight_refresh_seconds))

    def _defer(self, submit: Submit, reason: str) -> Defer:
        return Defer(reason, submit.state.created_at, submit.state.attempts, submit.take)

    def _submitted(self, state: TrackingState, task_id: str) -> Track:
        """The API accepted the task: its first tracking state, the `submitted` event, the first poll time."""
        submitted_at = self._clock()
        first = self._schedule.first_delay(state)
        next_poll = capped(submitted_at, first, state.deadline)
        update = {"task_id": task_id, "submitted_at": submitted_at, "next_poll_at": next_poll, "interval": first}
        state = state.model_copy(update=update)
        # A producer's clock ahead of ours would make the wait negative; it is zero at worst.
        waited = max(0.0, (submitted_at - state.created_at).total_seconds())
        self._metrics.queue_wait.labels(state.tier).observe(waited)
        delay = (next_poll - submitted_at).total_seconds()
        return Track(state, delay, (events.event(state, "submitted", submitted_at),), submitted=True)

    # Tracking
    async def handle_tracking(self, state: TrackingState) -> Track | Finish:
        """Poll the task if it is due (else send the state on for the rest of its wait); when the task has
        ended, the outcome says its running slot is free (`frees_slot`)."""
        if state.stage == "store":  # not a poll: back to the copy stage's queue
            return Track(state, 0.0)
        known = self._known(state.job_id)
        if _seen_end(known, state):
            # A second copy of the task's state (one whose ack was lost came back beside the state that
            # replaced it), and the other copy has seen the task end: nothing to poll, publish or free.
            return Finish(state, None)
        if not state.cancelled and known.cancelled:
            # The gateway cannot cancel a task: the job ends now, and its task is followed, silently, until
            # the API reports its end, so that its running slot stays taken until then.
            state = state.model_copy(update={"cancelled": True})
            ended = self._cancelled(state, known, "CANCELLED_AFTER_SUBMIT")
            assert ended.event is not None  # noqa: S101 - _cancelled always has one
            early = 0.0 if state.next_poll_at is None else (state.next_poll_at - self._clock()).total_seconds()
            return Track(state, max(0.0, early), (ended.event,))
        outcome = await self._poll(state)
        if isinstance(outcome, Finish) or outcome.state.stage == "store":
            if _seen_end(self._known(state.job_id), state):
                return Finish(state, None)  # the other copy saw the end while this one polled
            # The consumer frees the slot only if this handling's `ended` record (or `freed`, for a task
            # that leaves for the copy stage or whose job ended cancelled) is the job's first: a delivery
            # that came back (its ack lost with the connection) would free it a second time.
            return replace(outcome, frees_slot=True)
        return outcome

    async def _poll(self, state: TrackingState) -> Track | Finish:
        now = self._clock()
        if state.next_poll_at is not None:
            early = (state.next_poll_at - now).total_seconds()
            if early * 1000 > self._settings.tracking_delays_ms[0] / 2:
                return Track(state, early)
        if state.task_id is None:  # cannot happen for states this worker wrote; fail loudly, not silently
            return self._finish(state, "failed", "INVALID_STATE", "tracking state without a task id")
        try:
            result = await self._api.task_result(state.task_id)
        except ConfigurationFault as exc:
            self._api_access.refused(exc.summary)
            return Track(state, self._settings.tiers[state.tier].poll_max_seconds)
        except ResultRefused as exc:
            return self._refused(state, now, exc)
        except TransientApiError as exc:
            self._metrics.api_retries.labels("task-result", exc.label).inc()
            state = state.model_copy(update={"poll_errors": state.poll_errors + 1})
            return self._retry_poll(state, now, exc.retry_after)
        finally:
            self._metrics.polls.labels(state.tier).inc()
        state = state.model_copy(update={"polls": state.polls + 1, "poll_errors": 0, "refused_since": None})
        return self._after_poll(state, result, self._clock())

    def _refused(self, state: TrackingState, now: datetime, exc: ResultRefused) -> Track | Finish:
        """A task-result the API refused (400, 404, 409, 422, ...): a gateway that has not caught up with a
        fresh submit says 404 for a while, so poll again with back-off; the job fails with the API's reason
        once the refusals have lasted SEEDANCE_POLL_REFUSED_MAX_SECONDS."""
        since = state.refused_since or now
        state = state.model_copy(update={"poll_errors": state.poll_errors + 1, "refused_since": since})
        refused_for = (now - since).total_seconds()
        if refused_for >= self._settings.poll_refused_max_seconds:
            message = f"the API refused the task's result for {refused_for:.0f} s: {exc.message}"
            return self._finish(state, "failed", exc.reason or f"HTTP_{exc.status}", message)
        self._metrics.api_retries.labels("task-result", str(exc.status)).inc()
        return self._retry_poll(state, now, None)

    def _after_poll(self, state: TrackingState, result: TaskResult, now: datetime) -> Track | Finish:
        task = result.task
        if task.status is TaskStatus.SUCCEED:
            if not result.videos:
                return self._finish(state, "failed", "NO_VIDEO", "task succeeded without a video")
            self._learn(state, result, now)
            video = result.videos[0]
            expires = now + timedelta(seconds=video.video_url_ttl)
            state = state.model_copy(update={"video_url": video.video_url, "video_url_expires_at": expires})
            if state.cancelled:
                return Finish(state, None)  # its `cancelled` event went out; nothing is copied
            if self._store is not None:
                # The task is done (its slot is free); the copy is a stage of its own, on its own queues.
                return Track(state.model_copy(update={"stage": "store"}), 0.0)
            return Finish(state, events.event(state, "succeeded", now))
        if task.status is TaskStatus.FAILED:
            reason = task.reason or "the API reported the task failed"
            if self._settings.expired_reason_marker.lower() in reason.lower():
                return self._finish(state, "expired", "TASK_EXPIRED", reason)
            return self._finish(state, "failed", "TASK_FAILED", reason)
        if task.status is TaskStatus.UNKNOWN:
            # A status this worker does not know (the gateway's TASK_STATUS_UNKNOWN, or a new one): not
            # finished, so polling goes on (until the deadline at most).
            self._metrics.unknown_task_status.labels(state.tier).inc()
        if now >= state.deadline:
            return self._finish(
                state, "expired", "DEADLINE_EXCEEDED", f"task still {task.status.value} at the deadline"
            )
        published: tuple[JobEvent, ...] = ()
        if task.progress_percent != state.progress and not state.cancelled:
            last = state.progress_event_at
            if last is None or (now - last).total_seconds() >= self._settings.progress_interval_seconds:
                published = (events.event(state, "progress", now, progress=task.progress_percent),)
                state = state.model_copy(update={"progress_event_at": now})
            state = state.model_copy(update={"progress": task.progress_percent})
        delay = self._schedule.next_delay(state, result, now)
        next_poll = capped(now, delay, state.deadline)
        state = state.model_copy(update={"next_poll_at": next_poll, "interval": delay})
        return Track(state, (next_poll - now).total_seconds(), published)

    # Keeping the video
    async def handle_store(self, state: TrackingState) -> Track | Finish:
        """Copy the video of a succeeded task into the store; finish `succeeded`, with the copy or why not."""
        if state.cancelled:
            return Finish(state, None)
        if (known := self._known(state.job_id)).ended:
            return Finish(state, None)  # a second copy of the state (an ack lost), and the other copy ended it
        if known.cancelled:
            return self._cancelled(state, known, "CANCELLED_AFTER_SUBMIT")  # the video is not copied
        now = self._clock()
        if self._store is None or self._store_access is None or state.video_url is None:
            # Left by a replica with a store, while this one has none: the job still succeeded.
            why = events.error("STORAGE_NOT_CONFIGURED", "this worker has no SEEDANCE_STORAGE_URL to copy to")
            return self._succeeded(state, now, storage_error=why)
        if not self._store_access.ok:
            return Track(state, topology.STORE_DELAYS_MS[-1] / 1000)  # wait for the probe, fail nothing
        key = self._store.key(state.job_id, state.task_id or "task")
        log.info("copying the video to %s/%s", self._store.url, key, extra=_ids(state))
        try:
            stored = await self._store.copy(state.video_url, key)
        except StoreRefused as exc:
            self._metrics.video_store_failures.labels(exc.reason).inc()
            self._store_access.refused(exc.message)
            return Track(state, topology.STORE_DELAYS_MS[0] / 1000)
        except VideoGone as exc:
            self._metrics.video_store_failures.labels(exc.reason).inc()
            return self._succeeded(state, self._clock(), storage_error=events.error("VIDEO_UNAVAILABLE", exc.message))
        except CopyFailed as exc:
            self._metrics.video_store_failures.labels(exc.reason).inc()
            attempts = state.store_attempts + 1
            delay = backoff_delay(attempts, base=1.0, cap=60.0)
            now = self._clock()
            expires = state.video_url_expires_at
            if expires is not None and now + timedelta(seconds=delay) >= expires:
                message = f"no copy before the video URL expired ({attempts} attempts; last: {exc.message})"
                return self._succeeded(state, now, storage_error=events.error("VIDEO_URL_EXPIRED", message))
            log.warning("copying the video failed, again in %.0f s: %s", delay, exc.message, extra=_ids(state))
            return Track(state.model_copy(update={"store_attempts": attempts}), delay)
        return self._succeeded(state, self._clock(), stored_video=stored)

    def _succeeded(
        self,
        state: TrackingState,
        now: datetime,
        *,
        stored_video: StoredVideo | None = None,
        storage_error: EventError | None = None,
    ) -> Finish:
        event = events.event(state, "succeeded", now, stored_video=stored_video, storage_error=storage_error)
        return Finish(state, event)

    def _learn(self, state: TrackingState, result: TaskResult, now: datetime) -> None:
        """Feed the schedule how long this task really took: the API's own times when it reports them."""
        debug = result.extra.debug_info
        if debug is not None and debug.submit_time_ms is not None and debug.complete_time_ms is not None:
            took = (debug.complete_time_ms - debug.submit_time_ms) / 1000
        elif state.submitted_at is not None:
            took = (now - state.submitted_at).total_seconds()
        else:
            return
        if took > 0:
            self._schedule.observe(state.tier, state.duration, state.resolution, took)

    def _retry_poll(self, state: TrackingState, now: datetime, retry_after: float | None) -> Track | Finish:
        if now >= state.deadline:
            return self._finish(state, "expired", "DEADLINE_EXCEEDED", "deadline passed while the API was failing")
        tier = self._settings.tiers[state.tier]
        # Never sooner than the tier's shortest interval: at most one request per task per poll interval.
        delay = max(
            tier.poll_min_seconds,
            backoff_delay(
                state.poll_errors, base=tier.poll_min_seconds, cap=tier.poll_max_seconds, retry_after=retry_after
            ),
        )
        next_poll = capped(now, delay, state.deadline)
        state = state.model_copy(update={"next_poll_at": next_poll})
        return Track(state, (next_poll - now).total_seconds())

    def _finish(self, state: TrackingState, status: Literal["failed", "expired"], code: str, message: str) -> Finish:
        if state.cancelled:
            return Finish(state, None)  # the job ended `cancelled` already: its task's end says nothing more
        return Finish(state, events.event(state, status, self._clock(), error=events.error(code, message)))


def _seen_end(known: Known, state: TrackingState) -> bool:
    """Whether another handling of this task's state has seen the task end: its job ended (unless this
    is the state of a cancelled job, whose task is followed after its end), or its slot was freed."""
    return known.freed or (known.ended and not state.cancelled)


def _ids(state: TrackingState) -> dict[str, str]:
    return {"job_id": state.job_id, "task_id": state.task_id or "", "tier": state.tier}


def _invalid(error: ValidationError, body: bytes) -> InvalidJob:
    """The rejection of a body pydantic refused: not JSON at all, or JSON that is no job."""
    if error.errors(include_url=False)[0]["type"] == "json_invalid":
        return InvalidJob("invalid_json", "message is not JSON (or nests too deeply)", None)
    return InvalidJob("schema", validation_message(error), _readable_job_id(body))


def _readable_job_id(body: bytes) -> str | None:
    """The message's job_id when it is a well-formed one (for the `rejected` event), else None."""
    try:
        data = json.loads(body)
    except Exception:
        return None
    job_id = data.get("job_id") if isinstance(data, dict) else None
    return job_id if isinstance(job_id, str) and re.fullmatch(JOB_ID_PATTERN, job_id) else None


__all__ = [
    "Defer",
    "Delivery",
    "Duplicate",
    "Finish",
    "JobHandler",
    "Outcome",
    "Reject",
    "Remembered",
    "Submit",
    "Track",
    "Wait",
]

"""The ack rules, without a broker: publish what replaces a delivery, wait for the confirms, then ack;
dead-letter what cannot be read; put a job back when told to; nack on a failure. The consumer runs
against a recording publisher whose confirms the test releases by hand, and messages that record what
was done to them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from contracts.messages import DEAD_LETTER_QUEUE, JobEvent
from worker import events
from worker.consumer import ATTEMPTS_HEADER, FAILURES_HEADER, Consumer
from worker.errors import InvalidJob
from worker.handler import Defer, Delivery, Finish, Outcome, Reject, Track
from worker.job_ids import TAKE_HEADER
from worker.metrics import Metrics
from worker.submitting import Submitter
from worker.tracking import TrackingState

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def state(**fields: Any) -> TrackingState:
    values: dict[str, Any] = {
        "job_id": "job-1",
        "tier": "default",
        "task_id": "task-1",
        "created_at": NOW,
        "deadline": NOW + timedelta(hours=1),
        "submitted_at": NOW,
        "duration": 5,
        "resolution": "720p",
        "generate_audio": True,
        "tokens": 108900,
        "reply_to": "reply-here",
        "correlation_id": "corr-1",
    }
    values.update(fields)
    return TrackingState(**values)


@dataclass
class Message:
    """A delivery that records what the consumer does to it, in order, with the publisher's actions."""

    log: list[str]
    body: bytes = b"{}"
    headers: Mapping[str, Any] = field(default_factory=dict)
    routing_key: str | None = "job.default"
    content_type: str | None = "application/json"
    correlation_id: str | None = "corr-1"
    reply_to: str | None = "reply-here"
    message_id: str | None = "m-1"
    timestamp: datetime | None = None
    redelivered: bool | None = False

    async def ack(self, multiple: bool = False) -> None:
        self.log.append("ack")

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self.log.append(f"nack(requeue={requeue})")


class Publisher:
    """Records each publish; each confirm waits until the test sets `confirm` (or fails with `refuse`)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.confirm = asyncio.Event()
        self.refuse: Exception | None = None
        self.republished: list[tuple[str, dict[str, Any], datetime | None]] = []
        self.events: list[tuple[JobEvent, str | None, str | None]] = []

    async def _confirmed(self, what: str) -> None:
        self.log.append(f"publish {what}")
        await self.confirm.wait()
        if self.refuse is not None:
            raise self.refuse
        self.log.append(f"confirmed {what}")

    async def track(self, state: TrackingState, delay: float) -> None:
        await self._confirmed("state")

    async def event(self, event: JobEvent, reply_to: str | None, correlation_id: str | None) -> None:
        self.events.append((event, reply_to, correlation_id))
        await self._confirmed(f"event {event.status}")

    async def republish(self, message: Any, queue: str, headers: Mapping[str, Any], timestamp: Any) -> None:
        self.republished.append((queue, dict(headers), timestamp))
        await self._confirmed(f"to {queue}")


class Handler:
    """Answers every delivery with the outcome the test chose (or raises what it chose)."""

    def __init__(self) -> None:
        self.outcome: Outcome | Exception = Finish(state(), events.event(state(), "succeeded", NOW))
        self.deliveries: list[Delivery] = []
        self.states: list[TrackingState] = []

    def handle_job(self, delivery: Delivery) -> Outcome:
        self.deliveries.append(delivery)
        return self._answer()

    async def handle_tracking(self, tracked: TrackingState) -> Outcome:
        self.states.append(tracked)
        return self._answer()

    def _answer(self) -> Outcome:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


@dataclass
class Rig:
    consumer: Consumer
    handler: Handler
    publisher: Publisher
    metrics: Metrics
    log: list[str]

    def message(self, **fields: Any) -> Message:
        return Message(self.log, **fields)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


LIMIT = 3


@pytest.fixture
def rig() -> Rig:
    log: list[str] = []
    metrics = Metrics(CollectorRegistry())
    handler, publisher = Handler(), Publisher(log)

    async def pause(seconds: float) -> bool:
        log.append("back-off")
        return True

    async def slot_freed(tier: str) -> None:
        log.append(f"slot freed {tier}")

    consumer = Consumer(
        handler,  # type: ignore[arg-type]
        Submitter(handler, {}, pause),  # type: ignore[arg-type] - never used: no outcome here is a Submit
        publisher,
        metrics,
        delivery_limit=LIMIT,
        tracking_delays_ms=(1000, 5000, 30000),
        pause=pause,
        slot_freed=slot_freed,
    )
    return Rig(consumer, handler, publisher, metrics, log)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_tracked_job_is_acked_only_after_its_state_and_event_are_confirmed(rig: Rig) -> None:
    submitted = state()
    rig.handler.outcome = Track(submitted, 5.0, (events.event(submitted, "submitted", NOW),), submitted=True)
    message = rig.message()
    running = asyncio.create_task(rig.consumer.on_job("default", message))
    await settle()
    assert rig.log == ["publish state", "publish event submitted"], "both sent at once, nothing acked"
    rig.publisher.confirm.set()
    await running
    assert rig.log[-1] == "ack"
    assert set(rig.log[2:4]) == {"confirmed state", "confirmed event submitted"}
    assert rig.sample("seedance_submit_unconfirmed_seconds_count") == 1
    assert rig.sample("seedance_events_published_total", status="submitted") == 1


async def test_a_finished_job_publishes_its_event_to_reply_to_then_acks(rig: Rig) -> None:
    rig.publisher.confirm.set()
    await rig.consumer.on_tracking("default", rig.message(body=state().model_dump_json().encode()))
    assert rig.log == ["publish event succeeded", "confirmed event succeeded", "ack"]
    (event, reply_to, correlation_id) = rig.publisher.events[0]
    assert (event.status, reply_to, correlation_id) == ("succeeded", "reply-here", "corr-1")
    assert rig.sample("seedance_jobs_completed_total", tier="default", status="succeeded") == 1
    assert rig.sample("seedance_video_seconds_total", tier="default", resolution="720p") == 5


async def test_an_ended_task_frees_its_slot_only_once_its_delivery_is_acknowledged(rig: Rig) -> None:
    rig.publisher.confirm.set()
    ended = state()
    rig.handler.outcome = Finish(ended, events.event(ended, "succeeded", NOW), frees_slot=True)
    await rig.consumer.on_tracking("default", rig.message(body=ended.model_dump_json().encode()))
    assert rig.log == ["publish event succeeded", "confirmed event succeeded", "ack", "slot freed default"]


async def test_a_task_whose_end_could_not_be_settled_keeps_its_slot_for_the_redelivery(rig: Rig) -> None:
    """Freed before the ack, the slot would be freed again when the state comes back."""
    rig.publisher.refuse = ConnectionError("channel closed")
    rig.publisher.confirm.set()
    moving = state(stage="store")
    rig.handler.outcome = Track(moving, 0.0, frees_slot=True)
    await rig.consumer.on_tracking("default", rig.message(body=moving.model_dump_json().encode()))
    assert "ack" not in rig.log
    assert not [line for line in rig.log if line.startswith("slot freed")]


async def test_a_refused_publish_returns_the_delivery_unacked_after_a_back_off(rig: Rig) -> None:
    rig.publisher.refuse = ConnectionError("channel closed")
    rig.publisher.confirm.set()
    rig.handler.outcome = Track(state(), 5.0)
    await rig.consumer.on_job("default", rig.message())
    assert rig.log == ["publish state", "back-off", "publish to seedance.jobs.default", "nack(requeue=True)"]
    assert "ack" not in rig.log


async def test_a_handler_bug_puts_the_job_back_after_a_back_off_with_its_failure_count(rig: Rig) -> None:
    rig.publisher.confirm.set()
    rig.handler.outcome = RuntimeError("bug")
    await rig.consumer.on_job("default", rig.message(timestamp=NOW, headers={TAKE_HEADER: 77}))
    assert rig.log == ["back-off", "publish to seedance.jobs.default", "confirmed to seedance.jobs.default", "ack"]
    # The job keeps its take token: should it have been taken before the failure, it is no duplicate.
    assert rig.publisher.republished == [("seedance.jobs.default", {FAILURES_HEADER: 1, TAKE_HEADER: 77}, NOW)]
    assert rig.sample("seedance_deliveries_failed_total", kind="job") == 1


async def test_a_failing_tracking_state_goes_back_through_a_delay_queue_without_holding_it(rig: Rig) -> None:
    rig.publisher.confirm.set()
    rig.handler.outcome = RuntimeError("bug")
    body = state().model_dump_json().encode()
    await rig.consumer.on_tracking("flex", rig.message(body=body, headers={FAILURES_HEADER: 1}))
    (queue, headers, _) = rig.publisher.republished[0]
    assert queue.startswith("seedance.tracking.flex.delay.") and headers == {FAILURES_HEADER: 2}
    assert "back-off" not in rig.log and rig.log[-1] == "ack"


@pytest.mark.parametrize("count_header", [FAILURES_HEADER, "x-delivery-count"])
async def test_a_delivery_that_failed_the_delivery_limit_is_parked_with_its_task_id(
    rig: Rig, count_header: str
) -> None:
    rig.publisher.confirm.set()
    rig.handler.outcome = RuntimeError("still a bug")
    body = state(task_id="paid-task-7").model_dump_json().encode()
    await rig.consumer.on_tracking("default", rig.message(body=body, headers={count_header: LIMIT - 1}))
    (queue, headers, _) = rig.publisher.republished[0]
    assert queue == DEAD_LETTER_QUEUE and rig.log[-1] == "ack"
    assert headers["x-seedance-reason-code"] == "handler_error"
    assert "RuntimeError: still a bug" in headers["x-seedance-reason"]
    assert (headers["x-seedance-task-id"], headers["x-seedance-job-id"]) == ("paid-task-7", "job-1")
    assert headers[FAILURES_HEADER] == LIMIT
    assert rig.sample("seedance_deliveries_parked_total", kind="tracking") == 1


async def test_a_job_failing_while_the_worker_stops_goes_back_at_once(rig: Rig) -> None:
    async def stopping(seconds: float) -> bool:
        rig.log.append("stopping")
        return False

    rig.consumer._pause = stopping
    rig.handler.outcome = RuntimeError("bug")
    await rig.consumer.on_job("default", rig.message())
    assert rig.log == ["stopping", "nack(requeue=True)"]


async def test_a_rejected_message_is_dead_lettered_with_its_reason_then_acked(rig: Rig) -> None:
    rig.publisher.confirm.set()
    rejected = events.rejected("bad-1", events.error("INVALID_JOB", "request.image: must be a URL"), NOW)
    rig.handler.outcome = Reject(InvalidJob("schema", "request.image: must be a URL", "bad-1"), rejected)
    await rig.consumer.on_job("flex", rig.message(routing_key="job.flex"))
    assert rig.log == [
        f"publish to {DEAD_LETTER_QUEUE}",
        f"confirmed to {DEAD_LETTER_QUEUE}",
        "publish event rejected",
        "confirmed event rejected",
        "ack",
    ]
    _, headers, _ = rig.publisher.republished[0]
    assert headers["x-seedance-reason"] == "schema: request.image: must be a URL"
    assert headers["x-seedance-reason-code"] == "schema"
    assert headers["x-seedance-routing-key"] == "job.flex"
    assert rig.sample("seedance_jobs_rejected_total", reason="schema") == 1
    assert rig.sample("seedance_jobs_completed_total", tier="flex", status="rejected") == 1


async def test_a_rejection_without_a_job_id_publishes_no_event(rig: Rig) -> None:
    rig.publisher.confirm.set()
    rig.handler.outcome = Reject(InvalidJob("invalid_json", "message is not JSON"), None)
    await rig.consumer.on_job("default", rig.message(body=b"nope"))
    assert rig.log == [f"publish to {DEAD_LETTER_QUEUE}", f"confirmed to {DEAD_LETTER_QUEUE}", "ack"]
    assert rig.publisher.events == []


async def test_a_deferred_job_goes_back_to_its_queue_with_its_creation_time_then_is_acked(rig: Rig) -> None:
    rig.publisher.confirm.set()
    rig.handler.outcome = Defer("tier limit reached", NOW, 3, take=5)
    await rig.consumer.on_job("flex", rig.message())
    assert rig.log == ["publish to seedance.jobs.flex", "confirmed to seedance.jobs.flex", "ack"]
    assert rig.publisher.republished == [("seedance.jobs.flex", {ATTEMPTS_HEADER: 3, TAKE_HEADER: 5}, NOW)]


async def test_an_unreadable_tracking_state_is_dead_lettered_without_asking_the_handler(rig: Rig) -> None:
    rig.publisher.confirm.set()
    await rig.consumer.on_tracking("default", rig.message(body=b'{"job_id": 1}'))
    assert rig.handler.states == []
    assert rig.log[0] == f"publish to {DEAD_LETTER_QUEUE}" and rig.log[-1] == "ack"
    assert rig.publisher.republished[0][1]["x-seedance-reason-code"] == "invalid_state"
    assert rig.sample("seedance_jobs_rejected_total", reason="invalid_state") == 1


async def test_the_delivery_is_read_into_what_the_handler_needs(rig: Rig) -> None:
    rig.publisher.confirm.set()
    naive = datetime(2026, 11, 25, 11, 0)
    await rig.consumer.on_job(
        "flex",
        rig.message(headers={ATTEMPTS_HEADER: 4, TAKE_HEADER: 9}, timestamp=naive, redelivered=True, body=b"x"),
    )
    await rig.consumer.on_job("flex", rig.message(body=b"y"))
    delivery, fresh = rig.handler.deliveries
    assert delivery == Delivery(b"x", "flex", naive.replace(tzinfo=UTC), "reply-here", "corr-1", 4, True, 9, 9)
    # A message without a take token gets a fresh one for this taking, and says it came without.
    assert fresh.take_header is None
    assert fresh.take > 0


async def test_drain_waits_for_deliveries_in_hand_and_returns_the_rest(rig: Rig) -> None:
    rig.handler.outcome = Track(state(), 1.0)
    first = asyncio.create_task(rig.consumer.on_job("default", rig.message()))
    await settle()
    assert rig.consumer.busy == 1
    await rig.consumer.drain(within=0.05)  # the confirm never comes: the delivery is abandoned, not acked
    assert first.cancelled()
    assert "ack" not in rig.log and "nack(requeue=True)" not in rig.log
    assert rig.consumer.busy == 0


async def test_tracking_deliveries_in_hand_are_counted_while_handled(rig: Rig) -> None:
    rig.handler.outcome = Track(state(), 1.0)
    running = asyncio.create_task(
        rig.consumer.on_tracking("default", rig.message(body=state().model_dump_json().encode()))
    )
    await settle()
    assert (rig.consumer.tracking_in_hand("default"), rig.consumer.tracking_in_hand("flex")) == (1, 0)
    rig.publisher.confirm.set()
    await running
    assert rig.consumer.tracking_in_hand("default") == 0


def test_the_rejected_event_carries_only_what_is_known() -> None:
    event = events.rejected("bad-2", events.error("INVALID_JOB", "x"), NOW)
    assert json.loads(event.model_dump_json())["task_id"] is None


async def test_the_summary_counts_what_happened_since_the_last_one(rig: Rig) -> None:
    rig.publisher.confirm.set()
    assert rig.consumer.summary() is None, "nothing happened yet"
    submitted = state()
    rig.handler.outcome = Track(submitted, 5.0, (events.event(submitted, "submitted", NOW),), submitted=True)
    await rig.consumer.on_job("default", rig.message())
    rig.handler.outcome = Reject(InvalidJob("schema", "bad"), None)
    await rig.consumer.on_job("default", rig.message())
    rig.handler.outcome = Finish(state(), events.event(state(), "succeeded", NOW))
    await rig.consumer.on_tracking("default", rig.message(body=state().model_dump_json().encode()))
    assert rig.consumer.summary() == (
        "2 jobs received, 1 submitted, 1 succeeded, 0 failed, 0 expired, 1 rejected, 0 cancelled"
    )
    assert rig.consumer.summary() is None, "counts start again"


class LostAck(Message):
    async def ack(self, multiple: bool = False) -> None:
        self.log.append("ack lost")
        raise RuntimeError("Channel closed by RPC timeout")


async def test_an_ack_that_cannot_be_sent_leaves_the_delivery_to_come_back_and_puts_back_no_copy(rig: Rig) -> None:
    """Put back as well, the copy would go on beside the delivery RabbitMQ hands out again: a job
    submitted twice, a task followed (and its slot freed) twice."""
    rig.publisher.confirm.set()
    submitted = state()
    rig.handler.outcome = Track(submitted, 5.0, (events.event(submitted, "submitted", NOW),), submitted=True)
    await rig.consumer.on_job("default", LostAck(rig.log))
    moving = state(stage="store")
    rig.handler.outcome = Track(moving, 0.0, frees_slot=True)
    await rig.consumer.on_tracking("default", LostAck(rig.log, body=moving.model_dump_json().encode()))
    assert rig.publisher.republished == []
    assert not [line for line in rig.log if line.startswith(("nack", "back-off", "slot freed"))]
    assert rig.log.count("ack lost") == 2
    assert rig.sample("seedance_deliveries_failed_total", kind="job") == 0


@pytest.mark.parametrize(
    ("first", "ack_lost", "freed"), [(True, False, True), (True, True, True), (False, False, False)]
)
async def test_a_tasks_end_frees_its_slot_only_when_its_end_record_came_first(
    rig: Rig, first: bool, ack_lost: bool, freed: bool
) -> None:
    """The end's record decides, not the ack: a copy of the state that comes back finds the job ended."""

    async def ended(job_id: str) -> bool:
        rig.log.append(f"ended {job_id}")
        return first

    rig.consumer._ended = ended
    rig.publisher.confirm.set()
    done = state()
    rig.handler.outcome = Finish(done, events.event(done, "succeeded", NOW), frees_slot=True)
    message = (LostAck if ack_lost else Message)(rig.log, body=done.model_dump_json().encode())
    await rig.consumer.on_tracking("default", message)
    assert rig.log[:3] == ["publish event succeeded", "confirmed event succeeded", "ended job-1"]
    assert ("slot freed default" in rig.log) is freed


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("ending", ["on to the copy stage", "a cancelled job's task"])
async def test_a_tasks_end_that_is_not_its_jobs_frees_its_slot_only_when_its_freed_record_came_first(
    rig: Rig, first: bool, ending: str
) -> None:
    """Without the record a copy of the state that came back after a lost ack freed the slot again: both
    were settled, and each freed it on its ack."""

    async def freed(job_id: str) -> bool:
        rig.log.append(f"freed {job_id}")
        return first

    rig.consumer._freed = freed
    rig.publisher.confirm.set()
    if ending == "on to the copy stage":
        moving = state(stage="store")
        rig.handler.outcome = Track(moving, 0.0, frees_slot=True)
        recorded_after = ["publish state", "confirmed state"]
    else:
        moving = state(cancelled=True)
        rig.handler.outcome = Finish(moving, None, frees_slot=True)
        recorded_after = []
    await rig.consumer.on_tracking("default", rig.message(body=moving.model_dump_json().encode()))
    assert rig.log[: len(recorded_after) + 2] == [*recorded_after, "freed job-1", "ack"]
    assert ("slot freed default" in rig.log) is first

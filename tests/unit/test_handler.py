"""The job logic against the mock in-process: no broker involved, so every rule is checked in isolation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from contracts.api import ServiceTier
from mock_server import Faults, MockConfig, create_app
from mock_server.app import MockApp
from mock_server.testing import InProcessTransport
from tests.factories import tracking_state
from worker.access import Access
from worker.api_client import ApiClient
from worker.handler import Defer, Delivery, Finish, JobHandler, Outcome, Reject, Submit, Track
from worker.limits import TierLimits
from worker.metrics import Metrics
from worker.settings import Settings
from worker.stopping import Stopping
from worker.submitting import Submitter

IMAGE = "https://example.com/boat.png"


def job(**fields: Any) -> bytes:
    request = {"image": IMAGE, "prompt": "boat", **fields.pop("request", {})}
    return json.dumps({"job_id": fields.pop("job_id", "job-1"), "request": request, **fields}).encode()


class Env:
    def __init__(
        self,
        app: MockApp,
        handler: JobHandler,
        limits: dict[ServiceTier, TierLimits],
        access: Access,
        metrics: Metrics,
        stopping: Stopping,
    ) -> None:
        self.app = app
        self.handler = handler
        self.limits = limits
        self.access = access
        self.metrics = metrics
        self.stopping = stopping
        self.taken: Callable[[str, int], Awaitable[bool]] | None = None

    async def handle_job(self, delivery: Delivery) -> Outcome:
        """A job message through the handler and, when it goes to the API, through the submit loop, as
        the consumer takes it."""
        outcome = self.handler.handle_job(delivery)
        if isinstance(outcome, Submit):
            submitter = Submitter(self.handler, self.limits, self.stopping.sleep, taken=self.taken)
            outcome = await submitter.submit(outcome)
        return outcome

    def faults(self, **faults: object) -> None:
        self.app.state.set_faults(Faults.model_validate(faults))

    def submits(self) -> list[dict[str, Any]]:
        return [r for r in self.app.state.journal if r.endpoint == "submit"]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    app = create_app(MockConfig(api_key="k", time_scale=0.0001), seed=11)
    settings = Settings(
        poll_scale=0.0001,
        retry_base_seconds=0.001,
        retry_max_seconds=0.01,
        max_hold_seconds=2,
        in_flight_refresh_seconds=0.01,
        progress_interval_seconds=0,
    )
    metrics = Metrics(CollectorRegistry())
    limits: dict[ServiceTier, TierLimits] = {t: TierLimits(t, Settings().tiers[t]) for t in ("default", "flex")}
    stopping = Stopping()
    client = httpx.AsyncClient(transport=InProcessTransport(app), timeout=2.0)
    api = ApiClient(client, "http://mock", lambda: "k", metrics, total_seconds=4.0)
    access = Access("the API", api.check_access, metrics.api_access_ok, stopping, retry_max_seconds=0.01)
    handler = JobHandler(settings, api, limits, access, metrics)
    yield Env(app, handler, limits, access, metrics, stopping)
    stopping.set()
    await access.close()


async def until_finished(env: Env, outcome: Track | Finish | Defer | Reject) -> Finish:
    for _ in range(1000):
        if isinstance(outcome, Finish):
            return outcome
        assert isinstance(outcome, Track)
        await asyncio.sleep(max(0.0, outcome.delay))
        outcome = await env.handler.handle_tracking(outcome.state)
    pytest.fail("never finished")


async def test_a_valid_job_is_submitted_with_a_submitted_event(env: Env) -> None:
    outcome = await env.handle_job(Delivery(job(metadata={"k": "v"}), "default", reply_to="r"))
    assert isinstance(outcome, Track)
    (event,) = outcome.events
    assert event.status == "submitted"
    assert event.task_id in env.app.state.tasks
    assert event.metadata == {"k": "v"}
    assert outcome.state.reply_to == "r"
    assert outcome.state.attempts == 1
    assert "image" not in outcome.state.model_dump_json(), "tracking state never carries images"


async def test_a_job_runs_to_success_with_the_url_and_its_expiry(env: Env) -> None:
    final = await until_finished(env, await env.handle_job(Delivery(job(), "default")))
    event = final.event
    assert event.status == "succeeded"
    assert event.video_url and event.video_url.endswith(".mp4")
    assert event.video_url_expires_at is not None and event.finished_at is not None
    assert event.video_url_expires_at - event.finished_at == timedelta(seconds=3600)
    assert event.polls >= 1
    assert event.billed_tokens == 108900
    assert final.frees_slot, "the consumer frees the task's running slot once this is acknowledged"


async def test_the_api_is_sent_the_remaining_window(env: Env) -> None:
    created = datetime.now(UTC) - timedelta(hours=10)
    body = job(created_at=created.isoformat(), request={"execution_expires_after": 86400})
    await env.handle_job(Delivery(body, "default"))
    (task,) = env.app.state.tasks.values()
    assert 14 * 3600 - 5 <= task.request.execution_expires_after <= 14 * 3600


async def test_the_window_sent_is_never_below_the_apis_minimum(env: Env) -> None:
    created = datetime.now(UTC) - timedelta(seconds=3500)
    await env.handle_job(
        Delivery(job(created_at=created.isoformat(), request={"execution_expires_after": 3600}), "default")
    )
    (task,) = env.app.state.tasks.values()
    assert task.request.execution_expires_after == 3600


async def test_a_job_past_its_deadline_is_expired_without_calling_the_api(env: Env) -> None:
    created = datetime.now(UTC) - timedelta(seconds=3601)
    outcome = await env.handle_job(
        Delivery(job(created_at=created.isoformat(), request={"execution_expires_after": 3600}), "default")
    )
    assert isinstance(outcome, Finish)
    assert outcome.event.status == "expired"
    assert outcome.event.error is not None and outcome.event.error.code == "DEADLINE_EXCEEDED"
    assert outcome.event.task_id is None
    assert list(env.app.state.journal) == [], "no request reached the API"


async def test_the_amqp_timestamp_stands_in_for_a_missing_created_at(env: Env) -> None:
    stamp = datetime.now(UTC) - timedelta(days=3)
    outcome = await env.handle_job(Delivery(job(), "default", timestamp=stamp))
    assert isinstance(outcome, Finish) and outcome.event.status == "expired"
    assert outcome.event.created_at == stamp


async def test_the_request_tier_wins_over_the_queue(env: Env) -> None:
    outcome = await env.handle_job(Delivery(job(request={"service_tier": "flex"}), "default"))
    assert isinstance(outcome, Track) and outcome.state.tier == "flex"
    assert next(iter(env.app.state.tasks.values())).tier == "flex"


@pytest.mark.parametrize(
    ("body", "reason", "job_id"),
    [
        (b"\xff not json", "invalid_json", None),
        (b"[1, 2]", "schema", None),
        (job(request={"duration": 30}), "schema", "job-1"),
        (json.dumps({"job_id": "bad id!", "request": {}}).encode(), "schema", None),
        (job(extra_field=1), "schema", "job-1"),
    ],
)
async def test_invalid_messages_are_refused_with_a_reason(
    env: Env, body: bytes, reason: str, job_id: str | None
) -> None:
    outcome = await env.handle_job(Delivery(body, "default"))
    assert isinstance(outcome, Reject)
    assert outcome.error.reason == reason
    assert outcome.error.job_id == job_id
    assert (outcome.event is not None) == (job_id is not None), "a rejected event when the job_id is readable"
    assert env.submits() == []


async def test_an_oversize_message_is_refused_before_parsing(env: Env) -> None:
    assert env.handler.max_message_bytes == 128 * 1024 * 1024, "3.x's default until the broker is known"
    env.handler.max_message_bytes = 16 * 1024 * 1024  # as the service sets it, connected to a 4.x
    big = job(metadata={"pad": "x" * 100}) + b" " * (16 * 1024 * 1024)
    outcome = await env.handle_job(Delivery(big, "default"))
    assert isinstance(outcome, Reject)
    assert (outcome.error.reason, outcome.error.job_id) == ("oversize", "job-1")


async def test_transient_faults_are_retried_until_the_submit_goes_through(env: Env) -> None:
    env.faults(status_rates={"503": 0.5, "500": 0.3}, reset_rate=0.2, retry_after=None)
    outcomes = [await env.handle_job(Delivery(job(job_id=f"j{i}"), "default")) for i in range(5)]
    assert all(isinstance(o, Track) for o in outcomes)
    statuses = [r.status for r in env.submits()]
    assert statuses.count(200) == 5
    assert len(statuses) > 5, "some submits failed and were retried"
    assert sum(o.state.attempts for o in outcomes if isinstance(o, Track)) == len(statuses)


async def test_retries_stop_after_the_configured_attempts(env: Env) -> None:
    env.faults(status_rates={"503": 1.0})
    outcome = await env.handle_job(Delivery(job(), "default"))
    assert isinstance(outcome, Finish) and outcome.event.status == "failed"
    assert outcome.event.error is not None and outcome.event.error.code == "RETRIES_EXHAUSTED"
    assert len(env.submits()) == Settings().submit_max_attempts


async def test_a_429_blocks_the_tier_for_its_retry_after_and_defers_when_long(env: Env) -> None:
    env.faults(status_rates={"429": 1.0}, retry_after=30)
    outcome = await env.handle_job(Delivery(job(), "default"))
    assert isinstance(outcome, Defer)
    assert len(env.submits()) == 1
    assert env.limits["default"].wait_time() > 25
    assert env.limits["flex"].wait_time() == 0, "the other tier is not blocked"


async def test_a_400_fails_the_job_with_the_apis_message(env: Env) -> None:
    env.faults(status_rates={"400": 1.0})
    outcome = await env.handle_job(Delivery(job(), "default"))
    assert isinstance(outcome, Finish) and outcome.event.status == "failed"
    assert outcome.event.error is not None
    assert outcome.event.error.code == "INVALID_REQUEST_BODY"
    assert "injected 400" in outcome.event.error.message


async def test_an_auth_fault_fails_no_job_and_closes_access(env: Env) -> None:
    env.faults(auth={"status": 401, "reason": "FAILED_TO_AUTH", "message": "no"})
    outcome = await env.handle_job(Delivery(job(), "default"))
    assert isinstance(outcome, Defer), "the job goes back to its queue, not failed"
    assert env.access.ok is False
    env.faults()
    for _ in range(200):  # the probe notices the key works again
        if env.access.ok:
            break
        await asyncio.sleep(0.01)
    assert env.access.ok is True


async def test_a_full_tier_defers_the_job_after_the_hold_limit(env: Env) -> None:
    env.limits["default"].block_for(5, "running slots")  # longer than the 2 s the job may be held
    outcome = await env.handle_job(Delivery(job(), "default"))
    assert isinstance(outcome, Defer) and outcome.reason == "running slots limit reached"
    assert env.submits() == []


async def test_a_tier_full_for_less_than_the_hold_limit_holds_the_job_then_submits(env: Env) -> None:
    env.limits["default"].block_for(0.3, "running slots")
    outcome = await env.handle_job(Delivery(job(), "default"))
    assert isinstance(outcome, Track)
    assert len(env.submits()) == 1


async def test_a_failed_task_fails_the_job_with_the_apis_reason(env: Env) -> None:
    env.faults(outcomes=[{"outcome": "fail", "count": 1, "reason": "content moderation"}])
    final = await until_finished(env, await env.handle_job(Delivery(job(), "default")))
    assert final.event.status == "failed"
    assert final.event.error is not None
    assert (final.event.error.code, final.event.error.message) == ("TASK_FAILED", "content moderation")


async def test_a_task_the_api_expired_ends_expired(env: Env) -> None:
    env.faults(outcomes=[{"outcome": "fail", "count": 1, "reason": "Task Expired by the platform"}])
    final = await until_finished(env, await env.handle_job(Delivery(job(), "default")))
    assert final.event.status == "expired"
    assert final.event.error is not None and final.event.error.code == "TASK_EXPIRED"


async def test_a_task_unfinished_at_the_deadline_ends_expired_though_the_api_says_processing(env: Env) -> None:
    env.app.state.config = MockConfig(api_key="k", time_scale=1.0)  # the API's own window stays an hour
    env.faults(outcomes=[{"outcome": "hang", "count": 1}])
    created = datetime.now(UTC) - timedelta(seconds=3600) + timedelta(seconds=0.5)
    outcome = await env.handle_job(
        Delivery(job(created_at=created.isoformat(), request={"execution_expires_after": 3600}), "default")
    )
    final = await until_finished(env, outcome)
    assert final.event.status == "expired"
    assert final.event.error is not None and final.event.error.code == "DEADLINE_EXCEEDED"
    assert "PROCESSING" in final.event.error.message or "QUEUED" in final.event.error.message
    assert final.event.finished_at is not None and final.event.finished_at >= created + timedelta(seconds=3600)


async def test_progress_events_follow_changes(env: Env) -> None:
    env.app.state.config = MockConfig(api_key="k", time_scale=0.001, queue_seconds={"default": 0, "flex": 0}, jitter=0)
    outcome = await env.handle_job(Delivery(job(), "default"))
    progress: list[int] = []
    while isinstance(outcome, Track):
        progress += [e.progress_percent or 0 for e in outcome.events if e.status == "progress"]
        await asyncio.sleep(0.01)
        outcome = await env.handler.handle_tracking(outcome.state.model_copy(update={"next_poll_at": None}))
    assert outcome.event.status == "succeeded"
    assert len(progress) >= 2
    assert progress == sorted(progress) and len(set(progress)) == len(progress), "one event per change"


async def test_an_early_tracking_message_is_sent_on_without_polling(env: Env) -> None:
    state = tracking_state("j", task_id="t", next_poll_at=datetime.now(UTC) + timedelta(seconds=40))
    outcome = await env.handler.handle_tracking(state)
    assert isinstance(outcome, Track)
    assert 39 < outcome.delay <= 40
    assert list(env.app.state.journal) == []


@pytest.mark.parametrize("fault", [{"malformed_rate": 1.0}, {"reset_rate": 1.0}])
async def test_a_lost_submit_answer_is_retried_and_counted_as_a_possible_duplicate(
    env: Env, fault: dict[str, float]
) -> None:
    env.faults(endpoints=["submit"], **fault)
    env.app.state.set_faults(env.app.state.faults.model_copy(update={"outcomes": []}))
    outcome_task = asyncio.create_task(env.handle_job(Delivery(job(), "default")))
    for _ in range(500):  # the first answer is lost; then the fault is lifted and the retry goes through
        if env.submits():
            break
        await asyncio.sleep(0.001)
    env.faults()
    outcome = await outcome_task
    assert isinstance(outcome, Track)
    lost = [r for r in env.submits() if r.fault is not None]
    assert len(lost) >= 1 and len(env.submits()) == len(lost) + 1
    # A garbled answer comes after the work was done: each one left a task behind; a reset did no work.
    assert len(env.app.state.tasks) == (len(lost) + 1 if "malformed_rate" in fault else 1)
    duplicates = env.metrics.registry.get_sample_value(
        "seedance_submits_possibly_duplicated_total", {"tier": "default", "cause": "answer_lost"}
    )
    assert duplicates == len(lost)


async def test_a_lost_submit_answer_fails_the_job_when_told_not_to_risk_paying_twice(env: Env) -> None:
    handler = env.handler
    handler._settings = handler._settings.model_copy(update={"ambiguous_submit": "fail"})
    env.faults(endpoints=["submit"], malformed_rate=1.0)
    outcome = await env.handle_job(Delivery(job(), "default"))
    assert isinstance(outcome, Finish) and outcome.event.status == "failed"
    assert outcome.event.error is not None and outcome.event.error.code == "SUBMIT_AMBIGUOUS"
    assert len(env.submits()) == 1, "not sent again"
    assert len(env.app.state.tasks) == 1, "the task the API created is named by no event: hence the choice"


async def test_a_redelivered_job_counts_as_a_possible_duplicate(env: Env) -> None:
    await env.handle_job(Delivery(job(), "flex", redelivered=True))
    value = env.metrics.registry.get_sample_value(
        "seedance_submits_possibly_duplicated_total", {"tier": "default", "cause": "redelivered"}
    )
    assert value == 1, "counted under the tier the job runs in"


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"created_at": 12345}, "created_at: must be an RFC 3339 date-time"),
        ({"created_at": "2026-11-24T10:00:00"}, "created_at: Input should have timezone info"),
        ({"request": {"fps": 24.0}}, "request.fps: must be an integer"),
        ({"request": {"duration": "5"}}, "request.duration"),
        ({"metadata": {"a": json.loads("[" * 40 + "]" * 40)}}, "nests deeper than 32"),
    ],
)
async def test_loose_types_are_rejected_not_coerced(env: Env, fields: dict[str, Any], words: str) -> None:
    outcome = await env.handle_job(Delivery(job(**fields), "default"))
    assert isinstance(outcome, Reject)
    assert outcome.error.reason == "schema"
    assert words in outcome.error.message
    assert env.submits() == []


async def test_any_failure_to_read_a_message_is_a_rejection_not_a_crash(env: Env) -> None:
    deep = b'{"job_id": "x", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    outcome = await env.handle_job(Delivery(deep, "default"))
    assert isinstance(outcome, Reject) and outcome.error.reason == "invalid_json"

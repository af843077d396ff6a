"""The worker against a real RabbitMQ and the mock over a real socket, seen as a producer sees it."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest

from contracts.messages import DEAD_LETTER_QUEUE
from tests.integration.conftest import MOCK_KEY, NO_QUOTAS, Bus, Mock, RunningWorker, job, rabbitmqctl, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.server]


async def test_topology_is_declared_idempotently_with_quorum_queues(start_worker, bus: Bus, vhost: str) -> None:
    first = await start_worker()
    first.stop()
    await start_worker()  # declares the same things again without complaint
    listing = rabbitmqctl("list_queues", "-p", vhost.rsplit("/", 1)[1], "name", "type", "arguments")
    rows = {line.split("\t")[0]: line for line in listing.splitlines() if line.strip()}
    for name in (
        "seedance.jobs.default",
        "seedance.jobs.flex",
        DEAD_LETTER_QUEUE,
        "seedance.tracking.default",
        "seedance.tracking.flex.delay.500ms",
    ):
        assert "quorum" in rows[name], rows.get(name)
    assert "x-delivery-limit" in rows["seedance.jobs.default"]
    assert "x-message-ttl" in rows["seedance.tracking.flex.delay.500ms"]


async def test_a_job_ends_succeeded_with_events_reply_and_metadata(start_worker, bus: Bus, mock: Mock) -> None:
    worker = await start_worker()
    body = {**job("happy-1"), "metadata": {"order": 42, "tags": ["a"]}}
    await bus.publish(body, reply_to=bus.reply_queue, correlation_id="corr-1")
    final = (await bus.wait_terminal(["happy-1"]))["happy-1"]
    assert final["status"] == "succeeded"
    assert final["video_url"].endswith(".mp4")
    assert final["video_url_expires_at"] > final["finished_at"]
    assert final["metadata"] == {"order": 42, "tags": ["a"]}
    statuses = [e["status"] for e in bus.events["happy-1"]]
    assert statuses[0] == "submitted" and statuses[-1] == "succeeded"
    assert all(e["metadata"] == body["metadata"] for e in bus.events["happy-1"])
    await wait_for(lambda: len(bus.replies) == 1, what="the reply")
    assert bus.replies[0].correlation_id == "corr-1"
    assert json.loads(bus.replies[0].body)["status"] == "succeeded"
    (task,) = mock.tasks()
    assert task["task_id"] == final["task_id"]
    assert await worker.sample("seedance_jobs_completed_total", tier="default", status="succeeded") == 1
    assert await worker.sample("seedance_video_seconds_total", tier="default", resolution="720p") == 5
    assert await worker.sample("seedance_job_deadline_used_ratio_count", tier="default") == 1


async def test_no_delivery_is_held_while_the_video_renders_and_any_replica_continues(
    start_worker, bus: Bus, mock: Mock
) -> None:
    mock.config(render_seconds={"default": 3000, "flex": 3000})  # 3 s at the test's time scale
    first = await start_worker(default_poll_min_seconds=1000, default_poll_max_seconds=1000)  # polls 1 s apart
    await bus.publish(job("slow-1"))
    await wait_for(lambda: bool(bus.events.get("slow-1")), what="submitted")
    await first.shutdown()
    # Had the job been held unacknowledged, stopping would have put it back in its queue.
    assert await bus.queue_depth("seedance.jobs.default") == 0
    tracked = [
        await bus.queue_depth(q)
        for q in ["seedance.tracking.default"]
        + [f"seedance.tracking.default.delay.{ms}ms" for ms in (20, 50, 100, 200, 500, 1000)]
    ]
    assert sum(tracked) == 1, "the task's state rests in the broker"
    assert not bus.terminal("slow-1")
    await start_worker()  # another replica picks the task up where the first left it
    final = (await bus.wait_terminal(["slow-1"]))["slow-1"]
    assert final["status"] == "succeeded"
    assert len(mock.submits()) == 1, "continued, not submitted again"


def _body(job_id: str, **fields: Any) -> bytes:
    return json.dumps({"job_id": job_id, "request": {"image": "https://e.com/a.png", "prompt": "p"}, **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "reason", "job_id"),
    [
        (b"this is not json", "invalid_json", None),
        (json.dumps({"job_id": "bad-1", "request": {"image": "ftp://x", "prompt": "p"}}).encode(), "schema", "bad-1"),
        (json.dumps({"job_id": "bad-2", "request": {"image": "https://e.com/a.png"}}).encode(), "schema", "bad-2"),
        # Nesting a few thousand levels deep: json.loads would raise RecursionError.
        (b'{"job_id": "deep-1", "metadata": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "invalid_json", None),
        (_body("deep-2", metadata={"a": json.loads("[" * 100 + "]" * 100)}), "schema", "deep-2"),
        (_body("epoch-1", created_at=12345), "schema", "epoch-1"),
        (_body("epoch-2", created_at="1700000000"), "schema", "epoch-2"),
        (_body("utf16-1").decode().encode("utf-16"), "invalid_json", None),
        (
            json.dumps({"job_id": None, "request": {"image": "https://e.com/a.png", "prompt": "p"}}).encode(),
            "schema",
            None,
        ),
    ],
    ids=[
        "not-json",
        "bad-image",
        "no-prompt",
        "deep-nesting",
        "deep-metadata",
        "epoch",
        "epoch-text",
        "utf16",
        "null-id",
    ],
)
async def test_an_invalid_message_is_dead_lettered_with_its_reason(
    start_worker, bus: Bus, mock: Mock, raw: bytes, reason: str, job_id: str | None
) -> None:
    worker = await start_worker()
    await bus.publish(raw, reply_to=bus.reply_queue, correlation_id="c")
    await wait_for(lambda: _eq(worker.sample("seedance_jobs_rejected_total", reason=reason)), what="rejection")
    dead = await bus.get(DEAD_LETTER_QUEUE)
    assert dead is not None
    assert dead.body == raw, "the message is kept unchanged"
    assert str(dead.headers["x-seedance-reason"]).startswith(reason)
    assert dead.headers["x-seedance-reason-code"] == reason
    assert "x-death" not in dead.headers, "dead-lettered by the worker at once, not by RabbitMQ after retries"
    assert await worker.sample("seedance_jobs_received_total", tier="default") == 1, "delivered once"
    assert dead.headers["x-seedance-routing-key"] == "job.default"
    if job_id is None:
        assert not bus.events
    else:
        (event,) = bus.events[job_id]
        assert event["status"] == "rejected"
        assert event["error"]["code"] == "INVALID_JOB"
        await wait_for(lambda: len(bus.replies) == 1, what="the reply")
    assert mock.submits() == []
    assert (await worker.readyz()).status_code == 200, "bad input never hurts the worker"


async def test_an_oversize_message_is_dead_lettered(start_worker, bus: Bus, mock: Mock) -> None:
    worker = await start_worker(max_message_bytes=1000)
    body = {**job("big-1"), "metadata": {"pad": "x" * 2000}}
    await bus.publish(body)
    await wait_for(lambda: _eq(worker.sample("seedance_jobs_rejected_total", reason="oversize")), what="rejection")
    assert bus.events["big-1"][0]["status"] == "rejected"
    assert (await bus.get(DEAD_LETTER_QUEUE)) is not None


async def test_a_job_past_its_deadline_is_expired_without_calling_the_api(start_worker, bus: Bus, mock: Mock) -> None:
    await start_worker()
    old = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    await bus.publish({**job("late-1", execution_expires_after=3600), "created_at": old})
    await bus.publish(job("late-2", execution_expires_after=3600), timestamp=datetime.now(UTC) - timedelta(hours=2))
    finals = await bus.wait_terminal(["late-1", "late-2"])
    for final in finals.values():
        assert final["status"] == "expired"
        assert final["error"]["code"] == "DEADLINE_EXCEEDED"
        assert final["task_id"] is None
    assert mock.submits() == []


async def test_a_submitted_job_unfinished_at_its_deadline_ends_expired(start_worker, bus: Bus, mock: Mock) -> None:
    mock.faults(outcomes=[{"outcome": "hang", "prompt_contains": "hang"}])
    mock.config(time_scale=1.0)  # the API's own window stays an hour: only the worker's deadline can end it
    await start_worker()
    created = (datetime.now(UTC) - timedelta(seconds=3598)).isoformat()
    await bus.publish({**job("hang-1", execution_expires_after=3600), "created_at": created})
    final = (await bus.wait_terminal(["hang-1"], timeout=20))["hang-1"]
    assert final["status"] == "expired"
    assert final["error"]["code"] == "DEADLINE_EXCEEDED"
    (task,) = mock.tasks()
    assert task["status"] in ("TASK_STATUS_QUEUED", "TASK_STATUS_PROCESSING"), "the API never said expired"


async def test_a_job_runs_in_the_tier_its_request_names(start_worker, bus: Bus, mock: Mock) -> None:
    await start_worker()
    await bus.publish(job("tier-1", service_tier="flex"), routing_key="job.default")
    final = (await bus.wait_terminal(["tier-1"]))["tier-1"]
    assert final["service_tier"] == "flex"
    assert mock.tasks()[0]["tier"] == "flex"


async def test_api_faults_are_retried_and_every_job_succeeds(start_worker, bus: Bus, mock: Mock) -> None:
    mock.faults(
        status_rates={"500": 0.15, "503": 0.15, "429": 0.1},
        reset_rate=0.05,
        timeout_rate=0.05,
        timeout_seconds=0.3,
        retry_after=0.05,
    )
    worker = await start_worker(api_timeout_seconds=0.2, submit_max_attempts=30)
    ids = [f"flaky-{i}" for i in range(30)]
    await bus.publish_many([job(i, duration=4) for i in ids])
    finals = await bus.wait_terminal(ids, timeout=60)
    assert {f["status"] for f in finals.values()} == {"succeeded"}
    journal = mock.requests()
    assert any(r.get("fault") for r in journal), "faults were injected"
    assert (
        await worker.sample("seedance_api_retries_total", endpoint="submit", reason="503")
        + await worker.sample("seedance_api_retries_total", endpoint="task-result", reason="503")
        > 0
    )


async def test_a_400_fails_the_job_with_the_apis_message(start_worker, bus: Bus, mock: Mock) -> None:
    mock.faults(status_rates={"400": 1.0}, endpoints=["submit"])
    await start_worker()
    await bus.publish(job("refused-1"))
    final = (await bus.wait_terminal(["refused-1"]))["refused-1"]
    assert final["status"] == "failed"
    assert final["error"] == {"code": "INVALID_REQUEST_BODY", "message": "request rejected (injected 400 fault)"}
    assert len(mock.submits()) == 1, "a refused request is not sent again"


async def test_a_failed_task_fails_the_job_with_the_apis_reason(start_worker, bus: Bus, mock: Mock) -> None:
    mock.faults(outcomes=[{"outcome": "fail", "prompt_contains": "doomed", "reason": "policy violation"}])
    await start_worker()
    await bus.publish(job("doomed-1"))
    final = (await bus.wait_terminal(["doomed-1"]))["doomed-1"]
    assert final["status"] == "failed"
    assert final["error"] == {"code": "TASK_FAILED", "message": "policy violation"}


async def test_an_auth_fault_pauses_intake_and_resumes_by_itself(start_worker, bus: Bus, mock: Mock) -> None:
    worker = await start_worker()
    mock.faults(auth={"status": 403, "reason": "NOT_ENOUGH_BALANCE", "message": "balance is empty"})
    await bus.publish(job("broke-1"))
    await wait_for(lambda: _status(worker, 503), what="not ready")
    assert await worker.sample("seedance_worker_ready") == 0
    assert await worker.sample("seedance_api_access_ok") == 0
    queues = [f"seedance.{kind}.{tier}" for kind in ("jobs", "tracking") for tier in ("default", "flex")]

    async def paused_with_the_job_back_in_its_queue() -> bool:
        consumers = [await bus.consumers(q) for q in queues]
        return consumers == [0, 0, 0, 0] and await bus.queue_depth("seedance.jobs.default") == 1

    await wait_for(paused_with_the_job_back_in_its_queue, what="intake paused, the job back in its queue")
    consuming = (await worker.readyz()).json()["consuming"]
    stores = ["seedance.store.default", "seedance.store.flex"]  # copies need no API: they go on
    assert consuming == stores
    assert [await bus.consumers(q) for q in stores] == [1, 1], "readiness says what the broker says"
    assert [r["status"] for r in mock.submits()][-1] == 403
    assert not bus.terminal("broke-1"), "no job fails for an account fault"
    mock.faults()  # the balance is topped up
    final = (await bus.wait_terminal(["broke-1"], timeout=20))["broke-1"]
    assert final["status"] == "succeeded"
    await wait_for(lambda: _status(worker, 200), what="ready again")


def peak(intervals: list[tuple[str, str | None]]) -> int:
    """The most intervals (start, end; None: still open) that overlap at any moment."""
    points = [(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals if end is not None]
    running = top = 0
    for _, step in sorted(points, key=lambda p: (p[0], p[1])):
        running += step
        top = max(top, running)
    return top


async def test_the_running_limit_holds_jobs_in_rabbitmq_with_a_few_queued_upstream(
    start_worker, bus: Bus, mock: Mock
) -> None:
    # The account runs 3 tasks at once; the worker keeps 2 more waiting in the API's queue.
    mock.config(render_seconds={"default": 600}, quotas={"default": {"concurrency": 3}}, jitter=0)
    # Polls at least 100 ms apart, as in production (2 s apart) relative to broker hops of a few ms.
    worker = await start_worker(
        default_max_in_flight=3,
        default_queue_ahead=2,
        default_prefetch=2,
        default_poll_min_seconds=100,
        default_poll_max_seconds=200,
    )
    ids = [f"lim-{i}" for i in range(12)]
    await bus.publish_many([job(i) for i in ids])
    await wait_for(lambda: len(mock.tasks()) == 5, what="five tasks submitted")
    assert await bus.queue_depth("seedance.jobs.default") >= 12 - 5 - 2, "waiting jobs stay in the queue"
    await wait_for(
        lambda: _at_least(worker.sample("seedance_queue_messages", queue="seedance.jobs.default"), 5),
        5,
        what="queue depth on /metrics",
    )
    await wait_for(lambda: _eq(worker.sample("seedance_account_slots_taken", tier="default"), 5), 5, "slots")
    await bus.wait_terminal(ids, timeout=60)
    tasks = mock.tasks()
    running = peak([(t["started_at"], t["finished_at"]) for t in tasks if t["started_at"]])
    submitted = peak([(t["submitted_at"], t["finished_at"]) for t in tasks])
    assert running <= 3, f"{running} tasks ran at once"
    assert submitted <= 5, f"{submitted} tasks were submitted and unfinished at once"
    assert sum(1 for t in tasks if t["queued_seconds"] > 0.05) > 0, "some waited upstream for a slot"
    assert await worker.sample("seedance_tier_limit", tier="default", limit="max_in_flight") == 3
    assert await worker.sample("seedance_tier_limit", tier="default", limit="queue_ahead") == 2


async def test_a_flex_backlog_does_not_delay_a_default_job(start_worker, bus: Bus, mock: Mock) -> None:
    mock.config(quotas=NO_QUOTAS, model_rpm=None)
    await start_worker(flex_max_in_flight=5, flex_prefetch=2)
    flex_ids = [f"flex-{i}" for i in range(2000)]
    await bus.publish_many([job(i, service_tier="flex") for i in flex_ids], routing_key="job.flex")
    await bus.publish(job("urgent-1"))
    final = (await bus.wait_terminal(["urgent-1"], timeout=30))["urgent-1"]
    assert final["status"] == "succeeded"
    waiting = await bus.queue_depth("seedance.jobs.flex")
    assert waiting > 1900, f"the default job finished while {waiting} flex jobs still waited"
    flex_done = sum(1 for i in flex_ids if bus.terminal(i))
    assert flex_done < 100


async def test_metrics_and_health_endpoints_answer(start_worker, bus: Bus, mock: Mock) -> None:
    worker = await start_worker()
    text = await worker.metrics()
    for name in (
        "seedance_jobs_received_total",
        "seedance_jobs_completed_total",
        "seedance_jobs_rejected_total",
        "seedance_tasks_in_flight",
        "seedance_job_queue_wait_seconds",
        "seedance_job_duration_seconds",
        "seedance_api_requests_total",
        "seedance_api_request_duration_seconds",
        "seedance_api_retries_total",
        "seedance_polls_total",
        "seedance_video_seconds_total",
        "seedance_worker_ready",
    ):
        assert name in text, name
    assert (await worker.get("/healthz")).status_code == 200
    assert (await worker.readyz()).json()["ready"] is True
    assert MOCK_KEY not in text


async def test_a_broker_connection_loss_is_survived(start_worker, bus: Bus, mock: Mock, vhost: str) -> None:
    mock.config(render_seconds={"default": 1000, "flex": 1000})
    await start_worker()
    ids = [f"conn-{i}" for i in range(20)]
    await bus.publish_many([job(i) for i in ids])
    await wait_for(lambda: sum(1 for i in ids if bus.events.get(i)) >= 5, what="some submissions")
    name = vhost.rsplit("/", 1)[1]
    listing = rabbitmqctl("list_connections", "--no-table-headers", "pid", "vhost", "client_properties")
    # Only the worker's connection: the test's own event subscription must not miss events meanwhile.
    ours = [line.split("\t")[0] for line in listing.splitlines() if f"\t{name}\t" in line and "seedance-worker" in line]
    assert ours
    for connection in ours:
        rabbitmqctl("close_connection", connection, "test: broker connection loss")
    finals = await bus.wait_terminal(ids, timeout=60)
    assert {f["status"] for f in finals.values()} == {"succeeded"}


async def _eq(sample: Awaitable[float], expected: float = 1) -> bool:
    return await sample == expected


async def _at_least(sample: Awaitable[float], expected: float) -> bool:
    return await sample >= expected


async def _status(worker: RunningWorker, status: int) -> bool:
    return (await worker.readyz()).status_code == status


@pytest.mark.parametrize("queue", ["seedance.tracking.default", "seedance.jobs.default"])
async def test_a_consumer_the_broker_cancels_is_restored(start_worker, bus: Bus, mock: Mock, queue: str) -> None:
    """Deleting a consumed queue makes RabbitMQ cancel its consumer (as a node loss or a quorum consumer
    timeout does): the worker notices, declares the queue again and consumes it, and jobs go on."""
    worker = await start_worker()
    await bus.publish(job("before-1"))
    assert (await bus.wait_terminal(["before-1"]))["before-1"]["status"] == "succeeded"
    raw = await bus.channel.get_underlay_channel()
    await raw.queue_delete(queue)
    await wait_for(lambda: _consumed(bus, queue), what="the queue declared and consumed again")
    assert await worker.sample("seedance_consumers_cancelled_total", queue=queue) == 1
    await wait_for(lambda: _status(worker, 200), what="ready again")
    assert queue in (await worker.readyz()).json()["consuming"]
    await bus.publish(job("after-1"))
    assert (await bus.wait_terminal(["after-1"]))["after-1"]["status"] == "succeeded"


async def _consumed(bus: Bus, queue: str) -> bool:
    try:
        return await bus.consumers(queue) == 1
    except aio_pika.exceptions.ChannelClosed:  # not declared again yet (the robust channel reopens)
        return False


async def test_a_deleted_delay_queue_is_reported_and_declared_again(
    start_worker, bus: Bus, mock: Mock, caplog: pytest.LogCaptureFixture
) -> None:
    worker = await start_worker()
    raw = await bus.channel.get_underlay_channel()
    await raw.queue_delete("seedance.tracking.default.delay.1000ms")  # counted, never consumed
    await wait_for(lambda: _declared(bus, "seedance.tracking.default.delay.1000ms"), what="the queue back")
    assert "the recount of tasks in flight failed (ChannelNotFoundEntity" in caplog.text
    await bus.publish(job("after-delete-1"))
    assert (await bus.wait_terminal(["after-delete-1"]))["after-delete-1"]["status"] == "succeeded"
    assert (await worker.readyz()).status_code == 200


async def _declared(bus: Bus, queue: str) -> bool:
    try:
        await bus.queue_depth(queue)
    except aio_pika.exceptions.ChannelClosed:
        return False
    return True


async def test_a_deleted_permit_pool_is_reported_declared_again_and_refilled(
    start_worker, bus: Bus, mock: Mock, caplog: pytest.LogCaptureFixture
) -> None:
    """The tier's permits do not answer (here: their pool is gone): the tier says so, declares its permit
    queues again (the new pool full), and jobs go on; nothing is dead-lettered."""
    worker = await start_worker(default_max_in_flight=2, default_queue_ahead=0)
    pool = "seedance.permits.default.slots.2"
    assert await bus.queue_depth(pool) == 2, "the pool its creator filled"
    raw = await bus.channel.get_underlay_channel()
    await raw.queue_delete(pool)
    await wait_for(lambda: _declared(bus, pool), what="the pool declared again")
    assert "a permit queue of the default tier is missing" in caplog.text
    await bus.publish(job("after-pool-1"))
    assert (await bus.wait_terminal(["after-pool-1"]))["after-pool-1"]["status"] == "succeeded"
    await wait_for(lambda: _status(worker, 200), what="ready again")
    assert (await worker.readyz()).json()["permits_unreachable"] == {}
    assert await worker.sample("seedance_permits_unreachable", tier="default") == 0
    assert await bus.queue_depth(pool) == 2, "every slot free again once the job ended"
    assert await bus.queue_depth("seedance.jobs.dead") == 0

"""A worker on the real broker against the mock's odd but legal task-result answers: each is handled, none
knocks a job off course, none makes the worker ask more than once per poll interval, and a delivery that
makes the worker fail is retried with back-off, then parked with its task id."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika

from contracts.messages import DEAD_LETTER_QUEUE
from tests.integration.conftest import Bus, Mock, job, wait_for

# A tier's shortest poll interval under the tests' poll scale (0.001): 0.1 s of real time.
POLL_MIN = {"default_poll_min_seconds": 100, "default_poll_max_seconds": 200}
# A state may be polled up to half the shortest delay level (20 ms here) before it is due, and the
# journal's times are the mock's arrivals (up to ~10 ms of jitter on a busy machine).
EARLIEST = 0.1 - 0.01 - 0.01


def polls_of(mock: Mock, task_id: str) -> list[datetime]:
    return [
        datetime.fromisoformat(r["time"].replace("Z", "+00:00"))
        for r in mock.requests()
        if r["endpoint"] == "task-result" and r.get("task_id") == task_id
    ]


def shortest_gap(times: list[datetime]) -> float:
    return min((b - a).total_seconds() for a, b in itertools.pairwise(times))


async def test_a_gateway_that_does_not_know_a_fresh_task_yet_is_asked_again_until_it_does(
    start_worker, bus: Bus, mock: Mock
) -> None:
    worker = await start_worker(**POLL_MIN)
    mock.faults(task_result=[{"answer": "status", "status": 404, "reason": "TASK_NOT_FOUND", "polls": 3}])
    await bus.publish(job("catch-up-1"))
    final = (await bus.wait_terminal(["catch-up-1"]))["catch-up-1"]
    assert final["status"] == "succeeded"
    polls = polls_of(mock, final["task_id"])
    assert len(polls) >= 4, "three refusals, then the result"
    assert shortest_gap(polls) >= EARLIEST, "never more than one request per poll interval"
    assert await worker.sample("seedance_api_retries_total", endpoint="task-result", reason="404") == 3


async def test_a_task_result_refused_for_good_fails_the_job_with_the_apis_reason_and_its_task_id(
    start_worker, bus: Bus, mock: Mock
) -> None:
    await start_worker(poll_refused_max_seconds=1.5, **POLL_MIN)
    mock.faults(task_result=[{"answer": "status", "status": 409, "reason": "TASK_STATE_CONFLICT"}])
    await bus.publish(job("conflict-1"))
    final = (await bus.wait_terminal(["conflict-1"]))["conflict-1"]
    assert final["status"] == "failed"
    assert final["error"]["code"] == "TASK_STATE_CONFLICT"
    assert final["task_id"] in {t["task_id"] for t in mock.tasks()}, "the paid task is named"
    polls = polls_of(mock, final["task_id"])
    assert 2 <= len(polls) <= 1.5 / 0.1 + 2, "bounded: back-off from the shortest interval, for 1.5 s"
    assert shortest_gap(polls) >= EARLIEST


async def test_the_refusal_window_ends_at_the_deadline(start_worker, bus: Bus, mock: Mock) -> None:
    await start_worker(poll_refused_max_seconds=3600, **POLL_MIN)
    mock.faults(task_result=[{"answer": "status", "status": 422, "reason": "UNPROCESSABLE"}])
    created = (datetime.now(UTC) - timedelta(seconds=3600 - 1.5)).isoformat()  # 1.5 s of its window left
    await bus.publish({**job("deadline-1", execution_expires_after=3600), "created_at": created})
    final = (await bus.wait_terminal(["deadline-1"]))["deadline-1"]
    assert (final["status"], final["error"]["code"]) == ("expired", "DEADLINE_EXCEEDED")


async def test_an_unknown_task_status_is_not_finished_and_polling_goes_on(start_worker, bus: Bus, mock: Mock) -> None:
    worker = await start_worker(**POLL_MIN)
    unknown = {"answer": "unknown_status", "task_status": "TASK_STATUS_UNKNOWN", "polls": 2}
    mock.faults(task_result=[unknown, {**unknown, "task_status": "TASK_STATUS_RESERVED_FOR_LATER", "polls": 4}])
    await bus.publish(job("unknown-1"))
    final = (await bus.wait_terminal(["unknown-1"]))["unknown-1"]
    assert final["status"] == "succeeded"
    assert await worker.sample("seedance_task_status_unknown_total", tier="default") == 4


async def test_a_maintenance_page_is_polled_again_with_back_off(start_worker, bus: Bus, mock: Mock) -> None:
    worker = await start_worker(**POLL_MIN)
    mock.faults(task_result=[{"answer": "html", "polls": 2}])
    await bus.publish(job("maintenance-1"))
    final = (await bus.wait_terminal(["maintenance-1"]))["maintenance-1"]
    assert final["status"] == "succeeded"
    assert await worker.sample("seedance_api_retries_total", endpoint="task-result", reason="malformed") == 2
    assert shortest_gap(polls_of(mock, final["task_id"])) >= EARLIEST


async def test_another_tasks_result_is_never_taken_for_a_jobs_own(start_worker, bus: Bus, mock: Mock) -> None:
    worker = await start_worker()
    mock.faults(task_result=[{"answer": "other_task", "polls": 1}])  # every task's first poll
    ids = [f"mine-{i}" for i in range(8)]
    await bus.publish_many([job(i) for i in ids])
    finals = await bus.wait_terminal(ids, timeout=60)
    for final in finals.values():
        assert final["status"] == "succeeded"
        assert final["video_url"].endswith(f"/{final['task_id']}.mp4"), "each job gets its own task's video"
    assert len({f["task_id"] for f in finals.values()}) == len(ids)
    assert await worker.sample("seedance_api_retries_total", endpoint="task-result", reason="wrong_task") == len(ids)


async def test_a_tracking_state_that_makes_the_worker_fail_is_parked_with_its_task_id(
    start_worker, bus: Bus, mock: Mock
) -> None:
    """A naive deadline cannot be compared with the clock: the handler raises, as a bug would."""
    worker = await start_worker(delivery_limit=3)
    now = datetime.now(UTC).replace(tzinfo=None)
    state: dict[str, Any] = {
        "job_id": "broken-1",
        "tier": "default",
        "task_id": "paid-task-42",
        "created_at": now.isoformat(),
        "deadline": (now + timedelta(hours=1)).isoformat(),
        "duration": 5,
        "resolution": "720p",
        "generate_audio": True,
        "tokens": 1,
    }
    await bus.channel.default_exchange.publish(
        aio_pika.Message(json.dumps(state).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        routing_key="seedance.tracking.default",
    )
    await wait_for(lambda: bus.queue_depth(DEAD_LETTER_QUEUE), what="the parked state")
    parked = await bus.get(DEAD_LETTER_QUEUE)
    assert parked is not None
    headers = parked.headers or {}
    assert headers["x-seedance-reason-code"] == "handler_error"
    assert headers["x-seedance-task-id"] == "paid-task-42" and headers["x-seedance-failures"] == 3
    assert json.loads(parked.body) == state, "kept unchanged, so a person can recover the paid task"
    assert await worker.sample("seedance_deliveries_failed_total", kind="tracking") == 3
    assert await worker.sample("seedance_deliveries_parked_total", kind="tracking") == 1
    polls = polls_of(mock, "paid-task-42")
    assert len(polls) == 3 and shortest_gap(polls) >= 0.5, "one poll per failure, after a back-off: never a loop"

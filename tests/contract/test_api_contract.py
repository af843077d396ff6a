"""The API's behaviour, pinned down once and checked against every target: the mock in-process, the mock
over a socket, and the real API when enabled. Tests marked mock_only need the mock's /_mock surface."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from contracts.api import SUBMIT_PATH, TASK_RESULT_PATH, ErrorBody, SubmitResponse, TaskResult, TaskStatus
from tests.contract.conftest import mock_control
from tests.contract.targets import Target
from tests.imaging import data_uri, png

IMAGE = data_uri(png(640, 360))


def body(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "image": IMAGE,
        "prompt": "a paper boat drifts across a pond",
        "duration": 4,
        "resolution": "480p",
        "generate_audio": False,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


async def submit(target: Target, payload: dict[str, Any]) -> str:
    response = await target.api.post(SUBMIT_PATH, json=payload)
    assert response.status_code == 200, response.text
    return SubmitResponse.model_validate_json(response.content).task_id


async def poll_until_finished(target: Target, task_id: str) -> list[TaskResult]:
    seen: list[TaskResult] = []
    deadline = time.monotonic() + target.poll_timeout
    while time.monotonic() < deadline:
        response = await target.api.get(TASK_RESULT_PATH, params={"task_id": task_id})
        assert response.status_code == 200, response.text
        result = TaskResult.model_validate_json(response.content)
        seen.append(result)
        if result.task.status.finished:
            return seen
        await asyncio.sleep(target.poll_interval)
    pytest.fail(f"task {task_id} did not finish within {target.poll_timeout} s")


def assert_error(response: httpx.Response, status: int, reason: str) -> ErrorBody:
    assert response.status_code == status, response.text
    error = ErrorBody.model_validate_json(response.content)
    assert error.code == status
    assert error.reason == reason
    return error


async def test_a_valid_request_is_accepted_with_a_task_id(target: Target) -> None:
    task_id = await submit(target, body())
    assert task_id.strip()


async def test_a_request_with_only_the_required_fields_is_accepted(target: Target) -> None:
    await submit(target, {"image": IMAGE, "prompt": "waves"})


INVALID_FIELDS: list[tuple[str, str, Any]] = [
    ("fps other than 24", "fps", 30),
    ("seed below -1", "seed", -2),
    ("seed above 2^32-1", "seed", 4294967296),
    ("seed as a string", "seed", "7"),
    ("image missing", "image", ...),
    ("image with an ftp URL", "image", "ftp://example.com/a.png"),
    ("image that is no URL", "image", "a cat"),
    ("image too small", "image", data_uri(png(300, 400))),
    ("image too large", "image", data_uri(png(6000, 3000))),
    ("image too tall", "image", data_uri(png(320, 800))),
    ("image in an unsupported format", "image", data_uri(png(640, 360), "svg+xml")),
    ("image data that is not base64", "image", "data:image/png;base64,@@@@"),
    ("last_image too small", "last_image", data_uri(png(200, 200))),
    ("prompt missing", "prompt", ...),
    ("prompt empty", "prompt", ""),
    ("ratio not offered", "ratio", "2:1"),
    ("duration below 4", "duration", 3),
    ("duration above 12", "duration", 13),
    ("duration not an integer", "duration", 5.5),
    ("resolution not offered", "resolution", "4k"),
    ("watermark not a boolean", "watermark", "yes"),
    ("camera_fixed not a boolean", "camera_fixed", 1),
    ("generate_audio not a boolean", "generate_audio", "true"),
    ("service_tier unknown", "service_tier", "batch"),
    ("execution_expires_after below 3600", "execution_expires_after", 3599),
    ("execution_expires_after above 259200", "execution_expires_after", 259201),
]


@pytest.mark.parametrize(("case", "field", "value"), INVALID_FIELDS, ids=[c[0] for c in INVALID_FIELDS])
async def test_an_invalid_field_is_rejected_with_400_naming_it(
    target: Target, case: str, field: str, value: Any
) -> None:
    response = await target.api.post(SUBMIT_PATH, json=body(**{field: value}))
    error = assert_error(response, 400, "INVALID_REQUEST_BODY")
    assert field in error.message, case


async def test_a_body_that_is_not_json_is_rejected_with_400(target: Target) -> None:
    response = await target.api.post(SUBMIT_PATH, content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(response, 400, "INVALID_REQUEST_BODY")


async def test_a_missing_key_is_answered_401_on_both_endpoints(target: Target) -> None:
    async with target.unauthenticated() as anonymous:
        assert_error(await anonymous.post(SUBMIT_PATH, json=body()), 401, "FAILED_TO_AUTH")
        response = await anonymous.get(TASK_RESULT_PATH, params={"task_id": "anything"})
        assert_error(response, 401, "FAILED_TO_AUTH")


async def test_a_wrong_key_is_answered_403_on_both_endpoints(target: Target) -> None:
    wrong = {"Authorization": "Bearer not-the-key-0000"}
    assert_error(await target.api.post(SUBMIT_PATH, json=body(), headers=wrong), 403, "INVALID_API_KEY")
    response = await target.api.get(TASK_RESULT_PATH, params={"task_id": "anything"}, headers=wrong)
    assert_error(response, 403, "INVALID_API_KEY")


async def test_an_unknown_model_is_answered_404(target: Target) -> None:
    response = await target.api.post("/v3/async/seedance-v0-no-such-model", json=body())
    assert_error(response, 404, "MODEL_NOT_FOUND")


async def test_an_unknown_task_is_answered_404(target: Target) -> None:
    response = await target.api.get(TASK_RESULT_PATH, params={"task_id": "00000000-0000-4000-8000-000000000000"})
    assert_error(response, 404, "TASK_NOT_FOUND")


async def test_a_task_runs_to_success_with_a_video(target: Target) -> None:
    task_id = await submit(target, body())
    seen = await poll_until_finished(target, task_id)
    final = seen[-1]
    assert final.task.task_id == task_id
    assert final.task.status is TaskStatus.SUCCEED
    assert final.task.progress_percent == 100
    assert final.videos and final.videos[0].video_url.startswith(("http://", "https://"))
    assert final.videos[0].video_url_ttl > 0
    statuses = [r.task.status for r in seen]
    assert set(statuses) <= {TaskStatus.QUEUED, TaskStatus.PROCESSING, TaskStatus.SUCCEED}
    progress = [r.task.progress_percent for r in seen]
    assert progress == sorted(progress), "progress never goes back"
    debug = final.extra.debug_info
    assert debug is not None and debug.submit_time_ms is not None and debug.complete_time_ms is not None
    assert debug.submit_time_ms <= debug.complete_time_ms


def mp4_boxes(data: bytes) -> list[tuple[bytes, int]]:
    """The top-level ISO BMFF boxes of an MP4 (type, size); fails unless they tile the file exactly."""
    boxes, position = [], 0
    while position < len(data):
        size = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if size == 1:
            size = int.from_bytes(data[position + 8 : position + 16], "big")
        assert size >= 8, f"box {kind!r} at {position} has size {size}"
        boxes.append((kind, size))
        position += size
    assert position == len(data), "the boxes tile the file"
    return boxes


async def test_the_video_url_serves_an_mp4(target: Target) -> None:
    task_id = await submit(target, body())
    video = (await poll_until_finished(target, task_id))[-1].videos[0]
    async with httpx.AsyncClient(transport=target.api._transport, timeout=60) as anyone:  # no credentials
        response = await anyone.get(video.video_url)
    assert response.status_code == 200
    boxes = mp4_boxes(response.content)
    assert boxes[0][0] == b"ftyp"
    assert {b"moov", b"mdat"} <= {kind for kind, _ in boxes}


@pytest.mark.mock_only
async def test_a_task_forced_to_fail_ends_failed_with_a_reason(target: Target) -> None:
    control = mock_control(target)
    forced = {"outcomes": [{"outcome": "fail", "prompt_contains": "[doomed]", "reason": "content policy"}]}
    (await control.post("/_mock/faults", json=forced)).raise_for_status()
    task_id = await submit(target, body(prompt="a [doomed] boat"))
    final = (await poll_until_finished(target, task_id))[-1]
    assert final.task.status is TaskStatus.FAILED
    assert final.task.reason == "content policy"
    assert final.videos == []


@pytest.mark.mock_only
async def test_a_task_passes_through_queued_and_processing_with_rising_progress(target: Target) -> None:
    control = mock_control(target)
    config = {
        "queue_seconds": {"default": 20, "flex": 20},
        "render_seconds": {"default": 200, "flex": 200},
        "jitter": 0,
    }
    (await control.post("/_mock/config", json=config)).raise_for_status()
    task_id = await submit(target, body())
    seen = await poll_until_finished(target, task_id)
    statuses = [r.task.status for r in seen]
    assert statuses[0] is TaskStatus.QUEUED
    assert TaskStatus.PROCESSING in statuses
    middle = [r.task.progress_percent for r in seen if r.task.status is TaskStatus.PROCESSING]
    assert len(set(middle)) > 1 and middle == sorted(middle)


@pytest.mark.mock_only
async def test_over_the_rate_quota_submits_get_429_with_retry_after(target: Target) -> None:
    control = mock_control(target)
    config = {"quotas": {"default": {"rpm": 2}, "flex": {}}, "model_rpm": None}
    (await control.post("/_mock/config", json=config)).raise_for_status()
    await submit(target, body())
    await submit(target, body())
    response = await target.api.post(SUBMIT_PATH, json=body())
    error = assert_error(response, 429, "RATE_LIMIT_EXCEEDED")
    assert "rate limit" in error.message
    assert float(response.headers["Retry-After"]) > 0
    await submit(target, body(service_tier="flex"))  # the other tier has its own quota


async def status_of(target: Target, task_id: str) -> TaskStatus:
    response = await target.api.get(TASK_RESULT_PATH, params={"task_id": task_id})
    return TaskResult.model_validate_json(response.content).task.status


async def mock_tasks(target: Target) -> dict[str, dict[str, Any]]:
    tasks = (await mock_control(target).get("/_mock/tasks")).json()["tasks"]
    return {t["task_id"]: t for t in tasks}


async def advance(target: Target, seconds: float) -> None:
    (await mock_control(target).post("/_mock/advance", json={"seconds": seconds})).raise_for_status()


@pytest.mark.mock_only
async def test_past_the_running_limit_submits_wait_queued_in_order(target: Target) -> None:
    control = mock_control(target)
    config = {
        "quotas": {"default": {"concurrency": 2}},
        "time_scale": 1.0,
        "jitter": 0,
        "queue_seconds": {"default": 0},
    }
    (await control.post("/_mock/config", json=config)).raise_for_status()
    ids = [await submit(target, body()) for _ in range(4)]  # each renders 28.8 s (4 s at 480p)
    assert [await status_of(target, i) for i in ids] == [
        TaskStatus.PROCESSING,
        TaskStatus.PROCESSING,
        TaskStatus.QUEUED,
        TaskStatus.QUEUED,
    ]
    await advance(target, 29)
    assert [await status_of(target, i) for i in ids] == [
        TaskStatus.SUCCEED,
        TaskStatus.SUCCEED,
        TaskStatus.PROCESSING,
        TaskStatus.PROCESSING,
    ]
    tasks = await mock_tasks(target)
    first, third = tasks[ids[0]], tasks[ids[2]]
    assert third["started_at"] == first["finished_at"], "a queued task starts when a slot frees"
    assert third["queued_seconds"] == pytest.approx(28.8, abs=0.05)
    assert first["queued_seconds"] == pytest.approx(0, abs=0.05)
    await advance(target, 29)
    assert {await status_of(target, i) for i in ids} == {TaskStatus.SUCCEED}


@pytest.mark.mock_only
async def test_past_the_queue_cap_submits_get_429_until_a_task_starts(target: Target) -> None:
    control = mock_control(target)
    config = {
        "quotas": {"default": {"concurrency": 1, "max_queued": 2}},
        "time_scale": 1.0,
        "jitter": 0,
        "queue_seconds": {"default": 0},
    }
    (await control.post("/_mock/config", json=config)).raise_for_status()
    for _ in range(3):  # one running, two waiting
        await submit(target, body())
    response = await target.api.post(SUBMIT_PATH, json=body())
    error = assert_error(response, 429, "RATE_LIMIT_EXCEEDED")
    assert "queue is full" in error.message
    assert float(response.headers["Retry-After"]) == pytest.approx(29, abs=1)
    await submit(target, body(service_tier="flex"))  # the other tier has its own queue
    await advance(target, 29)  # the first finishes, the second starts: one place frees in the queue
    await submit(target, body())
    assert_error(await target.api.post(SUBMIT_PATH, json=body()), 429, "RATE_LIMIT_EXCEEDED")


@pytest.mark.mock_only
async def test_with_no_queue_a_submit_is_accepted_only_while_a_slot_is_free(target: Target) -> None:
    control = mock_control(target)
    config = {
        "quotas": {"default": {"concurrency": 2, "max_queued": 0}},
        "time_scale": 1.0,
        "jitter": 0,
        "queue_seconds": {"default": 0},
    }
    (await control.post("/_mock/config", json=config)).raise_for_status()
    await submit(target, body())
    await submit(target, body())
    assert_error(await target.api.post(SUBMIT_PATH, json=body()), 429, "RATE_LIMIT_EXCEEDED")
    await advance(target, 29)
    await submit(target, body())


@pytest.mark.mock_only
async def test_a_queued_task_past_its_window_expires_without_running(target: Target) -> None:
    control = mock_control(target)
    config = {"quotas": {"default": {"concurrency": 1}}, "time_scale": 1.0, "queue_seconds": {"default": 0}}
    (await control.post("/_mock/config", json=config)).raise_for_status()
    forced = {"outcomes": [{"outcome": "hang", "prompt_contains": "[forever]"}]}
    (await control.post("/_mock/faults", json=forced)).raise_for_status()
    hog = await submit(target, body(prompt="[forever] boat", execution_expires_after=7200))
    waiting = await submit(target, body(execution_expires_after=3600))
    assert await status_of(target, waiting) is TaskStatus.QUEUED
    await advance(target, 3601)
    response = await target.api.get(TASK_RESULT_PATH, params={"task_id": waiting})
    task = TaskResult.model_validate_json(response.content).task
    assert task.status is TaskStatus.FAILED and "expired" in task.reason
    assert (await mock_tasks(target))[waiting]["started_at"] is None, "it never ran"
    assert await status_of(target, hog) is TaskStatus.PROCESSING


@pytest.mark.mock_only
async def test_the_config_merges_deeply(target: Target) -> None:
    control = mock_control(target)
    (await control.post("/_mock/config", json={"quotas": {"default": {"concurrency": 3}}})).raise_for_status()
    quotas = (await control.get("/_mock/config")).json()["quotas"]
    assert quotas["default"] == {"rpm": 600, "concurrency": 3, "max_queued": 120, "daily_tokens": None}
    assert quotas["flex"]["daily_tokens"] == 500_000_000_000


@pytest.mark.mock_only
async def test_over_the_flex_daily_token_budget_submits_get_429_until_the_next_day(target: Target) -> None:
    control = mock_control(target)
    config = {"quotas": {"default": {}, "flex": {"daily_tokens": 100_000}}}
    (await control.post("/_mock/config", json=config)).raise_for_status()
    await submit(target, body(service_tier="flex"))  # 480p 4 s: 40,594 tokens
    await submit(target, body(service_tier="flex"))
    response = await target.api.post(SUBMIT_PATH, json=body(service_tier="flex"))
    error = assert_error(response, 429, "RATE_LIMIT_EXCEEDED")
    assert "daily" in error.message
    await submit(target, body())  # default has no token budget
    (await control.post("/_mock/advance", json={"seconds": 86400})).raise_for_status()
    await submit(target, body(service_tier="flex"))


@pytest.mark.mock_only
async def test_an_unfinished_task_past_its_window_ends_failed_as_expired(target: Target) -> None:
    control = mock_control(target)
    forced = {"outcomes": [{"outcome": "hang", "prompt_contains": "[slow]"}]}
    (await control.post("/_mock/faults", json=forced)).raise_for_status()
    task_id = await submit(target, body(prompt="[slow] boat", execution_expires_after=3600))
    response = await target.api.get(TASK_RESULT_PATH, params={"task_id": task_id})
    assert TaskResult.model_validate_json(response.content).task.status is not TaskStatus.FAILED
    (await control.post("/_mock/advance", json={"seconds": 3600})).raise_for_status()
    final = (await poll_until_finished(target, task_id))[-1]
    assert final.task.status is TaskStatus.FAILED
    assert "expired" in final.task.reason

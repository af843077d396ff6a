"""The mock's own test surface: fault injection, forced outcomes, the journal, reset, determinism.
Mock-only by nature; each test runs in-process and over a socket."""

from __future__ import annotations

import json

import httpx
import pytest

from contracts.api import SUBMIT_PATH, TASK_RESULT_PATH, TaskResult, TaskStatus
from mock_server import MockConfig, create_app
from mock_server.testing import InProcessTransport
from tests.contract.conftest import mock_control
from tests.contract.targets import Target
from tests.contract.test_api_contract import assert_error, body, mp4_boxes, poll_until_finished, submit

pytestmark = pytest.mark.mock_only


async def set_faults(target: Target, **faults: object) -> None:
    (await mock_control(target).post("/_mock/faults", json=faults)).raise_for_status()


@pytest.mark.parametrize(
    ("status", "reason"),
    [("500", "INTERNAL_SERVER_ERROR"), ("503", "SERVICE_NOT_AVAILABLE"), ("429", "RATE_LIMIT_EXCEEDED")],
)
async def test_an_injected_status_answers_with_the_flat_error_body(target: Target, status: str, reason: str) -> None:
    await set_faults(target, status_rates={status: 1.0}, retry_after=2)
    response = await target.api.post(SUBMIT_PATH, json=body())
    assert_error(response, int(status), reason)
    if status == "429":
        assert response.headers["Retry-After"] == "2"
    tasks = (await mock_control(target).get("/_mock/tasks")).json()
    assert tasks["count"] == 0, "an injected error creates no task"


async def test_the_5xx_shorthand_spreads_over_the_server_errors(target: Target) -> None:
    await set_faults(target, status_rates={"5xx": 1.0})
    seen = {(await target.api.post(SUBMIT_PATH, json=body())).status_code for _ in range(40)}
    assert seen <= {500, 502, 503, 504} and len(seen) >= 3


async def test_faults_apply_only_to_the_endpoints_named(target: Target) -> None:
    task_id = await submit(target, body())
    await set_faults(target, status_rates={"503": 1.0}, endpoints=["submit"])
    assert (await target.api.get(TASK_RESULT_PATH, params={"task_id": task_id})).status_code == 200
    assert (await target.api.post(SUBMIT_PATH, json=body())).status_code == 503


async def test_a_connection_reset_surfaces_as_a_protocol_error(target: Target) -> None:
    await set_faults(target, reset_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        await target.api.post(SUBMIT_PATH, json=body())
    journal = (await mock_control(target).get("/_mock/requests")).json()["requests"]
    assert journal[-1]["fault"] == "reset"


async def test_a_timeout_fault_makes_the_client_time_out(target: Target) -> None:
    await set_faults(target, timeout_rate=1.0, timeout_seconds=5)
    with pytest.raises(httpx.ReadTimeout):
        await target.api.post(SUBMIT_PATH, json=body(), timeout=0.2)


async def test_a_timeout_fault_answers_504_to_a_patient_client(target: Target) -> None:
    await set_faults(target, timeout_rate=1.0, timeout_seconds=0.05)
    assert_error(await target.api.post(SUBMIT_PATH, json=body()), 504, "GATEWAY_TIMEOUT")


async def test_a_malformed_answer_is_not_json_but_the_task_exists(target: Target) -> None:
    await set_faults(target, malformed_rate=1.0, endpoints=["submit"])
    response = await target.api.post(SUBMIT_PATH, json=body())
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)
    tasks = (await mock_control(target).get("/_mock/tasks")).json()
    assert tasks["count"] == 1, "the work was done; only the answer was lost"


async def test_added_latency_delays_every_answer(target: Target) -> None:
    await set_faults(target, latency_ms=300)
    with pytest.raises(httpx.ReadTimeout):
        await target.api.post(SUBMIT_PATH, json=body(), timeout=0.1)


async def test_an_auth_fault_answers_every_request_until_cleared(target: Target) -> None:
    await set_faults(target, auth={"status": 403, "reason": "NOT_ENOUGH_BALANCE", "message": "top up"})
    assert_error(await target.api.post(SUBMIT_PATH, json=body()), 403, "NOT_ENOUGH_BALANCE")
    await set_faults(target)
    await submit(target, body())


async def test_forced_outcomes_apply_to_the_next_n_tasks(target: Target) -> None:
    await set_faults(target, outcomes=[{"outcome": "fail", "count": 2, "reason": "forced"}])
    ids = [await submit(target, body()) for _ in range(3)]
    finals = [(await poll_until_finished(target, task_id))[-1].task for task_id in ids]
    assert [t.status for t in finals] == [TaskStatus.FAILED, TaskStatus.FAILED, TaskStatus.SUCCEED]
    assert finals[0].reason == "forced"


async def test_the_journal_lists_requests_and_tasks_with_poll_counts(target: Target) -> None:
    control = mock_control(target)
    task_id = await submit(target, body(service_tier="flex", prompt="journal me"))
    await target.api.get(TASK_RESULT_PATH, params={"task_id": task_id})
    await target.api.get(TASK_RESULT_PATH, params={"task_id": task_id})
    await target.api.get(TASK_RESULT_PATH, params={"task_id": "nope"})
    requests = (await control.get("/_mock/requests")).json()["requests"]
    assert [(r["method"], r["endpoint"], r["status"]) for r in requests] == [
        ("POST", "submit", 200),
        ("GET", "task-result", 200),
        ("GET", "task-result", 200),
        ("GET", "task-result", 404),
    ]
    assert all(r["time"].endswith("Z") for r in requests)
    (task,) = (await control.get("/_mock/tasks")).json()["tasks"]
    assert task["task_id"] == task_id
    assert task["tier"] == "flex"
    assert task["polls"] == 2
    assert task["request"]["prompt"] == "journal me"
    assert task["request"]["image"].startswith("data:image/png;base64,<"), "image payloads stay out of the journal"
    assert task["submitted_at"].endswith("Z")


async def test_reset_forgets_tasks_journal_faults_and_config(target: Target) -> None:
    control = mock_control(target)
    await submit(target, body())
    await set_faults(target, status_rates={"500": 1.0})
    (await control.post("/_mock/config", json={"failure_rate": 1.0})).raise_for_status()
    (await control.post("/_mock/reset")).raise_for_status()
    assert (await control.get("/_mock/tasks")).json()["count"] == 0
    assert (await control.get("/_mock/requests")).json()["count"] == 0
    assert (await control.get("/_mock/config")).json()["failure_rate"] == 0.0
    task_id = await submit(target, body())
    assert (await poll_until_finished(target, task_id))[-1].task.status is TaskStatus.SUCCEED


async def test_a_bad_fault_setting_is_rejected_with_400(target: Target) -> None:
    response = await mock_control(target).post("/_mock/faults", json={"status_rates": {"200": 1}})
    assert_error(response, 400, "INVALID_REQUEST_BODY")
    response = await mock_control(target).post(
        "/_mock/faults", json={"task_result": [{"answer": "status", "status": 500}]}
    )
    assert_error(response, 400, "INVALID_REQUEST_BODY")


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        ({"answer": "status", "status": 409, "reason": "CONFLICT"}, "409 CONFLICT"),
        ({"answer": "html"}, "html"),
        ({"answer": "unknown_status", "task_status": "TASK_STATUS_ON_HOLD"}, "TASK_STATUS_ON_HOLD"),
        ({"answer": "other_task"}, "other"),
    ],
    ids=["4xx", "html", "unknown-status", "other-task"],
)
async def test_task_result_answers_oddly_when_told_to_and_only_for_the_marked_tasks(
    target: Target, fault: dict[str, object], check: str
) -> None:
    plain = await submit(target, body(prompt="a plain boat"))
    marked = await submit(target, body(prompt="a boat ODD-1"))
    await mock_control(target).post("/_mock/faults", json={"task_result": [{**fault, "prompt_contains": "ODD-1"}]})
    normal = await target.api.get(TASK_RESULT_PATH, params={"task_id": plain})
    assert normal.status_code == 200 and normal.json()["task"]["task_id"] == plain
    odd = await target.api.get(TASK_RESULT_PATH, params={"task_id": marked})
    if check == "html":
        assert odd.status_code == 200 and odd.headers["content-type"].startswith("text/html")
    elif check == "other":
        assert odd.status_code == 200 and odd.json()["task"]["task_id"] == plain
    elif check.startswith("409"):
        assert_error(odd, 409, "CONFLICT")
    else:
        assert odd.json()["task"]["status"] == check


async def test_a_task_result_fault_can_cover_only_each_tasks_first_polls(target: Target) -> None:
    task_id = await submit(target, body())
    fault = {"answer": "status", "status": 404, "reason": "TASK_NOT_FOUND", "polls": 2}
    await mock_control(target).post("/_mock/faults", json={"task_result": [fault]})
    statuses = [(await target.api.get(TASK_RESULT_PATH, params={"task_id": task_id})).status_code for _ in range(3)]
    assert statuses == [404, 404, 200], "a gateway that catches up after its first polls"


async def finished_video(target: Target, **overrides: object) -> str:
    """The path of the video of a fresh task that has finished."""
    task_id = await submit(target, body(**overrides))
    video = (await poll_until_finished(target, task_id))[-1].videos[0]
    return httpx.URL(video.video_url).path


async def test_the_video_url_serves_a_video_until_its_ttl_passes(target: Target) -> None:
    control = mock_control(target)
    path = await finished_video(target)
    assert (await control.get(path)).headers["content-type"] == "video/mp4"
    ttl = 3600
    (await control.post("/_mock/config", json={"time_scale": 1.0})).raise_for_status()
    (await control.post("/_mock/advance", json={"seconds": ttl - 5})).raise_for_status()
    assert (await control.head(path)).status_code == 200, "still valid just before the TTL"
    (await control.post("/_mock/advance", json={"seconds": 10})).raise_for_status()
    assert_error(await control.get(path), 403, "ACCESS_DENY")


@pytest.mark.parametrize(
    ("duration", "resolution", "expected"),
    [(4, "480p", 4 * 1000 * 864 * 496 / (1280 * 720)), (5, "720p", 5000), (12, "1080p", 12 * 1000 * 2.25)],
)
async def test_the_video_size_follows_duration_and_resolution(
    target: Target, duration: int, resolution: str, expected: float
) -> None:
    control = mock_control(target)
    (await control.post("/_mock/config", json={"video_bytes_per_second": 1000})).raise_for_status()
    path = await finished_video(target, duration=duration, resolution=resolution)
    whole = await control.get(path)
    assert len(whole.content) == round(expected) == int(whole.headers["content-length"])
    mp4_boxes(whole.content)
    again = await control.get(path)
    assert again.content == whole.content, "the same bytes every time"
    other = await control.get(await finished_video(target, duration=duration, resolution=resolution))
    assert other.content != whole.content, "each task its own video"


async def test_head_and_range_requests_are_answered_like_a_file_server(target: Target) -> None:
    control = mock_control(target)
    path = await finished_video(target)
    whole = (await control.get(path)).content
    size = len(whole)
    head = await control.head(path)
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", str(size))
    assert head.headers["accept-ranges"] == "bytes"
    for wanted, (start, end) in {
        "bytes=0-99": (0, 100),
        f"bytes=100-{size - 1}": (100, size),
        "bytes=1000-": (1000, size),
        "bytes=-500": (size - 500, size),
        f"bytes=10-{size + 50}": (10, size),
    }.items():
        part = await control.get(path, headers={"Range": wanted})
        assert part.status_code == 206, wanted
        assert part.content == whole[start:end], wanted
        assert part.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
    refused = await control.get(path, headers={"Range": f"bytes={size}-"})
    assert refused.status_code == 416
    assert refused.headers["content-range"] == f"bytes */{size}"


async def test_a_large_video_is_served_without_the_mock_holding_it(target: Target) -> None:
    control = mock_control(target)
    (await control.post("/_mock/config", json={"video_bytes_per_second": 40_000_000})).raise_for_status()
    path = await finished_video(target, duration=5, resolution="720p")
    head = await control.head(path)
    assert int(head.headers["content-length"]) == 200_000_000
    tail = await control.get(path, headers={"Range": "bytes=-16"})
    assert len(tail.content) == 16
    assert tail.content == (await control.get(path, headers={"Range": "bytes=199999984-199999999"})).content


async def test_the_video_of_an_unfinished_or_unknown_task_is_404(target: Target) -> None:
    control = mock_control(target)
    assert_error(await control.get("/_mock/videos/no-such-task.mp4"), 404, "NOT_FOUND")
    (await control.post("/_mock/faults", json={"outcomes": [{"outcome": "hang", "count": 1}]})).raise_for_status()
    task_id = await submit(target, body())
    assert_error(await control.get(f"/_mock/videos/{task_id}.mp4"), 404, "NOT_FOUND")


async def test_faults_can_hit_video_downloads_too(target: Target) -> None:
    control = mock_control(target)
    path = await finished_video(target)
    await set_faults(target, status_rates={"503": 1.0}, endpoints=["video"])
    assert (await control.get(path)).status_code == 503
    assert (await target.api.post(SUBMIT_PATH, json=body())).status_code == 200, "the API is not hit"
    journal = (await control.get("/_mock/requests")).json()["requests"]
    assert [(r["endpoint"], r["status"]) for r in journal if r["endpoint"] == "video"][-1] == ("video", 503)


async def test_the_committed_openapi_document_is_served(target: Target) -> None:
    served = (await mock_control(target).get("/openapi.json")).json()
    assert SUBMIT_PATH in served["paths"] and TASK_RESULT_PATH in served["paths"]


async def test_the_same_seed_gives_the_same_task_ids_and_timings() -> None:
    async def run() -> list[tuple[str, str]]:
        app = create_app(MockConfig(time_scale=0.001), seed=42)
        async with httpx.AsyncClient(
            transport=InProcessTransport(app), base_url="http://m", headers={"Authorization": "Bearer k"}
        ) as client:
            for _ in range(5):
                (await client.post(SUBMIT_PATH, json=body())).raise_for_status()
        return [(t.task_id, f"{t.render_s:.9f}") for t in app.state.tasks.values()]

    first, second = await run(), await run()
    assert first == second
    assert len({task_id for task_id, _ in first}) == 5


async def test_ttl_is_sent_as_an_int_when_configured(target: Target) -> None:
    (await mock_control(target).post("/_mock/config", json={"ttl_as_string": False})).raise_for_status()
    task_id = await submit(target, body())
    await poll_until_finished(target, task_id)
    raw = (await target.api.get(TASK_RESULT_PATH, params={"task_id": task_id})).json()
    assert raw["videos"][0]["video_url_ttl"] == 3600
    assert TaskResult.model_validate(raw).videos[0].video_url_ttl == 3600

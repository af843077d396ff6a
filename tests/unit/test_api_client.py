"""Every way the API can answer, mapped onto the worker's errors; against the mock in-process."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry

from contracts.api import SubmitRequest, TaskStatus
from mock_server import MockConfig, create_app
from mock_server.app import MockApp
from mock_server.testing import InProcessTransport
from worker.api_client import ApiClient, error_from_response, parse_retry_after
from worker.errors import (
    AnswerLost,
    ConfigurationFault,
    PermanentApiError,
    RateLimited,
    ResultRefused,
    TransientApiError,
)
from worker.metrics import Metrics

REQUEST = SubmitRequest(image="https://example.com/a.png", prompt="boat")


@pytest.fixture
def app() -> MockApp:
    return create_app(MockConfig(api_key="right", time_scale=0.001), seed=5)


@pytest.fixture
def client(app: MockApp) -> httpx.AsyncBaseTransport:
    return InProcessTransport(app)


def api(
    transport: httpx.AsyncBaseTransport, key: str | None = "right", base_url: str = "http://mock"
) -> tuple[ApiClient, Metrics]:
    metrics = Metrics(CollectorRegistry())
    client = httpx.AsyncClient(transport=transport, timeout=1.0)
    return ApiClient(client, base_url, lambda: key, metrics, total_seconds=2.0), metrics


def fault(app: MockApp, **faults: object) -> None:
    from mock_server import Faults  # noqa: PLC0415

    app.state.set_faults(Faults.model_validate(faults))


async def test_a_submit_returns_the_task_id_and_is_counted(client: httpx.AsyncBaseTransport, app: MockApp) -> None:
    caller, metrics = api(client)
    task_id = await caller.submit(REQUEST)
    assert task_id in app.state.tasks
    assert metrics.api_requests.labels("submit", "200")._value.get() == 1
    result = await caller.task_result(task_id)
    assert result.task.task_id == task_id


@pytest.mark.parametrize(("key", "status"), [(None, None), ("wrong", 403)])
async def test_a_missing_or_wrong_key_is_a_configuration_fault(
    client: httpx.AsyncBaseTransport, key: str | None, status: int | None
) -> None:
    caller, _ = api(client, key)
    with pytest.raises(ConfigurationFault) as caught:
        await caller.submit(REQUEST)
    assert caught.value.status == status
    assert "wrong" not in str(caught.value), "the key never appears in an error"


async def test_an_account_fault_is_a_configuration_fault(client: httpx.AsyncBaseTransport, app: MockApp) -> None:
    fault(app, auth={"status": 403, "reason": "NOT_ENOUGH_BALANCE", "message": "top up"})
    with pytest.raises(ConfigurationFault, match="NOT_ENOUGH_BALANCE"):
        await api(client)[0].task_result("x")


async def test_a_missing_model_is_a_configuration_fault(app: MockApp) -> None:
    async with httpx.AsyncClient(transport=InProcessTransport(app)) as http:
        response = await http.post(
            "http://mock/v3/async/seedance-v9", json={}, headers={"Authorization": "Bearer right"}
        )
    error = error_from_response("submit", response)
    assert isinstance(error, ConfigurationFault)
    assert error.reason == "MODEL_NOT_FOUND"


async def test_an_unknown_task_is_a_refused_result_with_the_apis_reason(client: httpx.AsyncBaseTransport) -> None:
    with pytest.raises(ResultRefused) as caught:
        await api(client)[0].task_result("no-such-task")
    assert (caught.value.status, caught.value.reason) == (404, "TASK_NOT_FOUND")


@pytest.mark.parametrize("status", [400, 404, 409, 422, 418])
async def test_any_4xx_of_task_result_but_auth_and_429_is_a_refused_result(
    client: httpx.AsyncBaseTransport, app: MockApp, status: int
) -> None:
    caller, _ = api(client)
    task_id = await caller.submit(REQUEST)
    fault(app, task_result=[{"answer": "status", "status": status, "reason": "SOME_REASON"}])
    with pytest.raises(ResultRefused) as caught:
        await caller.task_result(task_id)
    assert (caught.value.status, caught.value.reason) == (status, "SOME_REASON")


async def test_a_result_that_names_another_task_is_never_used(client: httpx.AsyncBaseTransport, app: MockApp) -> None:
    caller, _ = api(client)
    mine, other = await caller.submit(REQUEST), await caller.submit(REQUEST)
    fault(app, task_result=[{"answer": "other_task"}])
    with pytest.raises(AnswerLost) as caught:
        await caller.task_result(mine)
    assert caught.value.reason == "wrong_task"
    assert other in app.state.tasks


async def test_a_maintenance_page_with_200_is_a_transient_answer(
    client: httpx.AsyncBaseTransport, app: MockApp
) -> None:
    caller, _ = api(client)
    task_id = await caller.submit(REQUEST)
    fault(app, task_result=[{"answer": "html"}])
    with pytest.raises(TransientApiError) as caught:
        await caller.task_result(task_id)
    assert caught.value.reason == "malformed"


async def test_an_unknown_task_status_reads_as_unknown(client: httpx.AsyncBaseTransport, app: MockApp) -> None:
    caller, _ = api(client)
    task_id = await caller.submit(REQUEST)
    fault(app, task_result=[{"answer": "unknown_status", "task_status": "TASK_STATUS_PAUSED_FOR_REVIEW"}])
    result = await caller.task_result(task_id)
    assert result.task.status is TaskStatus.UNKNOWN and not result.task.status.finished


async def test_a_400_is_permanent_and_carries_the_apis_message(client: httpx.AsyncBaseTransport, app: MockApp) -> None:
    fault(app, status_rates={"400": 1.0})
    with pytest.raises(PermanentApiError) as caught:
        await api(client)[0].submit(REQUEST)
    assert caught.value.status == 400
    assert caught.value.reason == "INVALID_REQUEST_BODY"
    assert "injected 400" in caught.value.message


async def test_a_429_is_rate_limited_with_its_retry_after(client: httpx.AsyncBaseTransport, app: MockApp) -> None:
    fault(app, status_rates={"429": 1.0}, retry_after=7)
    with pytest.raises(RateLimited) as caught:
        await api(client)[0].submit(REQUEST)
    assert caught.value.retry_after == 7


@pytest.mark.parametrize(
    ("faults", "label"),
    [
        ({"status_rates": {"500": 1.0}}, "500"),
        ({"status_rates": {"503": 1.0}}, "503"),
        ({"reset_rate": 1.0}, "transport"),
        ({"timeout_rate": 1.0, "timeout_seconds": 5}, "timeout"),
        ({"malformed_rate": 1.0}, "malformed"),
    ],
)
async def test_server_and_transport_faults_are_transient(
    client: httpx.AsyncBaseTransport, app: MockApp, faults: dict[str, object], label: str
) -> None:
    fault(app, **faults)
    caller, metrics = api(client)
    with pytest.raises(TransientApiError) as caught:
        await caller.submit(REQUEST)
    assert caught.value.label == label
    assert sum(s.value for m in metrics.api_requests.metric.collect() for s in m.samples) == 1


async def test_the_access_check_passes_on_a_good_key_and_fails_on_a_bad_one(
    client: httpx.AsyncBaseTransport, app: MockApp
) -> None:
    await api(client)[0].check_access()
    with pytest.raises(ConfigurationFault):
        await api(client, "wrong")[0].check_access()
    probes = [(e.endpoint, e.status) for e in app.state.journal]
    assert probes == [("task-result", 404), ("task-result", 403)], "a free task-result, never a submit"
    assert app.state.tasks == {}


async def test_after_a_missing_model_the_access_check_asks_for_the_model_too(app: MockApp) -> None:
    caller, _ = api(InProcessTransport(app), base_url="http://mock")
    caller._submit_url = httpx.URL("http://mock/v3/async/seedance-v9")  # a model the API does not have
    with pytest.raises(ConfigurationFault):
        await caller.submit(REQUEST)
    with pytest.raises(ConfigurationFault, match="MODEL_NOT_FOUND"):
        await caller.check_access()


def test_retry_after_reads_seconds_decimals_and_http_dates() -> None:
    assert parse_retry_after("120") == 120
    assert parse_retry_after("0.250") == 0.25
    assert parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT", now=1792567650.0) == pytest.approx(30.0)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


async def test_the_mock_mounts_under_respx_at_the_real_base_url() -> None:
    import respx  # noqa: PLC0415

    from mock_server.testing import mount_respx  # noqa: PLC0415
    from worker.settings import Settings  # noqa: PLC0415

    app = create_app(MockConfig(api_key="right", time_scale=0.001), seed=9)
    base = Settings().api_base_url
    with respx.mock(assert_all_called=True) as router:
        route = mount_respx(router, app, base)
        caller, _ = api(httpx.AsyncHTTPTransport(), base_url=base)  # respx patches the transport
        task_id = await caller.submit(REQUEST)
        assert (await caller.task_result(task_id)).task.task_id == task_id
        await caller.aclose()
    assert route.call_count == 2
    assert [r.endpoint for r in app.state.journal] == ["submit", "task-result"]


async def test_the_key_is_read_once_and_again_at_each_access_check(client: httpx.AsyncBaseTransport) -> None:
    reads: list[str] = []

    def key() -> str:
        reads.append("read")
        return "right"

    caller = ApiClient(httpx.AsyncClient(transport=client), "http://mock", key, Metrics(CollectorRegistry()))
    task_id = await caller.submit(REQUEST)
    for _ in range(5):
        await caller.task_result(task_id)
    assert len(reads) == 1, "no file read per request"
    await caller.check_access()
    assert len(reads) == 2, "a rotated key file is read at the check that follows a refusal"

"""The API client over a real socket to the mock, on both transports SEEDANCE_HTTP_TRANSPORT offers (httpx's
own, the default, and aiohttp's through httpx-aiohttp): every fault the mock can inject maps onto the same
worker error either way."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from contracts.api import SubmitRequest
from mock_server import Faults
from tests.servers import MockThread, free_port, start_mock_thread
from worker.api_client import ApiClient
from worker.errors import (
    AnswerLost,
    ApiError,
    ConfigurationFault,
    PermanentApiError,
    RateLimited,
    ResultRefused,
    TransientApiError,
)
from worker.http_clients import Transport, http_client, timeouts
from worker.metrics import Metrics

pytestmark = [pytest.mark.server, pytest.mark.both_loops]  # the worker runs on uvloop


REQUEST = SubmitRequest(image="https://example.com/a.png", prompt="boat")


@pytest.fixture(scope="module")
def server() -> Iterator[MockThread]:
    mock = start_mock_thread(time_scale=0.001, api_key="key", seed=9)
    yield mock
    mock.stop()


@dataclass
class Client:
    http: httpx.AsyncClient
    base_url: str


@pytest.fixture
async def client(transport_kind: Transport, server: MockThread) -> AsyncIterator[Client]:
    server.app.state.reset()
    async with http_client(transport_kind, timeouts(0.5)) as http:
        yield Client(http, server.url)


def api(client: Client, key: str = "key") -> ApiClient:
    """The API client as the worker builds it, over `client`'s transport."""
    return ApiClient(client.http, client.base_url, lambda: key, Metrics(CollectorRegistry()), total_seconds=5)


def faults(server: MockThread, **values: Any) -> None:
    server.app.state.set_faults(Faults.model_validate(values))


async def test_a_submit_and_a_poll_go_through(client: Client, server: MockThread) -> None:
    caller = api(client)
    task_id = await caller.submit(REQUEST)
    assert (await caller.task_result(task_id)).task.task_id == task_id
    (entry,) = [e for e in server.app.state.journal if e.endpoint == "submit"]
    assert entry.status == 200


@pytest.mark.parametrize(
    ("injected", "expected", "reason"),
    [
        ({"timeout_rate": 1.0, "timeout_seconds": 2}, AnswerLost, "timeout"),
        ({"reset_rate": 1.0}, AnswerLost, "transport"),
        ({"malformed_rate": 1.0}, AnswerLost, "malformed"),
        ({"status_rates": {"503": 1.0}}, TransientApiError, "SERVICE_NOT_AVAILABLE"),
        ({"status_rates": {"429": 1.0}, "retry_after": 7}, RateLimited, "RATE_LIMIT_EXCEEDED"),
        ({"status_rates": {"400": 1.0}}, PermanentApiError, "INVALID_REQUEST_BODY"),
        ({"auth": {"status": 403, "reason": "NOT_ENOUGH_BALANCE"}}, ConfigurationFault, "NOT_ENOUGH_BALANCE"),
    ],
    ids=["timeout", "reset", "garbled", "503", "429", "400", "403"],
)
async def test_each_fault_maps_onto_the_same_error_on_both_transports(
    client: Client, server: MockThread, injected: dict[str, Any], expected: type[ApiError], reason: str
) -> None:
    faults(server, endpoints=["submit"], **injected)
    with pytest.raises(ApiError) as caught:
        await api(client).submit(REQUEST)
    assert type(caught.value) is expected
    assert caught.value.reason == reason
    if expected is RateLimited:
        assert caught.value.retry_after == 7


async def test_an_unknown_task_is_a_refused_result(client: Client) -> None:
    with pytest.raises(ResultRefused):
        await api(client).task_result("no-such-task")


async def test_a_refused_connection_is_a_request_never_sent(transport_kind: Transport) -> None:
    async with http_client(transport_kind, timeouts(0.5)) as http:
        with pytest.raises(TransientApiError) as refused:
            await api(Client(http, f"http://127.0.0.1:{free_port()}")).submit(REQUEST)
    assert type(refused.value) is TransientApiError, "not AnswerLost: the API never saw it"
    assert refused.value.reason == "transport"

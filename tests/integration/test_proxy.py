"""API calls and video downloads through a real forward proxy on loopback (tinyproxy): HTTP_PROXY for an
http:// base URL (absolute-form requests), HTTPS_PROXY for an https:// one (CONNECT, certificates from
trustme), ALL_PROXY, and NO_PROXY excluding a host; on both transports, and for a worker process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from prometheus_client import CollectorRegistry

from contracts.api import SUBMIT_PATH, TASK_RESULT_PATH, SubmitRequest
from tests.integration.conftest import MOCK_KEY, Bus, Mock, job, wait_for, wait_ready
from tests.servers import ForwardProxy, MockThread, free_port, start_forward_proxy, start_mock_thread
from worker.api_client import ApiClient
from worker.errors import TransientApiError
from worker.http_clients import Transport, http_client, timeouts
from worker.metrics import Metrics

pytestmark = pytest.mark.server

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
REQUEST = SubmitRequest(image="https://example.com/a.png", prompt="a boat behind a proxy")


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the proxy variables it means; none leak in from the shell."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ForwardProxy]:
    started = start_forward_proxy(str(tmp_path))
    yield started
    started.stop()


@pytest.fixture
def mock_http() -> Iterator[MockThread]:
    server = start_mock_thread(api_key=MOCK_KEY)
    yield server
    server.stop()


@pytest.fixture
def mock_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MockThread]:
    """The mock over TLS with a certificate of a test CA, which the clients trust through SSL_CERT_FILE."""
    ca = trustme.CA()
    served = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(served))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    server = start_mock_thread(api_key=MOCK_KEY, tls=(str(served), str(served)))
    yield server
    server.stop()


@pytest.fixture
def transport(transport_kind: Transport) -> Transport:
    return transport_kind


async def submit_and_poll(transport: Transport, base_url: str) -> None:
    """A submit and a poll as the worker makes them, with a client built from the environment as it is now."""
    api = ApiClient(
        http_client(transport, timeouts(10)), base_url, lambda: MOCK_KEY, Metrics(CollectorRegistry()), total_seconds=20
    )
    try:
        task_id = await api.submit(REQUEST)
        assert (await api.task_result(task_id)).task.task_id == task_id
    finally:
        await api.aclose()


def hostport(url: str) -> str:
    return url.split("://", 1)[1]


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY"])
async def test_an_http_base_url_goes_through_http_proxy_or_all_proxy(
    transport: Transport, proxy: ForwardProxy, mock_http: MockThread, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, proxy.url)
    await submit_and_poll(transport, mock_http.url)
    where = hostport(mock_http.url)
    await wait_for(lambda: f"POST http://{where}{SUBMIT_PATH}" in proxy.log(), what="the submit in the proxy's log")
    await wait_for(lambda: f"GET http://{where}{TASK_RESULT_PATH}" in proxy.log(), what="the poll in the proxy's log")


async def test_an_https_base_url_is_tunnelled_through_https_proxy(
    transport: Transport, proxy: ForwardProxy, mock_https: MockThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    await submit_and_poll(transport, mock_https.url)
    await wait_for(lambda: f"CONNECT {hostport(mock_https.url)}" in proxy.log(), what="the tunnel in the proxy's log")
    assert SUBMIT_PATH not in proxy.log(), "the proxy saw only the tunnel, never the request"


async def test_no_proxy_excludes_a_host_and_only_that_host(
    transport: Transport, mock_http: MockThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(TransientApiError) as caught:
        await submit_and_poll(transport, mock_http.url)
    assert type(caught.value) is TransientApiError, "a proxy that cannot be reached: never sent, safe to retry"
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    await submit_and_poll(transport, mock_http.url)


@pytest.mark.broker
async def test_a_worker_reaches_the_api_and_downloads_the_video_through_the_proxy(
    spawn_worker, bus: Bus, mock: Mock, proxy: ForwardProxy, tmp_path: Path
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    env = dict.fromkeys(("HTTP_PROXY", "http_proxy"), proxy.url) | {"NO_PROXY": "", "no_proxy": ""}
    worker = spawn_worker(env=env, storage_url=f"file://{videos}")
    await asyncio.to_thread(wait_ready, worker)
    await bus.publish(job("proxied-1"))
    final = (await bus.wait_terminal(["proxied-1"]))["proxied-1"]
    assert final["status"] == "succeeded" and final["stored_video"] is not None
    where = hostport(mock.url)
    for path in (SUBMIT_PATH, TASK_RESULT_PATH, f"/_mock/videos/{final['task_id']}.mp4"):
        await wait_for(lambda p=path: f"http://{where}{p}" in proxy.log(), what=f"{path} in the proxy's log")
    assert os.path.getsize(final["stored_video"]["url"].removeprefix("file://")) == final["stored_video"]["bytes"]

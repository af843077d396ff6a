from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from mock_server import MockConfig, create_app
from mock_server.testing import InProcessTransport
from tests.contract.targets import MOCK_KEY, Target, live_settings
from tests.servers import MockProcess, start_mock


@pytest.fixture(scope="session")
def mock_process() -> Iterator[MockProcess]:
    server = start_mock(time_scale=0.001, api_key=MOCK_KEY)
    yield server
    server.stop()


@pytest.fixture(params=["inprocess", "socket", "live"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    headers = {"Authorization": f"Bearer {MOCK_KEY}"}
    if request.param == "inprocess":
        app = create_app(MockConfig(api_key=MOCK_KEY, time_scale=0.001), seed=3)
        transport = InProcessTransport(app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://mock.test", headers=headers) as api,
            httpx.AsyncClient(transport=transport, base_url="http://mock.test") as control,
        ):
            yield Target("inprocess", api, MOCK_KEY, control, poll_interval=0.01, poll_timeout=10)
        return
    if request.param == "socket":
        server: MockProcess = request.getfixturevalue("mock_process")
        async with (
            httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as api,
            httpx.AsyncClient(base_url=server.url, timeout=10) as control,
        ):
            (await control.post("/_mock/reset")).raise_for_status()
            yield Target("socket", api, MOCK_KEY, control, poll_interval=0.01, poll_timeout=10)
        return
    live = live_settings()
    if live is None:
        pytest.skip("live API target: set SEEDANCE_CONTRACT_LIVE=1 and SEEDANCE_API_KEY to run it")
    base_url, key = live
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as api:
        yield Target("live", api, key, None, poll_interval=10, poll_timeout=900)


def mock_control(target: Target) -> httpx.AsyncClient:
    """The /_mock client of a mock target; skips, saying why, on the live API."""
    if target.control is None:
        pytest.skip("mock_only: needs the bundled mock's test surface")
    return target.control

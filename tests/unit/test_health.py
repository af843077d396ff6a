"""The operators' endpoints over a real socket: the paths and answers operators rely on, and clients that
misbehave (one that sends its request a byte at a time, one whose request line never ends) harm nobody."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from worker.health import HealthServer

pytestmark = [pytest.mark.server, pytest.mark.both_loops]


@pytest.fixture
async def server() -> AsyncIterator[tuple[HealthServer, dict[str, Any]]]:
    registry = CollectorRegistry()
    Counter("seedance_example", "An example.", registry=registry).inc()
    state: dict[str, Any] = {"ready": True, "consuming": ["seedance.jobs.default"]}
    async with HealthServer(registry, lambda: dict(state), "127.0.0.1", 0) as running:
        yield running, state


async def test_the_three_paths_answer_as_before(server) -> None:
    running, state = server
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}") as http:
        assert (await http.get("/healthz")).json() == {"status": "alive"}
        ready = await http.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, state)
        state["ready"] = False
        assert (await http.get("/readyz")).status_code == 503
        metrics = await http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain") and "seedance_example_total 1.0" in metrics.text
        assert (await http.head("/metrics")).status_code == 200
        assert (await http.post("/metrics")).status_code == 405
        missing = await http.get("/nope")
        assert missing.status_code == 404 and "/metrics" in missing.text


async def test_a_client_sending_a_byte_at_a_time_holds_up_no_other(server) -> None:
    running, _ = server
    _reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    try:
        for byte in b"GET /heal":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}", timeout=2) as http:
            assert (await http.get("/healthz")).status_code == 200, "answered while the slow one still talks"
    finally:
        writer.close()


async def test_a_request_line_that_never_ends_is_refused_and_the_server_goes_on(server) -> None:
    running, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(b"GET /" + b"a" * 65536)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(200), timeout=5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 4"), answer
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}", timeout=2) as http:
        assert (await http.get("/healthz")).status_code == 200

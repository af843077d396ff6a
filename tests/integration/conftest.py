"""Integration fixtures: a fresh RabbitMQ vhost per test, the mock over a real socket, workers in-process
or as processes, and a `Bus` that publishes jobs and collects events as a producer would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
import pytest

from contracts.messages import EVENTS_EXCHANGE, JOBS_EXCHANGE, TERMINAL_STATUSES
from tests.brokers import Node, rabbitmq4_available, start_rabbitmq4
from tests.servers import MockThread, SeaweedFS, free_port, start_mock_thread, start_seaweedfs
from worker.__main__ import serve
from worker.settings import Settings
from worker.stopping import Stopping

pytestmark = [pytest.mark.broker, pytest.mark.server]

# SEEDANCE_TEST_BROKER=rabbitmq4 runs the suite on a RabbitMQ 4 node of its own (tests/brokers.py, every
# deprecated feature denied) instead of the machine's RabbitMQ on SEEDANCE_TEST_AMQP_HOST.
BROKER = os.environ.get("SEEDANCE_TEST_BROKER", "host")
AMQP_HOST = os.environ.get("SEEDANCE_TEST_AMQP_HOST", "127.0.0.1:5672")
_node: Node | None = None
MOCK_KEY = "integration-key"
# `POST /_mock/config` merges deeply: a quota is lifted by setting it to null, not by leaving it out.
NO_QUOTAS = {
    tier: {"rpm": None, "concurrency": None, "max_queued": None, "daily_tokens": None} for tier in ("default", "flex")
}
IMAGE = "https://example.com/boat.png"


def _broker_node() -> Node | None:
    global _node  # noqa: PLW0603 - one broker for the session, started on first use
    if BROKER == "rabbitmq4" and _node is None:
        if not rabbitmq4_available():
            pytest.fail("RabbitMQ 4 is not set up: run scripts/ensure-rabbitmq4.sh (make test does)")
        _node = start_rabbitmq4()
    return _node


@pytest.fixture(scope="session", autouse=True)
def _broker() -> Iterator[None]:
    yield
    if _node is not None:
        _node.stop()


def amqp_host() -> str:
    node = _broker_node()
    return f"127.0.0.1:{node.port}" if node is not None else AMQP_HOST


def rabbitmqctl(*args: str) -> str:
    node = _broker_node()
    if node is not None:
        return node.ctl(*args)
    done = subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60)
    return done.stdout


@pytest.fixture(autouse=True)
def _no_seedance_environment(clean_env: None) -> None:
    """Workers here get their settings from the test, never from the shell."""


@pytest.fixture
def vhost() -> Iterator[str]:
    """A vhost of its own, so tests never see each other's messages; the AMQP URL to it."""
    name = f"seedance-test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@{amqp_host()}/{name}"
    rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real S3-compatible server (SeaweedFS) for the whole session; tests write under prefixes of their own."""
    server = start_seaweedfs(str(tmp_path_factory.mktemp("seaweedfs")))
    yield server
    server.stop()


@pytest.fixture
def mock_server() -> Iterator[MockThread]:
    """A mock of this test's own over a real socket: nothing another test's worker does can reach it."""
    server = start_mock_thread(time_scale=0.001, api_key=MOCK_KEY, seed=23)
    yield server
    server.stop()


class Mock:
    """The mock's /_mock surface, synchronously."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def reset(self) -> None:
        self.http.post("/_mock/reset").raise_for_status()

    def faults(self, **faults: Any) -> None:
        self.http.post("/_mock/faults", json=faults).raise_for_status()

    def config(self, **config: Any) -> None:
        self.http.post("/_mock/config", json=config).raise_for_status()

    def tasks(self) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = self.http.get("/_mock/tasks").json()["tasks"]
        return tasks

    def requests(self) -> list[dict[str, Any]]:
        requests: list[dict[str, Any]] = self.http.get("/_mock/requests").json()["requests"]
        return requests

    def submits(self) -> list[dict[str, Any]]:
        return [r for r in self.requests() if r["endpoint"] == "submit"]


@pytest.fixture
def mock(mock_server: MockThread) -> Iterator[Mock]:
    client = Mock(mock_server.url)
    yield client
    client.http.close()


def worker_values(broker_url: str, mock_url: str, **overrides: Any) -> dict[str, Any]:
    """Settings for a worker that runs against the fast mock: everything scaled down a thousandfold."""
    values: dict[str, Any] = {
        "amqp_url": broker_url,
        "api_base_url": mock_url,
        "api_key": MOCK_KEY,
        "metrics_host": "127.0.0.1",
        "metrics_port": free_port(),
        "poll_scale": 0.001,
        "tracking_delays_ms": "20,50,100,200,500,1000",
        "retry_base_seconds": 0.01,
        "retry_max_seconds": 0.2,
        "auth_retry_max_seconds": 0.3,
        "progress_interval_seconds": 0,
        "in_flight_refresh_seconds": 0.1,
        "max_hold_seconds": 2,
        "drain_timeout_seconds": 5,
        "log_format": "text",
        "log_level": "INFO",
    }
    values.update(overrides)
    return values


def worker_env(broker_url: str, mock_url: str, **overrides: Any) -> dict[str, str]:
    return {f"SEEDANCE_{k.upper()}": str(v) for k, v in worker_values(broker_url, mock_url, **overrides).items()}


@dataclass
class RunningWorker:
    metrics_port: int
    stop: Callable[[], Any]
    task: asyncio.Task[None]

    async def shutdown(self) -> None:
        """Stop as on SIGTERM and wait until the worker has let go of the broker."""
        self.stop()
        await asyncio.wait_for(self.task, timeout=20)

    async def get(self, path: str) -> httpx.Response:
        # Async: the worker runs in this very event loop, a blocking call would starve it.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.metrics_port}", timeout=5) as http:
            return await http.get(path)

    async def metrics(self) -> str:
        return (await self.get("/metrics")).text

    async def readyz(self) -> httpx.Response:
        return await self.get("/readyz")

    async def sample(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics, 0 when absent."""
        from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

        for family in text_string_to_metric_families(await self.metrics()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, what: str | Callable[[], str] = "condition"
) -> None:
    """Wait until `predicate()` (sync or async) is true; `what` (or what it returns) names it on a timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = predicate()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")


@pytest.fixture
async def start_worker(vhost: str, mock: Mock) -> AsyncIterator[Callable[..., Any]]:
    """Factory: run a worker in this event loop (stopped at teardown)."""
    running: list[tuple[asyncio.Task[None], Stopping]] = []

    async def start(**overrides: Any) -> RunningWorker:
        settings = Settings(**worker_values(vhost, mock.url, **overrides))
        stopping = Stopping()
        task = asyncio.create_task(serve(settings, stopping))
        running.append((task, stopping))
        worker = RunningWorker(settings.metrics_port, stopping.set, task)

        last_answer = "no answer yet"

        async def ready() -> bool:
            nonlocal last_answer
            if task.done():
                task.result()
            try:
                response = await worker.readyz()
            except httpx.TransportError as e:
                last_answer = repr(e)
                return False
            last_answer = response.text
            return response.status_code == 200

        # A first worker in a fresh vhost is ready in about 3 s here (it declares some twenty quorum queues
        # and fills its permit pools); the bound leaves room for a loaded CI machine.
        await wait_for(ready, timeout=40, what=lambda: f"worker ready (last /readyz: {last_answer})")
        return worker

    yield start
    for _, stopping in running:
        stopping.set()
    for task, _ in running:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=15)


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    log_path: str

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@pytest.fixture
def spawn_worker(vhost: str, mock: Mock, tmp_path: Any) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: run `seedance-worker` as a real process (killed at teardown)."""
    procs: list[WorkerProcess] = []

    def spawn(env: dict[str, str] | None = None, **overrides: Any) -> WorkerProcess:
        """A worker with these settings (`storage_url=...`) and, in `env`, other variables (AWS_*)."""
        return start_worker_process(procs, tmp_path, vhost, mock.url, env, **overrides)

    yield spawn
    kill_worker_processes(procs)


def start_worker_process(
    procs: list[WorkerProcess],
    log_dir: Any,
    broker_url: str,
    mock_url: str,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> WorkerProcess:
    """`seedance-worker` as a real process, its output in `log_dir`, added to `procs`."""
    env = {**os.environ, **(env or {}), **worker_env(broker_url, mock_url, **overrides), "PYTHONUNBUFFERED": "1"}
    log_path = str(log_dir / f"worker-{len(procs)}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
    handle = WorkerProcess(proc, int(env["SEEDANCE_METRICS_PORT"]), log_path)
    procs.append(handle)
    return handle


def kill_worker_processes(procs: list[WorkerProcess]) -> None:
    for handle in procs:
        if handle.proc.poll() is None:
            handle.proc.send_signal(signal.SIGKILL)
            handle.proc.wait()


def wait_ready(worker: WorkerProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.log()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{worker.metrics_port}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"worker not ready within {timeout} s:\n{worker.log()}")


def job(job_id: str, **request: Any) -> dict[str, Any]:
    return {"job_id": job_id, "request": {"image": IMAGE, "prompt": f"boat {job_id}", **request}}


@dataclass
class Bus:
    """A producer's view of the system: publish jobs, receive events and replies, inspect queues."""

    connection: aio_pika.abc.AbstractRobustConnection
    channel: aio_pika.abc.AbstractChannel
    events: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    replies: list[aio_pika.abc.AbstractIncomingMessage] = field(default_factory=list)
    reply_queue: str = ""

    async def publish(self, body: dict[str, Any] | bytes, routing_key: str = "job.default", **properties: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        exchange = await self.channel.get_exchange(JOBS_EXCHANGE)
        message = aio_pika.Message(raw, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties)
        await exchange.publish(message, routing_key=routing_key)

    async def publish_many(self, bodies: list[dict[str, Any]], routing_key: str = "job.default") -> None:
        exchange = await self.channel.get_exchange(JOBS_EXCHANGE)
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(json.dumps(b).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=routing_key,
                )
                for b in bodies
            )
        )

    def terminal(self, job_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events.get(job_id, []) if e["status"] in TERMINAL_STATUSES]

    async def wait_terminal(self, job_ids: list[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        await wait_for(
            lambda: all(self.terminal(j) for j in job_ids), timeout, f"terminal events of {len(job_ids)} jobs"
        )
        return {j: self.terminal(j)[0] for j in job_ids}

    async def queue_depth(self, name: str) -> int:
        return (await self._passive_declare(name)).message_count or 0

    async def consumers(self, name: str) -> int:
        return (await self._passive_declare(name)).consumer_count or 0

    async def _passive_declare(self, name: str) -> Any:
        """On a channel of its own: a missing queue closes the channel it was asked on, and the bus's
        channel is reopened in the background, so the next question asked on it could meet the closed one."""
        channel = await self.connection.channel()
        try:
            raw = await channel.get_underlay_channel()
            return await raw.queue_declare(name, passive=True)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def get(self, queue_name: str) -> aio_pika.abc.AbstractIncomingMessage | None:
        queue = await self.channel.get_queue(queue_name)
        return await queue.get(fail=False, no_ack=True)


@pytest.fixture
async def bus(vhost: str) -> AsyncIterator[Bus]:
    connection = await aio_pika.connect_robust(vhost)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    the_bus = Bus(connection, channel)
    events = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(JOBS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(events, routing_key="job.#")

    async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        event = json.loads(message.body)
        the_bus.events[event["job_id"]].append(event)

    await queue.consume(on_event, no_ack=True)
    replies = await channel.declare_queue(exclusive=True)
    the_bus.reply_queue = replies.name

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        the_bus.replies.append(message)

    await replies.consume(on_reply, no_ack=True)
    yield the_bus
    await connection.close()

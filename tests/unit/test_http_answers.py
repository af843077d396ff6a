"""The API client over a real socket to a small asyncio server that misbehaves at the byte level: interim
`1xx` answers before the real one, a header the client must refuse, a body that trickles in, a server that
never reads the upload. The worker speaks HTTP only through httpx (on either transport it offers); this
server is test code, and each test says what the worker must make of what it sends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from prometheus_client import CollectorRegistry

from contracts.api import SubmitRequest
from worker.api_client import ApiClient
from worker.errors import AnswerLost, TransientApiError
from worker.http_clients import Transport, http_client, timeouts
from worker.metrics import Metrics

pytestmark = [pytest.mark.server, pytest.mark.both_loops]  # the worker runs on uvloop

# The answer to one request: (the request's head, its body) -> what to do on the writer.
Answer = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    answer: Answer
    read_body: bool = True
    port: int = 0
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)  # so the fixture can end the ones that never return
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                if not self.read_body:
                    await asyncio.sleep(3600)  # never reads the upload: the client's writes stall
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                body = await reader.readexactly(length) if length else b""
                await self.answer(head, body, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[tuple[asyncio.Server, Server]] = []

    async def start(answer: Answer, *, read_body: bool = True) -> Server:
        state = Server(answer, read_body)
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
        servers.append((server, state))
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start
    for server, state in servers:
        server.close()
        for handler in state.handlers:
            handler.cancel()
        await asyncio.gather(*state.handlers, return_exceptions=True)
        await server.wait_closed()


@pytest.fixture
def transport(transport_kind: Transport) -> Transport:
    return transport_kind


@pytest.fixture
async def api(transport: Transport) -> AsyncIterator[Callable[..., ApiClient]]:
    clients: list[ApiClient] = []

    def make(port: int, *, phase_seconds: float = 2.0, total_seconds: float = 4.0) -> ApiClient:
        client = http_client(transport, timeouts(phase_seconds))
        made = ApiClient(
            client, f"http://127.0.0.1:{port}", lambda: "key", Metrics(CollectorRegistry()), total_seconds=total_seconds
        )
        clients.append(made)
        return made

    yield make
    for made in clients:
        await made.aclose()


REQUEST = SubmitRequest(image="https://example.com/a.png", prompt="boat")


def ok(payload: dict[str, object], *, before: bytes = b"") -> bytes:
    body = json.dumps(payload).encode()
    return before + b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def task_result(task_id: str) -> dict[str, object]:
    return {"task": {"task_id": task_id, "status": "TASK_STATUS_PROCESSING", "progress_percent": 10}}


INTERIM = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


async def echo_with_interim_answers(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
    """Each answer preceded by 100 and 103, sent in pieces; its content names what was asked."""
    target = head.split(b" ")[1].decode()
    if body:
        answer = ok({"task_id": f"task-for-{json.loads(body)['prompt']}"}, before=INTERIM)
    else:
        answer = ok(task_result(parse_qs(urlsplit(target).query)["task_id"][0]), before=INTERIM)
    for start in range(0, len(answer), 17):  # the interim answers and the final one arrive in pieces
        writer.write(answer[start : start + 17])
        await writer.drain()
        await asyncio.sleep(0)


async def test_interim_answers_are_skipped_and_every_answer_reaches_its_own_request(serve, api) -> None:
    server = await serve(echo_with_interim_answers)
    client = api(server.port)
    prompts = [f"boat-{i}" for i in range(30)]
    task_ids = await asyncio.gather(*(client.submit(REQUEST.model_copy(update={"prompt": p})) for p in prompts))
    assert task_ids == [f"task-for-{p}" for p in prompts], "never another request's answer, never an interim one"
    for task_id in task_ids[:10]:  # the connections are reused: nothing of an earlier answer is left on them
        assert (await client.task_result(task_id)).task.task_id == task_id
    assert server.connections < len(prompts) + 10, "keep-alive connections were reused"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Bad\x00Name: 1\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\n{}",
        b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["bad-header-name", "conflicting-lengths", "bad-status-line"],
)
async def test_an_answer_with_a_broken_head_is_a_lost_answer_and_the_next_request_is_unharmed(
    serve, api, head: bytes
) -> None:
    answers = [head]

    async def broken_then_good(request_head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answers.pop(0) if answers else ok({"task_id": "t-2"}))

    server = await serve(broken_then_good)
    client = api(server.port)
    with pytest.raises(AnswerLost) as caught:
        await client.submit(REQUEST)
    assert caught.value.reason == "transport", "the request went out: the task may exist"
    assert await client.submit(REQUEST) == "t-2"


async def test_a_body_that_trickles_in_is_bounded_by_the_requests_total_time(serve, api) -> None:
    async def trickle(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n")
        for _ in range(400):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)  # each byte well inside the per-read timeout

    server = await serve(trickle)
    client = api(server.port, phase_seconds=0.5, total_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(AnswerLost) as caught:
        await client.task_result("t-1")
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 10, "ended by the total bound, not after the whole trickle (20 s)"


async def test_an_upload_the_server_never_reads_is_a_request_not_sent_on_httpx(serve) -> None:
    """httpx applies its write timeout: the API never had the whole request, so it cannot have acted on it
    (a retry cannot pay twice). aiohttp has no write timeout: see the next test."""
    server = await serve(echo_with_interim_answers, read_body=False)
    client = http_client("httpx", httpx.Timeout(5.0, write=0.3))
    api = ApiClient(
        client, f"http://127.0.0.1:{server.port}", lambda: "key", Metrics(CollectorRegistry()), total_seconds=10
    )
    big = REQUEST.model_copy(update={"prompt": "x" * (32 * 1024 * 1024)})  # far past the socket buffers
    try:
        with pytest.raises(TransientApiError) as caught:
            await api.submit(big)
    finally:
        await api.aclose()
    assert type(caught.value) is TransientApiError, "not AnswerLost: the request never went out whole"
    assert caught.value.reason == "timeout"


@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")  # aiohttp's own advice
async def test_an_upload_the_server_never_reads_ends_at_the_total_bound_on_aiohttp(serve) -> None:
    server = await serve(echo_with_interim_answers, read_body=False)
    client = http_client("aiohttp", httpx.Timeout(5.0, write=0.3))
    api = ApiClient(
        client, f"http://127.0.0.1:{server.port}", lambda: "key", Metrics(CollectorRegistry()), total_seconds=1
    )
    big = REQUEST.model_copy(update={"prompt": "x" * (32 * 1024 * 1024)})
    try:
        with pytest.raises(AnswerLost) as caught:
            await api.submit(big)
    finally:
        await api.aclose()
    assert caught.value.reason == "timeout", "aiohttp cannot tell a stalled upload from a slow answer"


async def test_a_refused_connection_is_a_request_never_sent(api) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(TransientApiError) as caught:
        await api(port).submit(REQUEST)
    assert type(caught.value) is TransientApiError and caught.value.reason == "transport"


async def test_a_reset_after_the_request_went_out_is_a_lost_answer(serve, api) -> None:
    async def reset(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{"task')
        await writer.drain()
        writer.transport.abort()

    server = await serve(reset)
    with pytest.raises(AnswerLost) as caught:
        await api(server.port).submit(REQUEST)
    assert caught.value.reason == "transport", "on aiohttp too, although httpx-aiohttp calls it a connect error"


async def test_a_cookie_an_answer_sets_never_rides_along_with_a_later_request(serve, transport) -> None:
    """A gateway's load balancer may set a session cookie: one job's answer must not shape another's request."""

    async def with_cookie(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        target = head.split(b" ")[1].decode()
        answer = ok(task_result(parse_qs(urlsplit(target).query)["task_id"][0]))
        writer.write(answer.replace(b"\r\n\r\n", b"\r\nSet-Cookie: lb=node-7; Path=/\r\n\r\n", 1))

    server = await serve(with_cookie)
    # By name: aiohttp's own cookie jar ignores cookies of a bare IP address.
    client = ApiClient(
        http_client(transport, timeouts(2.0)),
        f"http://localhost:{server.port}",
        lambda: "key",
        Metrics(CollectorRegistry()),
    )
    for task_id in ("task-1", "task-2", "task-3"):
        assert (await client.task_result(task_id)).task.task_id == task_id
    assert len(server.heads) == 3
    await client.aclose()
    assert not [h for h in server.heads if b"\r\ncookie:" in h.lower()], server.heads

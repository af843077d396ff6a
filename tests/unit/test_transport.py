"""worker.transport against a real socket: a small asyncio server answers each test's requests with the
bytes the test chooses (well-formed, chunked, cut short, garbled, late, over TLS), and the transport must
read them as HTTP/1.1 says or fail with the httpx error a caller expects."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
import trustme

from worker.transport import MAX_BODY, Http11Transport, _Connection

pytestmark = [pytest.mark.server, pytest.mark.both_loops]  # the worker runs on uvloop


Answer = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]
TIMEOUTS = {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}


@dataclass
class Server:
    """Answers every request (read up to its blank line) with `answer`; counts connections and requests."""

    answer: Answer
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                await self.answer(head, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer, context: ssl.SSLContext | None = None) -> Server:
        state = Server(answer)
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0, ssl=context)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def reply(raw: bytes) -> Answer:
    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)

    return answer


async def get(transport: Http11Transport, url: str, method: str = "GET", **kw: object) -> httpx.Response:
    request = httpx.Request(method, url, extensions={"timeout": {**TIMEOUTS, **kw}})
    response = await transport.handle_async_request(request)
    await response.aread()
    return response


async def closed(connection: _Connection, within: float = 1.0) -> bool:
    """Whether `connection` is closed, waiting up to `within` seconds for it to be."""
    for _ in range(int(within / 0.01)):
        if connection.closed:
            return True
        await asyncio.sleep(0.01)
    return connection.closed


async def test_keep_alive_reuses_one_connection_for_many_requests(serve) -> None:
    server = await serve(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok"))
    transport = Http11Transport()
    for _ in range(5):
        response = await get(transport, f"http://127.0.0.1:{server.port}/path?q=1")
        assert (response.status_code, response.content, response.headers["x-a"]) == (200, b"ok", "b")
    assert server.connections == 1
    assert server.requests[0].startswith(b"GET /path?q=1 HTTP/1.1\r\n")
    assert b"\r\nhost: 127.0.0.1:" in server.requests[0].lower()
    await transport.aclose()


async def test_a_request_body_is_sent_with_its_length(serve) -> None:
    server = await serve(reply(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"))
    transport = Http11Transport()
    request = httpx.Request(
        "POST", f"http://127.0.0.1:{server.port}/x", json={"a": 1}, extensions={"timeout": TIMEOUTS}
    )
    response = await transport.handle_async_request(request)
    assert response.status_code == 201 and response.content == b""
    assert server.requests[0].endswith(b'\r\n\r\n{"a":1}') or server.requests[0].endswith(b'\r\n\r\n{"a": 1}')
    await transport.aclose()


async def test_a_chunked_answer_with_extensions_and_trailers_is_read_whole(serve) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n6\r\npedia \r\n0\r\nT: x\r\n\r\n"
    )
    server = await serve(reply(chunked))
    transport = Http11Transport()
    assert (await get(transport, f"http://127.0.0.1:{server.port}/")).content == b"Wikipedia "
    assert (await get(transport, f"http://127.0.0.1:{server.port}/")).content == b"Wikipedia "
    assert server.connections == 1, "the connection is reused after a chunked answer"
    await transport.aclose()


async def test_an_answer_without_length_ends_with_the_connection(serve) -> None:
    async def until_close(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    server = await serve(until_close)
    transport = Http11Transport()
    assert (await get(transport, f"http://127.0.0.1:{server.port}/")).content == b"all of it"
    assert (await get(transport, f"http://127.0.0.1:{server.port}/")).content == b"all of it"
    assert server.connections == 2
    await transport.aclose()


async def test_connection_close_is_honoured(serve) -> None:
    server = await serve(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"))
    transport = Http11Transport()
    await get(transport, f"http://127.0.0.1:{server.port}/")
    await get(transport, f"http://127.0.0.1:{server.port}/")
    assert server.connections == 2
    await transport.aclose()


async def test_a_connection_the_server_closed_while_idle_is_not_reused(serve) -> None:
    server = await serve(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"))
    transport = Http11Transport()
    await get(transport, f"http://127.0.0.1:{server.port}/")
    for writer in server.writers:
        writer.close()  # the server drops its idle keep-alive connection
    ((idle,),) = transport._idle.values()
    assert await closed(idle), "the transport saw the close"
    assert (await get(transport, f"http://127.0.0.1:{server.port}/")).content == b"x"
    assert server.connections == 2
    await transport.aclose()


@pytest.mark.parametrize("when", ["with the answer", "while idle"])
async def test_bytes_past_an_answer_are_never_read_as_the_next_answer(serve, when: str) -> None:
    answers = iter([b"first", b"second"])
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"

    async def answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        body = next(answers)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        if when == "with the answer":
            writer.write(stray)

    server = await serve(answer)
    transport = Http11Transport()
    assert (await get(transport, f"http://127.0.0.1:{server.port}/")).content == b"first"
    if when == "while idle":
        ((idle,),) = transport._idle.values()
        server.writers[0].write(stray)
        assert await closed(idle), "the transport dropped the connection that sent unasked bytes"
    assert (await get(transport, f"http://127.0.0.1:{server.port}/")).content == b"second"
    assert server.connections == 2
    await transport.aclose()


async def test_a_head_request_reads_no_body(serve) -> None:
    server = await serve(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"))
    transport = Http11Transport()
    response = await get(transport, f"http://127.0.0.1:{server.port}/", method="HEAD")
    assert response.headers["content-length"] == "1000" and response.content == b""
    await get(transport, f"http://127.0.0.1:{server.port}/", method="HEAD")
    assert server.connections == 1
    await transport.aclose()


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (MAX_BODY // 4, b"v" * (MAX_BODY // 4)) * 5
        + b"0\r\n\r\n",
    ],
    ids=[
        "cut-short",
        "no-status-line",
        "bad-status",
        "bad-header",
        "bad-length",
        "bad-chunk",
        "too-large",
        "too-large-chunked",
    ],
)
async def test_a_broken_answer_is_a_protocol_error(serve, raw: bytes) -> None:
    async def then_close(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        writer.close()

    server = await serve(then_close)
    transport = Http11Transport()
    with pytest.raises(httpx.RemoteProtocolError):
        await get(transport, f"http://127.0.0.1:{server.port}/")
    await transport.aclose()


async def test_a_late_answer_is_a_read_timeout_and_its_connection_is_dropped(serve) -> None:
    async def late(head: bytes, writer: asyncio.StreamWriter) -> None:
        if len(server.requests) == 1:
            await asyncio.sleep(1.0)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")

    server = await serve(late)
    transport = Http11Transport()
    with pytest.raises(httpx.ReadTimeout):
        await get(transport, f"http://127.0.0.1:{server.port}/", read=0.1)
    assert (await get(transport, f"http://127.0.0.1:{server.port}/")).content == b"x"
    assert server.connections == 2, "a connection with an answer pending is never reused"
    await transport.aclose()


async def test_no_free_connection_in_time_is_a_pool_timeout(serve) -> None:
    async def never(head: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await serve(never)
    transport = Http11Transport(max_connections=1)
    first = asyncio.create_task(get(transport, f"http://127.0.0.1:{server.port}/", read=3))
    while not server.requests:  # the first request holds the only connection
        await asyncio.sleep(0.01)
    with pytest.raises(httpx.PoolTimeout):
        await get(transport, f"http://127.0.0.1:{server.port}/", pool=0.1)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await transport.aclose()


async def test_a_refused_connection_is_a_connect_error() -> None:
    from tests.servers import free_port  # noqa: PLC0415

    transport = Http11Transport()
    with pytest.raises(httpx.ConnectError):
        await get(transport, f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(httpx.UnsupportedProtocol):
        await get(transport, "ftp://127.0.0.1/")


async def test_tls_with_a_trusted_certificate_works_and_an_untrusted_one_is_refused(serve) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(server_context)
    server = await serve(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure"), server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    trusting = Http11Transport(ssl_context=client_context)
    assert (await get(trusting, f"https://localhost:{server.port}/")).content == b"secure"
    await trusting.aclose()
    default = Http11Transport()  # certifi's authorities: this one is not among them
    with pytest.raises(httpx.ConnectError):
        await get(default, f"https://localhost:{server.port}/")
    await default.aclose()

"""A lean HTTP/1.1 transport under httpx for the API's small JSON exchanges.

The worker keeps httpx's request and response objects (and with them respx, the in-process mock, users'
own transports), but carries its requests on this transport instead of httpcore's: one asyncio protocol
per keep-alive connection, a response parsed in one pass from bytes already in memory, no per-request
checks of every pooled socket (httpcore's `getpeername` and `select` on each idle connection were over
half of the worker's CPU), no anyio layers. `SEEDANCE_HTTP_TRANSPORT=httpx` falls back to httpx's own.

What it supports is what an API answer needs: HTTP/1.1 keep-alive (and `Connection: close`), bodies by
`Content-Length`, `chunked` or until the server closes, TLS with certificate checks, the four httpx
timeouts. What it does not: HTTP/2, proxies, upgrades, streaming responses (it reads answers whole, up to
MAX_BODY; the video copy streams through httpx's own transport).

Every failure is raised as the httpx error a caller would have seen, split the way the worker needs it
(worker.api_client): before the request could have reached the server (`ConnectError`, `ConnectTimeout`,
`PoolTimeout`) versus after (`ReadTimeout`, `RemoteProtocolError`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import defaultdict
from typing import cast

import httpx

MAX_BODY = 16 * 1024 * 1024
_NO_BODY_STATUS = frozenset({204, 304})
Origin = tuple[str, str, int]


class _Broken(Exception):
    """The server's answer is no valid HTTP/1.1 (or the connection ended in its middle)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: sends a request, parses the answer as its bytes arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = time.monotonic()
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes, bool]] | None = None
        self._head: tuple[int, list[tuple[bytes, bytes]], int | None, bool, bool] | None = None
        self._no_body = False
        self._chunks: list[bytes] = []
        self._chunked_bytes = 0
        self._eof = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is one without subclassing asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._eof = True
        self._parse()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(_Broken("the server closed the connection before a whole answer"))

    def eof_received(self) -> bool:
        self._eof = True
        self._parse()
        return False

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Bytes no request asked for (past an answer's end, or on an idle connection) would be read as
            # the next request's answer: the connection cannot be trusted with another one.
            self.close()
            return
        self._buffer += data
        self._parse()

    # requests
    def send(
        self, head: bytes, body: bytes, *, no_body: bool, read_timeout: float | None
    ) -> asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes, bool]]:
        """Write a request; the future resolves to (status, headers, body, keep-alive) or raises _Broken, or
        TimeoutError after `read_timeout` seconds without a whole answer."""
        assert self.transport is not None  # noqa: S101 - called once connected
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._no_body = no_body
        if read_timeout is not None:
            # A timer on the loop costs less than an asyncio.timeout() scope around the await.
            timer = loop.call_later(read_timeout, self._late, waiter)
            waiter.add_done_callback(lambda _: timer.cancel())
        self.transport.write(head + body if body else head)
        return waiter

    @staticmethod
    def _late(waiter: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes, bool]]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    @property
    def pending(self) -> bool:
        """Bytes received past the end of the last answer."""
        return bool(self._buffer)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _parse(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            answer = self._answer()
        except _Broken as exc:
            waiter.set_exception(exc)
            return
        if answer is not None:
            self._waiter = None
            waiter.set_result(answer)

    def _answer(self) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool] | None:
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > 65536:
                    raise _Broken("answer headers longer than 64 KiB")
                return None
            self._head = _parse_head(bytes(buffer[:end]), no_body=self._no_body)
            del buffer[: end + 4]
        status, headers, length, chunked, keep_alive = self._head
        if length is not None:
            if len(buffer) < length:
                return None
            body = bytes(buffer[:length])
            del buffer[:length]
        elif chunked:
            if not self._read_chunks():
                return None
            body = b"".join(self._chunks)
            self._chunks, self._chunked_bytes = [], 0
        else:  # the body runs until the server closes the connection
            if not self._eof:
                if len(buffer) > MAX_BODY:
                    raise _Broken(f"answer larger than {MAX_BODY} bytes")
                return None
            body, keep_alive = bytes(buffer), False
            buffer.clear()
        self._head = None
        return status, headers, body, keep_alive

    def _read_chunks(self) -> bool:
        """Consume whole chunks from the buffer; True once the last one (and the trailer) is in."""
        buffer = self._buffer
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                return False
            try:
                size = int(bytes(buffer[:line_end]).split(b";", 1)[0], 16)
            except ValueError:
                raise _Broken("a chunk size is no hex number") from None
            if size == 0:  # the last chunk, then trailer lines (usually none) and an empty line
                end = buffer.find(b"\r\n\r\n", line_end)
                if end < 0:
                    return False
                del buffer[: end + 4]
                return True
            start = line_end + 2
            if len(buffer) < start + size + 2:
                return False
            self._chunks.append(bytes(buffer[start : start + size]))
            self._chunked_bytes += size
            if self._chunked_bytes > MAX_BODY:
                raise _Broken(f"answer larger than {MAX_BODY} bytes")
            del buffer[: start + size + 2]


def _parse_head(head: bytes, *, no_body: bool) -> tuple[int, list[tuple[bytes, bytes]], int | None, bool, bool]:
    """(status, headers, content length, chunked, keep-alive) of an answer's head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise _Broken("the answer does not start with an HTTP/1.x status line")
    status = int(parts[1])
    keep_alive = parts[0] == b"HTTP/1.1"
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:].isspace():
            raise _Broken("a header line of the answer is malformed")
        value = value.strip()
        headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length":
            if not value.isdigit():
                raise _Broken("the answer's Content-Length is no number")
            length = int(value)
            if length > MAX_BODY:
                raise _Broken(f"answer larger than {MAX_BODY} bytes")
        elif lowered == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
        elif lowered == b"connection":
            tokens = value.lower()
            keep_alive = b"close" not in tokens and (keep_alive or b"keep-alive" in tokens)
    if no_body or status in _NO_BODY_STATUS or 100 <= status < 200:
        return status, headers, 0, False, keep_alive
    if chunked:
        return status, headers, None, True, keep_alive
    return status, headers, length, False, keep_alive


class Http11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive connections, at most `max_connections` open at once across all origins."""

    def __init__(
        self,
        *,
        max_connections: int = 64,
        keepalive_seconds: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`ssl_context` defaults to httpx's (certifi's certificates, checks on)."""
        self._slots = asyncio.Semaphore(max_connections)
        self._keepalive = keepalive_seconds
        self._idle: dict[Origin, list[_Connection]] = defaultdict(list)
        self._ssl = ssl_context

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        origin: Origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}", request=request)
        body = await request.aread()
        lines = [request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        lines += [name + b": " + value + b"\r\n" for name, value in request.headers.raw]
        head = b"".join(lines) + b"\r\n"
        if self._slots.locked():  # only then can acquiring wait, and need a timeout
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no connection free in time", request=request) from None
        else:
            await self._slots.acquire()
        try:
            connection = self._reuse(origin) or await self._connect(origin, request, within=timeouts.get("connect"))
            answer = connection.send(head, body, no_body=request.method == "HEAD", read_timeout=timeouts.get("read"))
            try:
                status, headers, content, keep_alive = await answer
            except TimeoutError:
                connection.close()
                raise httpx.ReadTimeout("no answer in time", request=request) from None
            except _Broken as exc:
                connection.close()
                raise httpx.RemoteProtocolError(str(exc), request=request) from None
            except BaseException:  # cancelled mid-answer: the connection's state is unknown
                connection.close()
                raise
            if keep_alive and not connection.closed and not connection.pending:
                connection.idle_since = time.monotonic()
                self._idle[origin].append(connection)
            else:
                connection.close()
        finally:
            self._slots.release()
        return httpx.Response(
            status_code=status,
            headers=headers,
            content=content,
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    def _reuse(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        oldest = time.monotonic() - self._keepalive
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since >= oldest:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, request: httpx.Request, *, within: float | None) -> _Connection:
        scheme, host, port = origin
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(within):
                _, connection = await loop.create_connection(
                    _Connection, host, port, ssl=context, server_hostname=host if context else None
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} in time", request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(
                f"cannot connect to {host}:{port}: {exc.strerror or exc}", request=request
            ) from None
        return connection

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

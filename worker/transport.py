"""An httpx transport on aiohttp, for the API's small JSON answers: the same `httpx.AsyncClient` API (and
respx, mock transports, the contract suite), with aiohttp's C parser and leaner connection pool underneath.

Why: per request, httpcore checks every pooled connection for expiry (a `getpeername` and a `select` each)
and anyio wraps every socket call; in a profile of the worker that was over half of its CPU. This
transport does the same job for a fraction of it (README, Measurements). `SEEDANCE_HTTP_TRANSPORT=httpx`
falls back to httpx's own transport.

Every aiohttp failure maps onto the httpx exception a caller would have seen, split the way the worker
needs it (worker.api_client): failures before the request was sent (`ConnectError`, `ConnectTimeout`,
`PoolTimeout`) versus failures after it may have reached the API (`ReadTimeout`, `ReadError`,
`RemoteProtocolError`). The body is read whole before the response is returned: this transport is for
API answers, not for downloads (the video copy uses httpx's own transport, streaming).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aiohttp
import httpx

MAX_BODY = 16 * 1024 * 1024


@contextlib.contextmanager
def _mapped(request: httpx.Request) -> Iterator[None]:
    """Raise aiohttp's errors as the httpx errors a caller would have seen."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # no connection (or no free one) in time: nothing sent
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:  # refused, unreachable: nothing sent
        raise httpx.ConnectError(str(exc) or "cannot connect", request=request) from exc
    except aiohttp.SocketTimeoutError as exc:  # sent, and no answer in time
        raise httpx.ReadTimeout(str(exc) or "timed out waiting for the answer", request=request) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
        # The connection closed before a whole answer, or the answer is no valid HTTP.
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except (aiohttp.ClientError, OSError) as exc:
        # A reset or a broken pipe once connected: the request may have been read.
        raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc


class AiohttpTransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncClient(transport=AiohttpTransport(...))`: HTTP/1.1 with keep-alive over aiohttp."""

    def __init__(self, *, max_connections: int = 64, keepalive_seconds: float = 15.0) -> None:
        self._max_connections = max_connections
        self._keepalive = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=self._keepalive, ttl_dns_cache=300
            )
            # No cookies, no automatic decompression or redirects: httpx's client above decides all that.
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        wanted = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None, connect=wanted.get("pool"), sock_connect=wanted.get("connect"), sock_read=wanted.get("read")
        )
        body = await request.aread()
        with _mapped(request):
            async with self._open().request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=body or None,
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                if (response.content_length or 0) > MAX_BODY:
                    raise httpx.RemoteProtocolError(f"answer larger than {MAX_BODY} bytes", request=request)
                content = await response.read()
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            content=content,
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

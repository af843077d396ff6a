"""The HTTP clients of the worker: `httpx.AsyncClient`s, never hand-written HTTP.

One client carries the API's requests, another the video downloads (it never holds the API key). Both take
their proxies from the environment (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`), validate headers,
apply all four timeouts (connect, write, read, pool) and skip interim `1xx` answers: the library does it.
`SEEDANCE_HTTP_TRANSPORT` picks what carries the bytes underneath:

- `aiohttp`, the default: aiohttp's client through `httpx-aiohttp` (the transport the OpenAI SDK offers),
  about a third of httpcore's CPU per request. aiohttp has no write timeout (a stalled upload ends at the
  read timeout), and httpx-aiohttp reports every broken connection as a connect error; `never_sent` and
  `timed_out` below tell them apart again;
- `httpx`: httpx's own transport (httpcore), which applies the write timeout.
"""

from __future__ import annotations

from typing import Any, Literal

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient

Transport = Literal["httpx", "aiohttp"]
USER_AGENT = "seedance-worker"


class _NoCookies(httpx.Cookies):
    """Keeps no cookie: neither the API nor a pre-signed video URL needs one, and a cookie one job's answer
    set must never ride along with another job's request. httpx hands every answer to its client's cookies;
    this skips even the urllib stand-ins it builds for the jar (a few per cent of a request's CPU)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class _Cookieless(httpx.AsyncClient):
    """An `httpx.AsyncClient` whose cookies stay empty: nothing an answer sets is kept or sent."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._none = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._none

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise TypeError("this client keeps no cookies")


class _CookielessAiohttpTransport(AiohttpTransport):
    """httpx-aiohttp's transport on an aiohttp session that keeps no cookie either: aiohttp's session has a
    cookie jar of its own, under httpx's, which would send a cookie one answer set with every later request
    to that host."""

    def get_client(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,  # 0: no limit, as httpx's None
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


class _AiohttpClient(_Cookieless, HttpxAiohttpClient):
    """`HttpxAiohttpClient` whose transports, the direct one and one per proxy, keep no cookies."""

    # httpx calls both with keywords only; the narrower signatures say which ones this class uses.
    def _init_transport(  # type: ignore[override]
        self, transport: httpx.AsyncBaseTransport | None = None, **options: Any
    ) -> httpx.AsyncBaseTransport:
        return transport or _CookielessAiohttpTransport(**options)

    def _init_proxy_transport(  # type: ignore[override]
        self, proxy: httpx.Proxy, **options: Any
    ) -> httpx.AsyncBaseTransport:
        return _CookielessAiohttpTransport(proxy=proxy, **options)


def timeouts(seconds: float) -> httpx.Timeout:
    """Every phase of one request bounded by `seconds`; connecting by at most 10 s."""
    return httpx.Timeout(seconds, connect=min(10.0, seconds))


def http_client(
    transport: Transport,
    timeout: httpx.Timeout,
    *,
    max_connections: int = 64,
    follow_redirects: bool = False,
) -> httpx.AsyncClient:
    """A client over the chosen transport that honours the proxy variables of the environment."""
    # httpcore checks every pooled connection on each request: a small keep-alive pool is cheaper per call.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=16)
    options = {
        "timeout": timeout,
        "limits": limits,
        "trust_env": True,  # proxies and SSL_CERT_FILE from the environment
        "follow_redirects": follow_redirects,
        "headers": {"User-Agent": USER_AGENT},
    }
    if transport == "aiohttp":
        return _AiohttpClient(**options)
    return _Cookieless(**options)


# What a request through either transport can raise besides an answer: httpx's errors, and aiohttp's own
# where httpx-aiohttp lets them through unmapped (a garbled answer head raises aiohttp.ClientResponseError).
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.TransportError, aiohttp.ClientError)


def never_sent(exc: Exception) -> bool:
    """Whether the request certainly never reached the server (so sending it again cannot pay twice).

    httpx says so with ConnectError, ConnectTimeout, PoolTimeout and WriteTimeout (a body not sent whole is
    no request), a ProxyError, or a request refused before it left. httpx-aiohttp maps every aiohttp
    connection error onto ConnectTimeout, a reset after the request went out included: there, only
    aiohttp's ClientConnectorError (connecting failed) counts.
    """
    if isinstance(exc, aiohttp.ClientError):
        return isinstance(exc, aiohttp.ClientConnectorError)
    if isinstance(exc, httpx.ProxyError | httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return True
    if not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout | httpx.WriteTimeout):
        return False
    cause = exc.__cause__
    return not isinstance(cause, aiohttp.ClientError) or isinstance(cause, aiohttp.ClientConnectorError)


def timed_out(exc: Exception) -> bool:
    """Whether the request failed because a timeout ran out (rather than a refusal or a broken connection).
    httpx-aiohttp calls every aiohttp connection error a ConnectTimeout: its cause says what it was."""
    if isinstance(exc, aiohttp.ClientError):
        return isinstance(exc, aiohttp.ServerTimeoutError)
    if not isinstance(exc, httpx.TimeoutException):
        return False
    cause = exc.__cause__
    return not isinstance(cause, aiohttp.ClientError) or isinstance(cause, aiohttp.ServerTimeoutError)

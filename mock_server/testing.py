"""Mount the mock in-process, for tests that want its behaviour without a socket.

`InProcessTransport` is an httpx transport over the ASGI app that behaves like a socket where it matters
to a client: the request's read timeout is enforced (httpx's own ASGITransport ignores timeouts) and an
injected connection reset surfaces as `httpx.RemoteProtocolError`, as it does over TCP.
`mount_respx` routes a base URL to the same app inside a `respx` router.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httpx

from mock_server.app import MockApp, SimulatedReset

if TYPE_CHECKING:  # respx is a test dependency: this module must load without it
    import respx


class InProcessTransport(httpx.AsyncBaseTransport):
    def __init__(self, app: MockApp) -> None:
        self.app = app
        self._inner = httpx.ASGITransport(app=app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {}).get("read")
        try:
            async with asyncio.timeout(timeout):
                response = await self._inner.handle_async_request(request)
                await response.aread()
                return response
        except TimeoutError:
            raise httpx.ReadTimeout("timed out waiting for the mock", request=request) from None
        except SimulatedReset:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body", request=request
            ) from None


def mount_respx(router: respx.MockRouter, app: MockApp, base_url: str) -> respx.Route:
    """Answer every request to `base_url` from `app`; returns the respx route (it counts calls)."""
    transport = InProcessTransport(app)

    async def forward(request: httpx.Request) -> httpx.Response:
        response = await transport.handle_async_request(request)
        return httpx.Response(response.status_code, headers=response.headers, content=response.content)

    return router.route(url__startswith=base_url.rstrip("/")).mock(side_effect=forward)

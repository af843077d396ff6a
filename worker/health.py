"""The operators' endpoints: `/metrics` (Prometheus), `/healthz` (liveness), `/readyz` (readiness).

A Starlette app (prometheus-client's exposition under `/metrics`) served by uvicorn inside the worker's
event loop: request parsing, limits and slow clients are uvicorn's business, not ours. uvicorn's signal
handling is left out (the worker's `__main__` owns the signals), so only its start-up and shut-down are used.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)


def health_app(registry: CollectorRegistry, readiness: Callable[[], dict[str, Any]]) -> Starlette:
    """The three routes; `readiness()` gives /readyz its body, and its `ready` field the status code."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        state = readiness()
        return JSONResponse(state, status_code=200 if state.get("ready") else 503)

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("not found: try /metrics, /healthz, /readyz\n", status_code=404)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics, methods=["GET", "HEAD"]),
        ],
        exception_handlers={404: not_found},
    )


class HealthServer:
    """`health_app` on `host:port` for as long as the context lasts; binding fails with OSError at entry."""

    def __init__(
        self, registry: CollectorRegistry, readiness: Callable[[], dict[str, Any]], host: str, port: int
    ) -> None:
        self._app = health_app(registry, readiness)
        self._host = host
        self._port = port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None

    @property
    def port(self) -> int:
        assert self._socket is not None  # noqa: S101
        port: int = self._socket.getsockname()[1]
        return port

    async def __aenter__(self) -> HealthServer:
        config = uvicorn.Config(
            self._app,
            http="h11",  # bounded request heads (h11_max_incomplete_event_size); speed is no concern here
            lifespan="off",
            access_log=False,
            log_config=None,  # the worker's logging, not uvicorn's
            log_level=logging.WARNING,
            timeout_keep_alive=5,
            limit_concurrency=64,
            h11_max_incomplete_event_size=8192,
        )
        config.load()
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        self._socket = sock
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server = server
        log.info("serving /metrics, /healthz and /readyz on %s:%d", self._host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.force_exit = True  # no waiting for idle keep-alive connections
            await asyncio.wait_for(self._server.shutdown(sockets=[self._socket] if self._socket else None), 5)
        if self._socket is not None:
            self._socket.close()

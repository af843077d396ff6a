"""A small HTTP server for operators: `/metrics` (Prometheus), `/healthz` (liveness), `/readyz` (readiness).

Plain asyncio streams: three fixed GET routes do not justify a framework in the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class HealthServer:
    def __init__(
        self, registry: CollectorRegistry, readiness: Callable[[], dict[str, Any]], host: str, port: int
    ) -> None:
        self._registry = registry
        self._readiness = readiness
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None  # noqa: S101
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> HealthServer:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("serving /metrics, /healthz and /readyz on %s:%d", self._host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            status, content_type, body = self._route(method, path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return "200 OK", "application/json", b'{"status":"alive"}\n'
        if path == "/readyz":
            state = self._readiness()
            status = "200 OK" if state.get("ready") else "503 Service Unavailable"
            return status, "application/json", json.dumps(state).encode() + b"\n"
        return "404 Not Found", "text/plain", b"not found: try /metrics, /healthz, /readyz\n"

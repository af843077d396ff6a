"""The mock API as a small ASGI app: the two `/v3/async` endpoints plus a `/_mock/*` test surface.

Requests pass through the same steps a gateway would take, in this order: injected latency, injected
faults (connection reset, timeout, 5xx/429, malformed answer), Bearer auth, routing, body validation
against the shared `contracts` models, quotas, and finally the task state. Every API request lands in the
journal with the status it was answered; `/_mock/*` calls do not.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qs

from pydantic import BaseModel, ValidationError

from contracts import validation_message
from contracts.api import MODEL_NAME, SUBMIT_PATH, TASK_RESULT_PATH, SubmitRequest, TaskStatus
from mock_server.state import Endpoint, Faults, MockConfig, MockState, Task, iso

M = TypeVar("M", bound=BaseModel)
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MAX_BODY_BYTES = 128 * 1024 * 1024
API_PREFIX = "/v3/async/"
FAKE_MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 64


class SimulatedReset(Exception):
    """Raised after the answer has started, so the server drops the connection mid-response."""


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: bool = False


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Response(status, json.dumps(payload, separators=(",", ":")).encode(), extra)


def error(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """The gateway's flat error body."""
    body = {"code": status, "reason": reason, "message": message, "metadata": {}}
    return json_response(status, body, headers)


def retry_after(seconds: float) -> str:
    # Whole seconds as HTTP asks; below one second (a scaled-down clock) a decimal, which clients that
    # parse floats honour and integer-only clients read as "retry now".
    if seconds >= 1:
        return str(math.ceil(seconds))
    return f"{max(seconds, 0.001):.3f}"


class MockApp:
    """ASGI app of the mock. `state` is exposed so in-process tests can look inside."""

    def __init__(self, state: MockState | None = None) -> None:
        self.state = state or MockState()
        self._openapi: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if body is None:
            response = error(413, "INVALID_REQUEST_BODY", f"body larger than {MAX_BODY_BYTES} bytes")
        else:
            response = await self.handle(scope, body)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(response.body)).encode()),
        ]
        if response.reset:
            # Promise a body, then drop the connection: the client sees the peer vanish mid-answer.
            promised = [(b"content-type", b"application/json"), (b"content-length", b"64")]
            await send({"type": "http.response.start", "status": 200, "headers": promised})
            raise SimulatedReset("connection reset by the mock (injected fault)")
        for name, value in response.headers:
            if name == b"content-type":
                headers[0] = (name, value)
            else:
                headers.append((name, value))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def handle(self, scope: Scope, body: bytes) -> Response:
        method: str = scope["method"]
        path: str = scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith("/_mock/") or path in ("/openapi.json", "/healthz"):
            return self._control(method, path, body, headers)
        endpoint: Endpoint = "task-result" if path == TASK_RESULT_PATH else "submit"
        state = self.state
        entry: dict[str, Any] = {
            "method": method,
            "path": path,
            "endpoint": endpoint,
            "time": iso(state.now()),
        }
        try:
            response = await self._api(endpoint, method, path, query, headers, body, entry)
        except BaseException:
            entry["status"] = 499
            state.record(entry)
            raise
        entry["status"] = 0 if response.reset else response.status
        state.record(entry)
        return response

    async def _api(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
        entry: dict[str, Any],
    ) -> Response:
        state = self.state
        faults = state.faults
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        fault = state.roll(endpoint)
        if fault is not None:
            entry["fault"] = fault
        if fault == "reset":
            return Response(200, b"", reset=True)
        if fault == "timeout":
            await asyncio.sleep(faults.timeout_seconds)
            return error(504, "GATEWAY_TIMEOUT", "upstream timed out")
        if fault is not None and fault != "malformed":
            return _injected_status(int(fault), faults)

        denied = self._authenticate(headers)
        if denied is not None:
            return denied
        if endpoint == "task-result":
            response = self._task_result(method, query, entry, headers)
        else:
            response = self._submit(method, path, body, entry)
        if fault == "malformed" and response.status == 200:
            response.body = response.body[: max(1, len(response.body) // 2)]
        return response

    def _authenticate(self, headers: dict[str, str]) -> Response | None:
        auth_fault = self.state.faults.auth
        if auth_fault is not None:
            return error(auth_fault.status, auth_fault.reason, auth_fault.message)
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return error(401, "FAILED_TO_AUTH", "missing or malformed Authorization header; use Bearer <key>")
        expected = self.state.config.api_key
        if expected is not None and token.strip() != expected:
            return error(403, "INVALID_API_KEY", "the API key is not valid")
        return None

    def _submit(self, method: str, path: str, body: bytes, entry: dict[str, Any]) -> Response:
        model = path.removeprefix(API_PREFIX)
        if not path.startswith(API_PREFIX) or model != MODEL_NAME:
            return error(404, "MODEL_NOT_FOUND", f"model {model!r} not found")
        if method != "POST":
            return error(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {SUBMIT_PATH}; use POST")
        try:
            payload = json.loads(body)
        except ValueError:
            return error(400, "INVALID_REQUEST_BODY", "request body is not valid JSON")
        try:
            request = SubmitRequest.model_validate(payload)
        except ValidationError as exc:
            return error(400, "INVALID_REQUEST_BODY", validation_message(exc))
        entry["tier"] = request.service_tier
        state = self.state
        verdict = state.check_quota(request)
        if verdict is not None:
            return error(429, "RATE_LIMIT_EXCEEDED", verdict.message, {"Retry-After": retry_after(verdict.retry_after)})
        task = state.create_task(request)
        entry["task_id"] = task.task_id
        return json_response(200, {"task_id": task.task_id})

    def _task_result(
        self, method: str, query: dict[str, list[str]], entry: dict[str, Any], headers: dict[str, str]
    ) -> Response:
        if method != "GET":
            return error(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {TASK_RESULT_PATH}; use GET")
        task_id = (query.get("task_id") or [""])[0].strip()
        if not task_id:
            return error(400, "INVALID_REQUEST_BODY", "task_id: query parameter is required")
        entry["task_id"] = task_id
        task = self.state.tasks.get(task_id)
        if task is None:
            return error(404, "TASK_NOT_FOUND", "task not found")
        task.polls += 1
        return json_response(200, self._result_body(task, headers))

    def _result_body(self, task: Task, headers: dict[str, str]) -> dict[str, Any]:
        state = self.state
        seen = state.view(task)
        now = state.now()
        debug: dict[str, str] = {"submit_time_ms": str(int(task.created * 1000))}
        if now >= task.started:
            debug["execute_time_ms"] = str(int(task.started * 1000))
        if seen.finished_at is not None:
            debug["complete_time_ms"] = str(int(seen.finished_at * 1000))
        eta = 0
        unfinished = seen.status in (TaskStatus.QUEUED, TaskStatus.PROCESSING)
        if state.config.report_eta and unfinished and task.outcome != "hang":
            # Seconds the client has to wait, on its own clock: real seconds, whatever the time scale.
            eta = math.ceil(task.planned_end - now)
        videos = []
        if seen.status is TaskStatus.SUCCEED:
            ttl = state.config.video_url_ttl
            videos.append(
                {
                    "video_url": self._video_url(task, headers),
                    "video_url_ttl": str(ttl) if state.config.ttl_as_string else ttl,
                    "video_type": "mp4",
                }
            )
        return {
            "task": {
                "task_id": task.task_id,
                "status": seen.status.value,
                "reason": seen.reason,
                "task_type": MODEL_NAME.upper().replace("-", "_").replace(".", "_"),
                "eta": eta,
                "progress_percent": seen.progress,
            },
            "videos": videos,
            "images": [],
            "audios": [],
            "extra": {"seed": str(task.seed), "debug_info": debug},
        }

    def _video_url(self, task: Task, headers: dict[str, str]) -> str:
        base = self.state.config.public_url or f"http://{headers.get('host', 'mock.invalid')}"
        return f"{base.rstrip('/')}/_mock/videos/{task.task_id}.mp4"

    # the test surface
    def _control(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        state = self.state
        if path == "/healthz":
            return json_response(200, {"status": "ok"})
        if path == "/openapi.json":
            return Response(200, self._openapi_document())
        if path.startswith("/_mock/videos/") and method == "GET":
            return self._video(path.removeprefix("/_mock/videos/").removesuffix(".mp4"))
        route = (method, path)
        if route == ("GET", "/_mock/tasks"):
            tasks = list(state.task_summaries())
            return json_response(200, {"count": len(tasks), "tasks": tasks})
        if route == ("GET", "/_mock/requests"):
            return json_response(200, {"count": len(state.journal), "requests": list(state.journal)})
        if route == ("GET", "/_mock/faults"):
            return json_response(200, state.faults.model_dump(mode="json"))
        if route == ("POST", "/_mock/faults"):
            parsed = _parse(Faults, body)
            if isinstance(parsed, Response):
                return parsed
            state.set_faults(parsed)
            return json_response(200, parsed.model_dump(mode="json"))
        if route == ("GET", "/_mock/config"):
            return json_response(200, _public_config(state.config))
        if route == ("POST", "/_mock/config"):
            try:
                patch = json.loads(body or b"{}")
                merged = MockConfig.model_validate({**state.config.model_dump(), **patch})
            except ValidationError as exc:
                return error(400, "INVALID_REQUEST_BODY", validation_message(exc))
            except (ValueError, TypeError):
                return error(400, "INVALID_REQUEST_BODY", "body must be a JSON object")
            state.config = merged
            return json_response(200, _public_config(merged))
        if route == ("POST", "/_mock/reset"):
            state.reset()
            return json_response(200, {"status": "reset"})
        if route == ("POST", "/_mock/advance"):
            try:
                seconds = float(json.loads(body)["seconds"])
            except (ValueError, KeyError, TypeError):
                return error(400, "INVALID_REQUEST_BODY", 'body must be {"seconds": <simulated seconds>}')
            state.advance(seconds)
            return json_response(200, {"advanced": seconds})
        return error(404, "NOT_FOUND", f"no route {method} {path}")

    def _video(self, task_id: str) -> Response:
        task = self.state.tasks.get(task_id)
        if task is None:
            return error(404, "NOT_FOUND", "no such video")
        seen = self.state.view(task)
        if seen.status is not TaskStatus.SUCCEED or seen.finished_at is None:
            return error(404, "NOT_FOUND", "no such video")
        if self.state.now() > seen.finished_at + self.state.config.video_url_ttl:
            return error(403, "ACCESS_DENY", "the video URL has expired")
        return Response(200, FAKE_MP4, [(b"content-type", b"video/mp4")])

    def _openapi_document(self) -> bytes:
        if self._openapi is None:
            self._openapi = resources.files("contracts").joinpath("openapi.json").read_bytes()
        return self._openapi


def _public_config(config: MockConfig) -> dict[str, Any]:
    shown = config.model_dump(mode="json")
    shown["api_key"] = "<set>" if config.api_key else None
    return shown


def _parse(model: type[M], body: bytes) -> M | Response:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        return error(400, "INVALID_REQUEST_BODY", validation_message(exc))


def _injected_status(status: int, faults: Faults) -> Response:
    if status == 429:
        headers = {"Retry-After": retry_after(faults.retry_after)} if faults.retry_after is not None else None
        return error(429, "RATE_LIMIT_EXCEEDED", "rate limit exceeded (injected fault)", headers)
    if status == 400:
        return error(400, "INVALID_REQUEST_BODY", "request rejected (injected 400 fault)")
    reason = "SERVICE_NOT_AVAILABLE" if status == 503 else "INTERNAL_SERVER_ERROR"
    return error(status, reason, f"injected {status} fault")


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def create_app(config: MockConfig | None = None, *, seed: int | None = None) -> MockApp:
    """A fresh mock with its own state."""
    return MockApp(MockState(config, seed=seed))

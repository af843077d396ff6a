"""The mock API: Starlette routes for the two `/v3/async` endpoints and the `/_mock/*` test surface, behind
one middleware that does to API requests what the network and the gateway would.

Every API request passes, in this order: injected latency, an injected fault (connection reset, timeout,
5xx/429, or a garbled answer once the work is done), Bearer auth, then the route: body validation against
the shared `contracts` models, quotas, and the task state. Each lands in the journal with the status it
was answered (`/_mock/*` calls do not).
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator, MutableMapping
from importlib import resources
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts import validation_message
from contracts.api import FRAME_PIXELS, MODEL_NAME, TASK_RESULT_PATH, SubmitRequest, TaskStatus
from mock_server.state import Endpoint, Faults, JournalEntry, MockConfig, MockState, ResultFault, Task
from mock_server.video import Video, parse_range, size_for

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 128 * 1024 * 1024
API_PREFIX = "/v3/async/"
VIDEO_PREFIX = "/_mock/videos/"


class SimulatedReset(Exception):
    """Raised after the answer has started, so the server drops the connection mid-response."""


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(body, status, headers, media_type="application/json")


def error(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """The gateway's flat error body."""
    return json_response(status, {"code": status, "reason": reason, "message": message, "metadata": {}}, headers)


def retry_after(seconds: float) -> str:
    # Whole seconds as HTTP asks; below one second (a scaled-down clock) a decimal, which clients that
    # parse floats honour and integer-only clients read as "retry now".
    if seconds >= 1:
        return str(math.ceil(seconds))
    return f"{max(seconds, 0.001):.3f}"


class MockApp:
    """The ASGI app of one mock; `state` is exposed so in-process tests can look inside."""

    def __init__(self, state: MockState | None = None) -> None:
        self.state = state or MockState()
        routes = _Routes(self.state)
        self._app = FaultsAndJournal(routes.starlette(), self.state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


class FaultsAndJournal:
    """What happens to an API request on the way in: latency, injected faults, auth; and the journal.

    Video downloads pass here too (endpoint `video`, no auth: their URLs stand for pre-signed ones).
    """

    def __init__(self, app: ASGIApp, state: MockState) -> None:
        self._app = app
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if not path.startswith((API_PREFIX, VIDEO_PREFIX)):
            await self._app(scope, receive, send)
            return
        state = self._state
        endpoint: Endpoint = (
            "video" if path.startswith(VIDEO_PREFIX) else "task-result" if path == TASK_RESULT_PATH else "submit"
        )
        entry = JournalEntry(scope["method"], scope["path"], endpoint, state.now())
        scope.setdefault("state", {})["journal"] = entry
        try:
            await self._serve(scope, receive, send, entry)
        except SimulatedReset:
            entry.status = 0
            raise
        except BaseException:
            entry.status = 499  # the client went away (or the mock is stopping) before an answer
            raise
        finally:
            state.record(entry)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, entry: JournalEntry) -> None:
        faults = self._state.faults
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        fault = self._state.roll(entry.endpoint)
        entry.fault = fault
        if fault == "reset":
            # Read the request (the API got it), promise a body, then drop the connection: the client sees
            # the peer vanish mid-answer. (Unread request bytes would make the close a TCP reset instead.)
            while (await receive()).get("more_body", False):
                pass
            headers = [(b"content-type", b"application/json"), (b"content-length", b"64")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            raise SimulatedReset("connection reset by the mock (injected fault)")
        if fault == "timeout":
            await asyncio.sleep(faults.timeout_seconds)
            answer: Response | None = error(504, "GATEWAY_TIMEOUT", "upstream timed out")
        elif fault is not None and fault != "malformed":
            answer = _injected_status(int(fault), faults)
        else:
            answer = self._authenticate(scope) if entry.endpoint != "video" else None
        if answer is not None:
            entry.status = answer.status_code
            await answer(scope, receive, send)
            return
        await self._app(scope, receive, _Recording(send, entry, garble=fault == "malformed"))

    def _authenticate(self, scope: Scope) -> Response | None:
        auth_fault = self._state.faults.auth
        if auth_fault is not None:
            return error(auth_fault.status, auth_fault.reason, auth_fault.message)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return error(401, "FAILED_TO_AUTH", "missing or malformed Authorization header; use Bearer <key>")
        expected = self._state.config.api_key
        if expected is not None and token.strip() != expected:
            return error(403, "INVALID_API_KEY", "the API key is not valid")
        return None


class _Recording:
    """A `send` that notes the answer's status in the journal and, for a garbled answer, halves a 200 body."""

    def __init__(self, send: Send, entry: JournalEntry, *, garble: bool) -> None:
        self._send = send
        self._entry = entry
        self._garble = garble
        self._start: MutableMapping[str, Any] | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._entry.status = message["status"]
            if self._garble and message["status"] == 200:
                self._start = message  # held back until the body is known: its length changes
                return
        elif message["type"] == "http.response.body" and self._start is not None:
            body = message.get("body", b"")
            body = body[: max(1, len(body) // 2)]
            headers = [(k, v) for k, v in self._start["headers"] if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await self._send({**self._start, "headers": headers})
            self._start = None
            message = {"type": "http.response.body", "body": body}
        await self._send(message)


class _Routes:
    """The handlers, over one MockState."""

    def __init__(self, state: MockState) -> None:
        self.state = state
        self._openapi: bytes | None = None

    def starlette(self) -> Starlette:
        return Starlette(
            routes=[
                Route(TASK_RESULT_PATH, self.task_result, methods=["GET"]),
                Route(API_PREFIX + "{model:path}", self.submit, methods=["POST"]),
                Route("/_mock/tasks", self.tasks, methods=["GET"]),
                Route("/_mock/requests", self.requests, methods=["GET"]),
                Route("/_mock/faults", self.faults, methods=["GET", "POST"]),
                Route("/_mock/config", self.config, methods=["GET", "POST"]),
                Route("/_mock/reset", self.reset, methods=["POST"]),
                Route("/_mock/advance", self.advance, methods=["POST"]),
                Route(VIDEO_PREFIX + "{task_id}.mp4", self.video, methods=["GET", "HEAD"]),
                Route("/openapi.json", self.openapi, methods=["GET"]),
                Route("/healthz", self.healthz, methods=["GET"]),
            ],
            exception_handlers={HTTPException: _http_error},
        )

    # the API
    async def submit(self, request: Request) -> Response:
        model = request.path_params["model"]
        if model != MODEL_NAME:
            return error(404, "MODEL_NOT_FOUND", f"model {model!r} not found")
        body = await _read_body(request)
        if body is None:
            return error(413, "INVALID_REQUEST_BODY", f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            payload = json.loads(body)
        except ValueError:
            return error(400, "INVALID_REQUEST_BODY", "request body is not valid JSON")
        try:
            submitted = SubmitRequest.model_validate(payload)
        except ValidationError as exc:
            return error(400, "INVALID_REQUEST_BODY", validation_message(exc))
        entry: JournalEntry = request.state.journal
        entry.tier = submitted.service_tier
        verdict = self.state.check_quota(submitted)
        if verdict is not None:
            return error(429, "RATE_LIMIT_EXCEEDED", verdict.message, {"Retry-After": retry_after(verdict.retry_after)})
        task = self.state.create_task(submitted)
        entry.task_id = task.task_id
        return json_response(200, {"task_id": task.task_id})

    async def task_result(self, request: Request) -> Response:
        task_id = request.query_params.get("task_id", "").strip()
        if not task_id:
            return error(400, "INVALID_REQUEST_BODY", "task_id: query parameter is required")
        request.state.journal.task_id = task_id
        task = self.state.tasks.get(task_id)
        if task is None:
            return error(404, "TASK_NOT_FOUND", "task not found")
        task.polls += 1
        for fault in self.state.faults.task_result:
            if fault.applies(task, self.state.rng):
                request.state.journal.fault = f"task-result:{fault.answer}"
                return self._odd_result(fault, task, request)
        return json_response(200, self._result_body(task, request))

    def _odd_result(self, fault: ResultFault, task: Task, request: Request) -> Response:
        """An answer a client must not take for this task's result (see ResultFault)."""
        if fault.answer == "status":
            return error(fault.status, fault.reason, f"task-result refused (injected {fault.status} fault)")
        if fault.answer == "html":
            page = b"<!doctype html><html><body><h1>Down for maintenance</h1></body></html>"
            return Response(page, 200, media_type="text/html")
        body = self._result_body(task, request)
        if fault.answer == "unknown_status":
            body["task"]["status"] = fault.task_status
            return json_response(200, body)
        others = [t for t in self.state.tasks.values() if t.task_id != task.task_id]
        if others:
            return json_response(200, self._result_body(self.state.rng.choice(others), request))
        body["task"]["task_id"] = str(uuid.UUID(int=self.state.rng.getrandbits(128), version=4))
        return json_response(200, body)

    def _result_body(self, task: Task, request: Request) -> dict[str, Any]:
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
            base = state.config.public_url or f"{request.url.scheme}://{request.headers.get('host', 'mock.invalid')}"
            videos.append(
                {
                    "video_url": f"{base.rstrip('/')}/_mock/videos/{task.task_id}.mp4",
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

    # the test surface
    async def tasks(self, request: Request) -> Response:
        tasks = list(self.state.task_summaries())
        return json_response(200, {"count": len(tasks), "tasks": tasks})

    async def requests(self, request: Request) -> Response:
        journal = [entry.as_json() for entry in self.state.journal]
        return json_response(200, {"count": len(journal), "requests": journal})

    async def faults(self, request: Request) -> Response:
        if request.method == "POST":
            parsed = _parse(Faults, await request.body())
            if isinstance(parsed, Response):
                return parsed
            self.state.set_faults(parsed)
        return json_response(200, self.state.faults.model_dump(mode="json"))

    async def config(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                patch = json.loads(await request.body() or b"{}")
            except ValueError:
                patch = None
            if not isinstance(patch, dict):
                return error(400, "INVALID_REQUEST_BODY", "body must be a JSON object")
            try:
                merged = MockConfig.model_validate(_merge(self.state.config.model_dump(), patch))
            except ValidationError as exc:
                return error(400, "INVALID_REQUEST_BODY", validation_message(exc))
            self.state.config = merged
        shown = self.state.config.model_dump(mode="json")
        shown["api_key"] = "<set>" if self.state.config.api_key else None
        return json_response(200, shown)

    async def reset(self, request: Request) -> Response:
        self.state.reset()
        return json_response(200, {"status": "reset"})

    async def advance(self, request: Request) -> Response:
        try:
            seconds = float(json.loads(await request.body())["seconds"])
        except (ValueError, KeyError, TypeError):
            return error(400, "INVALID_REQUEST_BODY", 'body must be {"seconds": <simulated seconds>}')
        self.state.advance(seconds)
        return json_response(200, {"advanced": seconds})

    async def video(self, request: Request) -> Response:
        """The task's MP4, whole or one byte range, until `video_url_ttl` seconds after the task finished."""
        task = self.state.tasks.get(request.path_params["task_id"])
        seen = self.state.view(task) if task is not None else None
        if task is None or seen is None or seen.status is not TaskStatus.SUCCEED or seen.finished_at is None:
            return error(404, "NOT_FOUND", "no such video")
        if self.state.now() > seen.finished_at + self.state.config.video_url_ttl:
            return error(403, "ACCESS_DENY", "the video URL has expired")
        request_ = task.request
        pixels = FRAME_PIXELS[request_.resolution] / FRAME_PIXELS["720p"]
        size = size_for(request_.duration, pixels, self.state.config.video_bytes_per_second)
        video = Video(task.task_id, size, request_.duration)
        headers = {"accept-ranges": "bytes", "etag": f'"{task.task_id}"', "content-type": "video/mp4"}
        wanted = parse_range(request.headers.get("range"), video.size)
        if wanted == "unsatisfiable":
            return Response(b"", 416, {**headers, "content-range": f"bytes */{video.size}"})
        start, end, status = (0, video.size, 200) if wanted is None else (*wanted, 206)
        headers["content-length"] = str(end - start)
        if status == 206:
            headers["content-range"] = f"bytes {start}-{end - 1}/{video.size}"
        if request.method == "HEAD":
            return Response(b"", status, headers)

        bandwidth = self.state.faults.video_bandwidth

        async def body() -> AsyncIterator[bytes]:
            for chunk in video.read(start, end):
                yield chunk
                if bandwidth:
                    await asyncio.sleep(len(chunk) / bandwidth)

        return StreamingResponse(body(), status, headers)

    async def openapi(self, request: Request) -> Response:
        if self._openapi is None:
            self._openapi = resources.files("contracts").joinpath("openapi.json").read_bytes()
        return Response(self._openapi, 200, media_type="application/json")

    async def healthz(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405, in the gateway's flat error body."""
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    if exc.status_code == 405:
        allowed = exc.headers.get("Allow", "") if exc.headers else ""
        return error(405, "METHOD_NOT_ALLOWED", f"{request.method} is not allowed on {request.url.path}; use {allowed}")
    if exc.status_code == 404:
        return error(404, "NOT_FOUND", f"no route {request.method} {request.url.path}")
    return error(exc.status_code, "ERROR", str(exc.detail))


async def _read_body(request: Request) -> bytes | None:
    """The request body, or None past MAX_BODY_BYTES (read no further than that)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`base` with `patch` merged in deeply: a partial `quotas.default` changes only the keys it names."""
    merged = dict(base)
    for key, value in patch.items():
        old = merged.get(key)
        merged[key] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def _parse(model: type[M], body: bytes) -> M | Response:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        return error(400, "INVALID_REQUEST_BODY", validation_message(exc))


INJECTED_REASONS = {
    400: "INVALID_REQUEST_BODY",
    401: "FAILED_TO_AUTH",
    403: "ACCESS_DENY",
    404: "NOT_FOUND",
    409: "CONFLICT",
    422: "UNPROCESSABLE_ENTITY",
    503: "SERVICE_NOT_AVAILABLE",
}


def _injected_status(status: int, faults: Faults) -> Response:
    if status == 429:
        headers = {"Retry-After": retry_after(faults.retry_after)} if faults.retry_after is not None else None
        return error(429, "RATE_LIMIT_EXCEEDED", "rate limit exceeded (injected fault)", headers)
    reason = INJECTED_REASONS.get(status, "INTERNAL_SERVER_ERROR" if status >= 500 else "BAD_REQUEST")
    return error(status, reason, f"request rejected (injected {status} fault)")


def create_app(config: MockConfig | None = None, *, seed: int | None = None) -> MockApp:
    """A fresh mock with its own state."""
    return MockApp(MockState(config, seed=seed))

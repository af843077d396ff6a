"""The API as the worker sees it: one request per call, every failure mapped onto `worker.errors`.

Retrying is the caller's business (it knows the job's deadline); this module only says what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import Callable
from datetime import UTC
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from contracts.api import SUBMIT_PATH, TASK_RESULT_PATH, ErrorBody, SubmitRequest, SubmitResponse, TaskResult
from worker.errors import (
    AnswerLost,
    ApiError,
    ConfigurationFault,
    PermanentApiError,
    RateLimited,
    ResultRefused,
    TransientApiError,
)
from worker.http_clients import TRANSPORT_ERRORS, never_sent, timed_out
from worker.metrics import Metrics

MAX_MESSAGE = 500
# A task id no task can have: asking for its result costs nothing and says whether the key is accepted.
ACCESS_PROBE_TASK_ID = "seedance-access-check-0000"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds (decimals accepted) or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now if now is not None else time.time()
    return max(0.0, when.timestamp() - reference)


def error_from_response(endpoint: str, response: httpx.Response) -> ApiError:
    """The error an answer outside 2xx stands for (see the tree in worker.errors)."""
    status = response.status_code
    try:
        body = ErrorBody.model_validate_json(response.content)
        reason, message = body.reason, body.message[:MAX_MESSAGE]
    except ValidationError:
        reason, message = "", response.text[:MAX_MESSAGE] or response.reason_phrase
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return RateLimited(endpoint, message, status=status, reason=reason, retry_after=retry_after)
    if status in (401, 403) or (status == 404 and endpoint == "submit"):
        return ConfigurationFault(endpoint, message, status=status, reason=reason)
    if status >= 500 or status == 408:
        return TransientApiError(endpoint, message, status=status, reason=reason)
    if endpoint == "task-result":
        return ResultRefused(endpoint, message, status=status, reason=reason)
    return PermanentApiError(endpoint, message, status=status, reason=reason)


class ApiClient:
    """Calls the two endpoints with the current key, through an `httpx.AsyncClient` (worker.http_clients
    builds the worker's; tests pass one over `mock_server.testing.InProcessTransport`, respx or a socket).

    `api_key` is asked at every access check (at start-up, and after each refusal) and while no key is
    known, never per request: a rotated key file takes effect when the API refuses the old key. Every request
    is bounded as a whole by `total_seconds` besides the client's per-phase timeouts: a body that trickles
    in a byte at a time never holds a job.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        api_key: Callable[[], str | None],
        metrics: Metrics,
        *,
        total_seconds: float = 60.0,
    ) -> None:
        self._client = client
        base = httpx.URL(base_url)
        self._submit_url = base.join(SUBMIT_PATH)
        self._result_url = str(base.join(TASK_RESULT_PATH))
        self._api_key = api_key
        self._key: str | None = None  # as last read; read again by check_access()
        self._metrics = metrics
        self._total = total_seconds
        self._model_missing = False
        self._requests = {e: metrics.api_requests.labels(e, "200") for e in ("submit", "task-result")}
        self._durations = {e: metrics.api_duration.labels(e) for e in ("submit", "task-result")}

    async def submit(self, request: SubmitRequest) -> str:
        """Submit one task and return its id."""
        body = request.model_dump_json(exclude_none=True).encode()
        try:
            response = await self._send("submit", "POST", self._submit_url, body)
        except ConfigurationFault as exc:
            self._model_missing = exc.status == 404
            raise
        try:
            return SubmitResponse.model_validate_json(response.content).task_id
        except ValidationError:
            # The API said 2xx: the task may exist, but its id is lost with the answer.
            raise AnswerLost("submit", "answer is not a task id", reason="malformed") from None

    async def task_result(self, task_id: str) -> TaskResult:
        """The task's result; AnswerLost when the answer is no task result, or the result of another task
        (never to be used: it would hand one job another job's video)."""
        url = httpx.URL(f"{self._result_url}?task_id={quote(task_id, safe='')}")  # cheaper than copy_with
        response = await self._send("task-result", "GET", url)
        try:
            result = TaskResult.model_validate_json(response.content)
        except ValidationError:
            raise AnswerLost("task-result", "answer is not a task result", reason="malformed") from None
        if result.task.task_id != task_id:
            raise AnswerLost("task-result", "answer is the result of another task", reason="wrong_task")
        return result

    async def check_access(self) -> None:
        """Return when the API accepts the key; raise ConfigurationFault while the key, account or model is
        unusable, and TransientApiError while the API cannot say.

        Asks for the result of a task id that cannot exist: 404 (or any other refusal of the request
        itself) means the key was accepted, 401/403 that it was not. Nothing is created, nothing billed.
        After a submit found the model missing, an empty submit checks the model as well (400: it exists).
        """
        self._key = self._api_key()  # a rotated key file is read here
        with contextlib.suppress(PermanentApiError):
            await self._send("task-result", "GET", httpx.URL(f"{self._result_url}?task_id={ACCESS_PROBE_TASK_ID}"))
        if self._model_missing:
            with contextlib.suppress(PermanentApiError):
                await self._send("submit", "POST", self._submit_url, b"{}")
            self._model_missing = False

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _send(self, endpoint: str, method: str, url: httpx.URL, body: bytes | None = None) -> httpx.Response:
        key = self._key
        if key is None:
            key = self._key = self._api_key()
        if not key:
            raise ConfigurationFault(
                endpoint, "no API key configured (set SEEDANCE_API_KEY or SEEDANCE_API_KEY_FILE)", reason="NO_API_KEY"
            )
        headers = {"Authorization": f"Bearer {key}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._total):
                response = await self._client.request(method, url, headers=headers, content=body)
        except TimeoutError:
            self._observe(endpoint, "timeout", started)
            raise AnswerLost(
                endpoint,
                f"no whole answer within {self._total:.0f} s; the request may have been acted on",
                reason="timeout",
            ) from None
        except TRANSPORT_ERRORS as exc:
            reason = "timeout" if timed_out(exc) else "transport"
            self._observe(endpoint, reason, started)
            if never_sent(exc):
                raise TransientApiError(endpoint, f"request not sent ({type(exc).__name__})", reason=reason) from None
            # Read, protocol and decoding errors: the connection failed after the request went out.
            raise AnswerLost(
                endpoint, f"answer lost ({type(exc).__name__}); the request may have been acted on", reason=reason
            ) from None
        if not 200 <= response.status_code < 300:
            self._observe(endpoint, str(response.status_code), started)
            raise error_from_response(endpoint, response)
        self._requests[endpoint].inc()
        self._durations[endpoint].observe(time.perf_counter() - started)
        return response

    def _observe(self, endpoint: str, code: str, started: float) -> None:
        self._metrics.api_requests.labels(endpoint, code).inc()
        self._metrics.api_duration.labels(endpoint).observe(time.perf_counter() - started)

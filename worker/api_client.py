"""The API as the worker sees it: one request per call, every failure mapped onto `worker.errors`.

Retrying is the caller's business (it knows the job's deadline); this module only says what happened.
"""

from __future__ import annotations

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
    TaskNotFound,
    TransientApiError,
)
from worker.metrics import Metrics

MAX_MESSAGE = 500
USER_AGENT = "seedance-worker"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


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
    """The error a non-200 answer stands for (see the tree in worker.errors)."""
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
    if status == 404:
        return TaskNotFound(endpoint, message, status=status, reason=reason)
    if status >= 500 or status == 408:
        return TransientApiError(endpoint, message, status=status, reason=reason)
    return PermanentApiError(endpoint, message, status=status, reason=reason)


class ApiClient:
    """Calls the two endpoints with the current key, over an httpx transport (worker.transport's aiohttp
    one, httpx's own, or a test's: `mock_server.testing.InProcessTransport`, respx).

    Requests go straight to the transport as `httpx.Request`s: an `httpx.AsyncClient` around it would add
    URL merging, cookie handling and redirect logic the API never needs, and a third of the worker's CPU
    per request. `api_key` is asked on every call, so a rotated key file takes effect without a restart.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        base_url: str,
        api_key: Callable[[], str | None],
        metrics: Metrics,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        self._transport = transport
        base = httpx.URL(base_url)
        self._submit_url = base.join(SUBMIT_PATH)
        self._result_url = str(base.join(TASK_RESULT_PATH))
        self._api_key = api_key
        self._metrics = metrics
        self._extensions = {"timeout": timeout.as_dict()}
        self._requests = {e: metrics.api_requests.labels(e, "200") for e in ("submit", "task-result")}
        self._durations = {e: metrics.api_duration.labels(e) for e in ("submit", "task-result")}

    async def submit(self, request: SubmitRequest) -> str:
        """Submit one task and return its id."""
        body = request.model_dump_json(exclude_none=True).encode()
        response = await self._send("submit", "POST", self._submit_url, body)
        try:
            return SubmitResponse.model_validate_json(response.content).task_id
        except ValidationError:
            # The API said 200: the task exists, but its id is lost with the answer.
            raise AnswerLost("submit", "answer is not a task id", reason="malformed") from None

    async def task_result(self, task_id: str) -> TaskResult:
        url = httpx.URL(f"{self._result_url}?task_id={quote(task_id, safe='')}")  # cheaper than copy_with
        response = await self._send("task-result", "GET", url)
        try:
            return TaskResult.model_validate_json(response.content)
        except ValidationError:
            raise AnswerLost("task-result", "answer is not a task result", reason="malformed") from None

    async def check_access(self) -> None:
        """Raise ConfigurationFault while the key, account or model is unusable.

        Sends an empty submit: a working key on an existing model gets 400 (nothing is created, nothing
        billed); a bad key 401/403, a missing model 404.
        """
        try:
            await self._send("submit", "POST", self._submit_url, b"{}")
        except PermanentApiError:
            return

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _send(self, endpoint: str, method: str, url: httpx.URL, body: bytes | None = None) -> httpx.Response:
        key = self._api_key()
        if not key:
            raise ConfigurationFault(endpoint, "no API key configured", reason="NO_API_KEY")
        headers = {"Authorization": f"Bearer {key}", "User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = httpx.Request(method, url, headers=headers, content=body, extensions=self._extensions)
        started = time.perf_counter()
        try:
            response = await self._transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        except (httpx.ConnectTimeout, httpx.PoolTimeout, httpx.WriteTimeout) as exc:
            # Never sent whole: the API cannot have acted on it.
            self._observe(endpoint, "timeout", started)
            raise TransientApiError(endpoint, f"request not sent ({type(exc).__name__})", reason="timeout") from None
        except httpx.ReadTimeout:
            self._observe(endpoint, "timeout", started)
            raise AnswerLost(
                endpoint, "no answer in time; the request may have been acted on", reason="timeout"
            ) from None
        except (httpx.ConnectError, httpx.WriteError, httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
            self._observe(endpoint, "transport", started)
            raise TransientApiError(endpoint, f"request not sent ({type(exc).__name__})", reason="transport") from None
        except httpx.RequestError as exc:
            # Read, protocol and decoding errors: the connection failed after the request went out.
            self._observe(endpoint, "transport", started)
            raise AnswerLost(endpoint, f"answer lost ({type(exc).__name__})", reason="transport") from None
        if response.status_code != 200:
            self._observe(endpoint, str(response.status_code), started)
            raise error_from_response(endpoint, response)
        self._requests[endpoint].inc()
        self._durations[endpoint].observe(time.perf_counter() - started)
        return response

    def _observe(self, endpoint: str, code: str, started: float) -> None:
        self._metrics.api_requests.labels(endpoint, code).inc()
        self._metrics.api_duration.labels(endpoint).observe(time.perf_counter() - started)

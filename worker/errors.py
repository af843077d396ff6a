"""Errors of the worker. Each branch of the tree maps to one broker action and one event outcome:

    WorkerError
    ├── InvalidJob            the message cannot become a job  -> dead-letter, `rejected` event, ack
    └── ApiError              the API answered badly or not at all (carries endpoint, status, reason)
        ├── TransientApiError     429, 5xx, timeout, reset, garbled answer -> back off and retry
        │   └── RateLimited           429: also closes the tier's gate until Retry-After
        ├── PermanentApiError     400 and other 4xx -> the job fails with the API's message
        │   └── TaskNotFound          404 on a task id: retried a few times, then the job fails
        └── ConfigurationFault    401, 403, 404 model -> no job fails: stop taking jobs until the key works

`ApiError` messages carry the API's own message (which may echo request fields, never the key); the
worker never puts the Authorization header or image data in an exception.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""


class InvalidJob(WorkerError):
    """A message that is not a valid job; `reason` is a short label (metrics), `job_id` when readable."""

    def __init__(self, reason: str, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.job_id = job_id


class ApiError(WorkerError):
    """The API did not do what was asked."""

    def __init__(
        self,
        endpoint: str,
        message: str,
        *,
        status: int | None = None,
        reason: str = "",
        retry_after: float | None = None,
    ) -> None:
        where = f"{endpoint}: HTTP {status}" if status is not None else endpoint
        super().__init__(f"{where} {reason}: {message}".replace("  ", " "))
        self.endpoint = endpoint
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class TransientApiError(ApiError):
    """Worth retrying after a back-off: 429, 5xx, timeouts, connection resets, unreadable answers."""

    @property
    def label(self) -> str:
        """A small fixed label for metrics: the status code, or the kind of transport fault."""
        return str(self.status) if self.status is not None else self.reason or "transport"


class RateLimited(TransientApiError):
    """429: a quota of the tier is exhausted for now."""


class PermanentApiError(ApiError):
    """The API refused the request itself; sending it again cannot help."""


class TaskNotFound(PermanentApiError):
    """The API knows no task with this id."""


class ConfigurationFault(ApiError):
    """The key, the account or the model is wrong: no job is to blame."""

"""Errors of the worker. Each branch of the tree maps to one broker action and one event outcome:

    WorkerError
    ├── InvalidJob            the message cannot become a job  -> dead-letter, `rejected` event, ack
    ├── LimitReached          a tier's limit is full for now   -> hold the job, or put it back in its queue
    ├── StorageError          copying a finished video into SEEDANCE_STORAGE_URL did not work
    │   ├── VideoGone             the gateway's URL answers 403/404/410: no copy can ever be made
    │   │                         -> `succeeded` with `stored_video: null` and `storage_error`
    │   ├── CopyFailed            the source or the store failed, or the stored bytes did not match
    │   │                         -> copy again after a back-off, while the gateway's URL lives
    │   └── StoreRefused          the store refuses our credentials -> configuration fault: pause, fail nothing
    └── ApiError              the API answered badly or not at all (carries endpoint, status, reason)
        ├── TransientApiError     429, 5xx, timeout, reset, garbled answer -> back off and retry
        │   ├── RateLimited           429: also closes the tier's gate until Retry-After
        │   └── AnswerLost            the request reached the API, its answer did not reach us: the task
        │                             may exist, so a retry may pay twice (SEEDANCE_AMBIGUOUS_SUBMIT)
        ├── PermanentApiError     400 and other 4xx on a submit -> the job fails with the API's message
        │   └── ResultRefused         a task-result answered 400, 404, 409, 422 or another 4xx: polled again
        │                             with back-off for SEEDANCE_POLL_REFUSED_MAX_SECONDS, then the job
        │                             fails with the API's reason
        └── ConfigurationFault    401, 403, 404 model -> no job fails: stop taking jobs until the key works

`ApiError` messages carry the API's own message (which may echo request fields, never the key); the
worker never puts the Authorization header or image data in an exception.
"""

from __future__ import annotations

from typing import Literal, get_args

# Why a message could not become a job; also the label values of `seedance_jobs_rejected_total`.
RejectReason = Literal["invalid_json", "schema", "oversize", "invalid_state", "invalid_cancel"]
REJECT_REASONS: tuple[RejectReason, ...] = get_args(RejectReason)


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""


class InvalidJob(WorkerError):
    """A message that is not a valid job: `reason` from a fixed set, `job_id` when one could be read."""

    def __init__(self, reason: RejectReason, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.reason: RejectReason = reason
        self.message = message
        self.job_id = job_id


class LimitReached(WorkerError):
    """A limit of the tier (requests per minute, tasks in flight, tokens per day) is full for `wait` seconds."""

    def __init__(self, limit: str, wait: float) -> None:
        super().__init__(f"{limit} limit reached; retry in {wait:.2f} s")
        self.limit = limit
        self.wait = wait


class StorageError(WorkerError):
    """The video could not be copied; `reason` is a small fixed label (metrics)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class VideoGone(StorageError):
    """The gateway no longer serves the video (its URL expired, or the video was removed)."""


class CopyFailed(StorageError):
    """A copy attempt failed in a way another attempt may not."""


class StoreRefused(StorageError):
    """The store refuses the credentials (or the configuration) it was given: no video is to blame."""


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

    @property
    def summary(self) -> str:
        """One line for logs and /readyz: status, reason and message, or the worker's own words."""
        if self.status is None:
            return self.message
        return f"HTTP {self.status} {self.reason}: {self.message}".replace(" :", ":")


class TransientApiError(ApiError):
    """Worth retrying after a back-off: 429, 5xx, timeouts, connection resets, unreadable answers."""

    @property
    def label(self) -> str:
        """A small fixed label for metrics: the status code, or the kind of transport fault."""
        return str(self.status) if self.status is not None else self.reason or "transport"


class RateLimited(TransientApiError):
    """429: a quota of the tier is exhausted for now."""


class AnswerLost(TransientApiError):
    """The request was sent but its answer was lost (timeout, reset mid-answer, garbled body)."""


class PermanentApiError(ApiError):
    """The API refused the request itself; sending it again cannot help."""


class ResultRefused(PermanentApiError):
    """The API refused a task-result request (it may not know the task yet, or any more)."""


class ConfigurationFault(ApiError):
    """The key, the account or the model is wrong: no job is to blame."""


__all__ = [
    "REJECT_REASONS",
    "AnswerLost",
    "ApiError",
    "ConfigurationFault",
    "CopyFailed",
    "InvalidJob",
    "LimitReached",
    "PermanentApiError",
    "RateLimited",
    "RejectReason",
    "ResultRefused",
    "StorageError",
    "StoreRefused",
    "TransientApiError",
    "VideoGone",
    "WorkerError",
]

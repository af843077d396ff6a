"""Wire models of the message bus: the job message producers publish to `seedance.jobs` and the event the
worker publishes to `seedance.events` (and to a job's `reply_to`)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, JsonValue

from contracts.api import ServiceTier, SubmitRequest

JOBS_EXCHANGE = "seedance.jobs"
EVENTS_EXCHANGE = "seedance.events"
DEAD_LETTER_QUEUE = "seedance.jobs.dead"
CANCEL_ROUTING_KEY = "job.cancel"
TIERS: tuple[ServiceTier, ...] = ("default", "flex")

JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
METADATA_MAX_BYTES = 16 * 1024
METADATA_MAX_DEPTH = 32

# The one definition of event statuses: the last five end a job, and every job ends in exactly one of them.
TerminalStatus = Literal["succeeded", "failed", "expired", "rejected", "cancelled"]
EventStatus = Literal["submitted", "progress", TerminalStatus]
TERMINAL_STATUSES: tuple[TerminalStatus, ...] = get_args(TerminalStatus)
EVENT_STATUSES: tuple[str, ...] = ("submitted", "progress", *TERMINAL_STATUSES)


def _depth(value: object) -> int:
    """How deeply containers nest in a JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level + 1)
            stack.extend((child, level + 1) for child in children)
    return deepest


def _small_metadata(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    if _depth(value) > METADATA_MAX_DEPTH:
        raise ValueError(f"metadata nests deeper than {METADATA_MAX_DEPTH} levels")
    size = len(json.dumps(value, separators=(",", ":")).encode())
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"metadata is {size} bytes serialised; at most {METADATA_MAX_BYTES} allowed")
    return value


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _rfc3339_text(value: object) -> object:
    # pydantic would read a number (or a string of digits) as a Unix time; the contract says RFC 3339.
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str) or _RFC3339.match(value) is None:
        raise ValueError("must be an RFC 3339 date-time string with an offset, e.g. 2026-11-24T10:00:00Z")
    return value


Metadata = Annotated[dict[str, JsonValue], AfterValidator(_small_metadata)]
CreatedAt = Annotated[AwareDatetime | None, BeforeValidator(_rfc3339_text)]


class JobMessage(BaseModel):
    """A job as producers publish it to `seedance.jobs` (routing key `job.default` or `job.flex`).

    `extra="forbid"`: a producer's misspelt top-level field would otherwise vanish without a trace; the
    job is dead-lettered with the field named instead.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN, description="Caller-chosen id, echoed on every event.")
    request: SubmitRequest = Field(description="Exactly the submit body of the API.")
    metadata: Metadata = Field(
        default_factory=dict,
        description=f"Small JSON object echoed back verbatim on every event (at most {METADATA_MAX_BYTES} bytes "
        f"serialised, {METADATA_MAX_DEPTH} levels deep).",
    )
    created_at: CreatedAt = Field(
        default=None,
        description="When the job was created (RFC 3339 with offset); default: the AMQP timestamp, "
        "else arrival. The deadline is created_at + request.execution_expires_after.",
    )


class CancelRequest(BaseModel):
    """A producer's request to take a job back, published to `seedance.jobs` with routing key `job.cancel`.

    A job not yet submitted then ends `cancelled` (code CANCELLED) at no cost; a submitted one ends
    `cancelled` with code CANCELLED_AFTER_SUBMIT and its task id (it may still be billed); a job already
    ended is left alone. Cancels are remembered for 72 h, so one may arrive before its job.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN, description="The id of the job to cancel.")
    reason: str | None = Field(default=None, max_length=1000, description="Why, echoed in the event's error.")


class EventError(BaseModel):
    """Why a job did not succeed. `code` is the API's reason token or one of the worker's own
    (INVALID_JOB, DEADLINE_EXCEEDED, TASK_EXPIRED, RETRIES_EXHAUSTED, CANCELLED, CANCELLED_AFTER_SUBMIT)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    code: str
    message: str


class StoredVideo(BaseModel):
    """Where the worker keeps a job's video (with `SEEDANCE_STORAGE_URL` set), verified after the copy."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    url: str = Field(description="The object's store URL, e.g. s3://bucket/prefix/<job_id>/<task_id>.mp4.")
    bytes: int = Field(ge=0, description="Size of the stored object.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the stored bytes, in hex.")
    content_type: str = "video/mp4"


class JobEvent(BaseModel):
    """What the worker publishes to `seedance.events` with routing key `job.<status>`.

    `extra="ignore"` so consumers built against this model keep working when fields are added.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str
    status: EventStatus
    task_id: str | None = Field(default=None, description="Null when the job never reached the API.")
    service_tier: ServiceTier | None = None
    video_url: str | None = None
    video_url_expires_at: datetime | None = Field(
        default=None, description="When the video URL stops working (the gateway's URLs last about 1 h)."
    )
    progress_percent: int | None = None
    error: EventError | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None
    deadline: datetime | None = None
    submitted_at: datetime | None = None
    finished_at: datetime | None = None
    emitted_at: datetime | None = None
    attempts: int = Field(default=0, description="Submit requests sent to the API for this job.")
    polls: int = Field(default=0, description="Task-result requests sent for this job.")
    billed_tokens: int | None = Field(default=None, description="Tokens billed, on success.")
    stored_video: StoredVideo | None = Field(
        default=None, description="On success with a store configured: the verified copy of the video."
    )
    storage_error: EventError | None = Field(
        default=None,
        description="On success with a store configured, when no copy could be made before the gateway's URL "
        "expired or the source refused it (code VIDEO_UNAVAILABLE, VIDEO_URL_EXPIRED or STORAGE_NOT_CONFIGURED).",
    )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

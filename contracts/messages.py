"""Wire models of the message bus: the job message producers publish to `seedance.jobs` and the event the
worker publishes to `seedance.events` (and to a job's `reply_to`)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, JsonValue

from contracts.api import ServiceTier, SubmitRequest

JOBS_EXCHANGE = "seedance.jobs"
EVENTS_EXCHANGE = "seedance.events"
DEAD_LETTER_QUEUE = "seedance.jobs.dead"
TIERS: tuple[ServiceTier, ...] = ("default", "flex")

JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
METADATA_MAX_BYTES = 16 * 1024

EventStatus = Literal["submitted", "progress", "succeeded", "failed", "expired", "rejected"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "expired", "rejected"})


def _small_metadata(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    size = len(json.dumps(value, separators=(",", ":")).encode())
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"metadata is {size} bytes serialised; at most {METADATA_MAX_BYTES} allowed")
    return value


Metadata = Annotated[dict[str, JsonValue], AfterValidator(_small_metadata)]


class JobMessage(BaseModel):
    """A job as producers publish it to `seedance.jobs` (routing key `job.default` or `job.flex`).

    `extra="forbid"`: a producer's misspelt top-level field would otherwise vanish without a trace; the
    job is dead-lettered with the field named instead.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN, description="Caller-chosen id, echoed on every event.")
    request: SubmitRequest = Field(description="Exactly the submit body of the API.")
    metadata: Metadata = Field(
        default_factory=dict, description="Small JSON object echoed back verbatim on every event."
    )
    created_at: AwareDatetime | None = Field(
        default=None,
        description="When the job was created (RFC 3339 with offset); default: the AMQP timestamp, "
        "else arrival. The deadline is created_at + request.execution_expires_after.",
    )


class EventError(BaseModel):
    """Why a job did not succeed. `code` is the API's reason token or one of the worker's own
    (INVALID_JOB, DEADLINE_EXCEEDED, TASK_EXPIRED, RETRIES_EXHAUSTED)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    code: str
    message: str


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

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

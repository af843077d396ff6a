"""Completion events, built from a job's tracking state. Pure functions; publishing is the consumer's."""

from __future__ import annotations

from datetime import datetime

from contracts.messages import TERMINAL_STATUSES, EventError, EventStatus, JobEvent, StoredVideo
from worker.tracking import TrackingState


def event(
    state: TrackingState,
    status: EventStatus,
    now: datetime,
    *,
    error: EventError | None = None,
    progress: int | None = None,
    stored_video: StoredVideo | None = None,
    storage_error: EventError | None = None,
) -> JobEvent:
    """The event of `status` for this job as it stands at `now` (a success carries the state's video)."""
    succeeded = status == "succeeded"
    terminal = status in TERMINAL_STATUSES
    # Every value comes from a validated tracking state or from this worker: constructed, not validated
    # again (an event is built for every step of every job).
    return JobEvent.model_construct(
        job_id=state.job_id,
        status=status,
        task_id=state.task_id,
        service_tier=state.tier,
        video_url=state.video_url if succeeded else None,
        video_url_expires_at=state.video_url_expires_at if succeeded else None,
        progress_percent=progress,
        error=error,
        metadata=state.metadata,
        created_at=state.created_at,
        deadline=state.deadline,
        submitted_at=state.submitted_at,
        finished_at=now if terminal else None,
        emitted_at=now,
        attempts=state.attempts,
        polls=state.polls,
        billed_tokens=state.tokens if succeeded else None,
        stored_video=stored_video,
        storage_error=storage_error,
    )


def error(code: str, message: str) -> EventError:
    return EventError(code=code, message=message[:1000])


def rejected(job_id: str, why: EventError, now: datetime) -> JobEvent:
    """The event of a message that could not become a job: nothing but its id is known."""
    return JobEvent(job_id=job_id, status="rejected", error=why, created_at=now, finished_at=now, emitted_at=now)

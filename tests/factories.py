"""Small builders shared by unit and integration tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from worker.settings import TierSettings
from worker.tracking import TrackingState


def tier_settings(**fields: Any) -> TierSettings:
    """The default tier's settings as documented (600 a minute, 10 running, 5 queued ahead), with `fields`
    changed."""
    values: dict[str, Any] = {
        "name": "default",
        "rpm": 600,
        "max_in_flight": 10,
        "queue_ahead": 5,
        "daily_tokens": None,
        "prefetch": 8,
        "expected_seconds": 60.0,
        "poll_min_seconds": 2.0,
        "poll_max_seconds": 15.0,
    }
    values.update(fields)
    return TierSettings(**values)


def waiting_for_the_copy(job_id: str, task_id: str, **fields: Any) -> TrackingState:
    """The tracking state of a task that succeeded, its video waiting for the copy stage (`fields` changed)."""
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "job_id": job_id,
        "tier": "default",
        "task_id": task_id,
        "created_at": now,
        "deadline": now + timedelta(hours=1),
        "duration": 5,
        "resolution": "720p",
        "generate_audio": True,
        "tokens": 1,
        "stage": "store",
        "video_url": "https://example.com/v.mp4",
    }
    values.update(fields)
    return TrackingState(**values)

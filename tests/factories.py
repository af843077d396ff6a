"""Small builders shared by unit and integration tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from worker.limits import PermitsUnreachable
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


def tracking_state(job_id: str, **fields: Any) -> TrackingState:
    """The tracking state of a default-tier job read a moment ago, due within the hour (`fields` changed)."""
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "job_id": job_id,
        "tier": "default",
        "created_at": now,
        "deadline": now + timedelta(hours=1),
        "duration": 5,
        "resolution": "720p",
        "generate_audio": True,
        "tokens": 1,
    }
    values.update(fields)
    return TrackingState(**values)


def waiting_for_the_copy(job_id: str, task_id: str, **fields: Any) -> TrackingState:
    """The tracking state of a task that succeeded, its video waiting for the copy stage (`fields` changed)."""
    copy_stage = {"task_id": task_id, "stage": "store", "video_url": "https://example.com/v.mp4"}
    return tracking_state(job_id, **{**copy_stage, **fields})


class Pool:
    """The broker side of one slot pool, as worker.limits.Permits offers it: the test decides whether a
    put goes through, is never sent, or gets no confirm, and whether the connection is up."""

    def __init__(self, free: int, *, new: bool = False, refusing: int = 0) -> None:
        self.free = free
        self.new = new  # the pool was not there: declare made it
        self.refusing = refusing  # puts nacked first, as by a quorum queue still starting
        self.connected = True
        self.batches: list[int] = []  # the size of each put_many, in order
        self.failure: PermitsUnreachable | None = None

    async def declare(self, name: str, arguments: dict[str, object]) -> bool:
        return self.new

    async def put(self, queue: str, body: bytes = b"") -> bool:
        if self.failure is not None:
            raise self.failure
        if self.refusing:
            self.refusing -= 1
            return False
        self.free += 1
        return True

    async def put_many(self, queue: str, count: int) -> int:
        self.batches.append(count)
        return sum([await self.put(queue) for _ in range(count)])

    async def take(self, queue: str) -> bool:
        if self.failure is not None:
            raise self.failure
        if not self.free:
            return False
        self.free -= 1
        return True

    async def count(self, queue: str) -> int:
        if self.failure is not None:
            raise self.failure
        return self.free

"""Task tracking without held deliveries: the state of a job lives in a RabbitMQ message that travels
through delay queues (one per delay level, each with a queue-wide TTL that dead-letters back to the tier's
tracking queue) until its task ends. This module holds that state and decides when the next poll is due.

Why per-level queues: RabbitMQ only expires messages at the head of a queue, so per-message TTLs in one
shared queue would let a long delay hold up every short one behind it. With one TTL per queue, every
message in it expires in arrival order, exactly on time. A wait longer than the largest level, or between
two levels, takes several hops: each hop lands, sees it is early, and goes out again for the rest.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.api import ServiceTier, TaskResult, TaskStatus
from worker.settings import Settings

RESOLUTION_FACTOR = {"480p": 0.6, "720p": 1.0, "1080p": 1.8}
STATE_VERSION = 1


class TrackingState(BaseModel):
    """Everything needed to continue a job on any replica. It never holds the request's images.

    `extra="ignore"` so a replica of an older version can still read a state written by a newer one
    during a rolling update.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = STATE_VERSION
    job_id: str
    tier: ServiceTier
    task_id: str | None = None
    created_at: datetime
    deadline: datetime
    submitted_at: datetime | None = None
    duration: int
    resolution: str
    generate_audio: bool
    tokens: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    reply_to: str | None = None
    correlation_id: str | None = None
    attempts: int = 0
    polls: int = 0
    poll_errors: int = 0
    # Since when the API has refused this task's result (a 4xx other than 401/403/429), None when it has not.
    refused_since: datetime | None = None
    progress: int = 0
    progress_event_at: datetime | None = None
    interval: float = 0.0
    next_poll_at: datetime | None = None
    # After the task succeeded, with a store configured: the copy stage (its own queues, see worker.storage).
    stage: Literal["poll", "store"] = "poll"
    video_url: str | None = None
    video_url_expires_at: datetime | None = None
    store_attempts: int = 0
    # The job ended `cancelled` after its submission: its task is followed to its end without more events.
    cancelled: bool = False


class PollSchedule:
    """When to poll a task: first when it could plausibly be done, then at intervals that follow what
    the API reports (eta, progress), bounded per tier (default tight, flex loose), never past the deadline.

    "Plausibly done" starts from the configured expectation (`SEEDANCE_<TIER>_EXPECTED_SECONDS` for a
    5 s 720p clip, scaled by duration and resolution) and learns from finished tasks how fast the API
    really is: a moving average of observed / expected per tier, in constant memory. Until a replica has
    seen a task finish, it polls early (twice the tier's shortest interval) rather than trust a guess.
    """

    SMOOTHING = 0.2

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._speed: dict[str, float] = {}

    def expected_seconds(self, tier: ServiceTier, duration: int, resolution: str) -> float:
        base = self._settings.tiers[tier].expected_seconds
        return base * duration / 5 * RESOLUTION_FACTOR.get(resolution, 1.0)

    def observe(self, tier: ServiceTier, duration: int, resolution: str, seconds: float) -> None:
        """A task of this kind took `seconds` from submission to completion."""
        ratio = min(1000.0, max(0.0001, seconds / self.expected_seconds(tier, duration, resolution)))
        known = self._speed.get(tier)
        self._speed[tier] = ratio if known is None else known + self.SMOOTHING * (ratio - known)

    def speed(self, tier: ServiceTier) -> float | None:
        """Observed time over expected time for the tier; None until a task of the tier has finished (the
        tiers run at unrelated speeds: flex's queueing says nothing of default's, and back)."""
        return self._speed.get(tier)

    def first_delay(self, state: TrackingState) -> float:
        """Seconds from submission to the first poll: 80 % of the time the task should take."""
        low = self._settings.tiers[state.tier].poll_min_seconds
        speed = self.speed(state.tier)
        if speed is None:
            return 2 * low
        return max(low, 0.8 * speed * self.expected_seconds(state.tier, state.duration, state.resolution))

    def next_delay(self, state: TrackingState, result: TaskResult, now: datetime) -> float:
        """Seconds until the next poll of an unfinished task."""
        tier = self._settings.tiers[state.tier]
        low, high = tier.poll_min_seconds, tier.poll_max_seconds
        task = result.task
        if task.eta > 0:
            guess = float(task.eta)
        elif task.status is TaskStatus.PROCESSING and 0 < task.progress_percent < 100 and state.submitted_at:
            elapsed = (now - state.submitted_at).total_seconds()
            guess = elapsed * (100 - task.progress_percent) / task.progress_percent
        elif state.interval > 0:
            guess = state.interval * 1.5
        else:
            guess = low
        return min(high, max(low, guess))


def capped(now: datetime, delay: float, deadline: datetime) -> datetime:
    """The moment `delay` seconds from now, but never later than the deadline."""
    return min(now + timedelta(seconds=delay), deadline)


def pick_delay_level(levels_ms: tuple[int, ...], seconds: float) -> int:
    """The longest delay level that does not overshoot `seconds` (the shortest when all do)."""
    wanted = seconds * 1000
    fitting = [level for level in levels_ms if level <= wanted]
    return fitting[-1] if fitting else levels_ms[0]

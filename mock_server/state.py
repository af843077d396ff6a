"""Everything the mock remembers: configuration, tasks, quotas, injected faults and the request journal.

Task lifecycles are computed from the clock when asked, never advanced by background work: a task's
status at time t follows from when it was created, its simulated queue and render times and its planned
outcome. That keeps the mock deterministic for a given seed and cheap however many tasks it holds.

All durations are simulated seconds multiplied by `time_scale` (0.001 turns a 60 s render into 60 ms);
that includes the quota windows (a "minute" lasts 60 x time_scale seconds) and the tasks'
`execution_expires_after`. `advance()` moves the mock's clock forward, for tests of long waits.
"""

from __future__ import annotations

import heapq
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from contracts.api import ServiceTier, SubmitRequest, TaskStatus

Outcome = Literal["succeed", "fail", "hang"]
Endpoint = Literal["submit", "task-result", "video"]
SERVER_ERRORS = ("500", "502", "503", "504")


class TierQuota(BaseModel):
    """The account's limits in one tier (all clients of the key together); None means unlimited."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1, description="Accepted submits per (scaled) minute.")
    concurrency: int | None = Field(
        default=None, ge=1, description="Tasks running at once; further submits wait QUEUED, first in first out."
    )
    max_queued: int | None = Field(
        default=None, ge=0, description="Tasks waiting (QUEUED) at most; past it, submits answer 429."
    )
    daily_tokens: int | None = Field(default=None, ge=1, description="Tokens submitted per (scaled) day.")


class MockConfig(BaseModel):
    """Behaviour of the mock that the real API's docs leave open or that tests want to choose.

    `POST /_mock/config` merges a partial object into the current one.
    """

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = Field(default=None, description="Accepted key; None accepts any bearer token.")
    time_scale: float = Field(default=1.0, gt=0, description="Real seconds per simulated second.")
    model_rpm: int | None = Field(default=200, ge=1, description="Submits per minute across tiers.")
    quotas: dict[ServiceTier, TierQuota] = Field(
        default={
            "default": TierQuota(rpm=600, concurrency=10, max_queued=120),
            "flex": TierQuota(daily_tokens=500_000_000_000),
        }
    )
    queue_seconds: dict[ServiceTier, float] = Field(default={"default": 5.0, "flex": 1800.0})
    render_seconds: dict[ServiceTier, float] = Field(
        default={"default": 60.0, "flex": 120.0},
        description="Render time of a 5 s 720p clip; scaled by duration and resolution.",
    )
    resolution_factor: dict[str, float] = Field(default={"480p": 0.6, "720p": 1.0, "1080p": 1.8})
    jitter: float = Field(default=0.2, ge=0, lt=1, description="Relative spread of queue and render times.")
    failure_rate: float = Field(default=0.0, ge=0, le=1, description="Share of tasks that end FAILED.")
    failure_reason: str = "content generation failed"
    expired_reason: str = Field(
        default="task expired: execution_expires_after exceeded",
        description="FAILED reason of a task past its window (the gateway's wording is unknown).",
    )
    report_eta: bool = Field(
        default=False, description="Fill task.eta with the real seconds left; the gateway's is usually 0."
    )
    video_url_ttl: int = Field(default=3600, description="Seconds a video URL stays valid (not scaled).")
    video_bytes_per_second: int = Field(
        default=100_000,
        ge=1,
        description="Size of the served MP4 per second of a 720p clip; other resolutions scale with their "
        "pixels (480p x0.47, 1080p x2.25).",
    )
    ttl_as_string: bool = Field(default=True, description='Send video_url_ttl as "3600" like the docs.')
    public_url: str | None = Field(
        default=None, description="Base of the video URLs handed out; default: the request's Host."
    )


class ForcedOutcome(BaseModel):
    """Force the outcome of the next `count` tasks, or of every task whose prompt contains a marker."""

    model_config = ConfigDict(extra="forbid")

    outcome: Outcome
    count: int | None = Field(default=None, ge=1)
    prompt_contains: str | None = Field(default=None, min_length=1)
    reason: str | None = None


class AuthFault(BaseModel):
    """Answer every API request with this error until cleared (a revoked key, an empty balance)."""

    model_config = ConfigDict(extra="forbid")

    status: Literal[401, 403, 404] = 403
    reason: str = "INVALID_API_KEY"
    message: str = "the API key is not valid"


class ResultFault(BaseModel):
    """An odd but legal answer of task-result, instead of the task's result, for a share of the polls of
    every task (`rate`) or of the tasks whose prompt contains a marker; `polls` limits it to each task's
    first polls (a gateway catching up right after a submit)."""

    model_config = ConfigDict(extra="forbid")

    answer: Literal["status", "html", "unknown_status", "other_task"] = Field(
        description="status: an HTTP 4xx with the flat error body; html: a 200 maintenance page; "
        "unknown_status: the result with task.status set to `task_status`; other_task: another task's result."
    )
    status: int = Field(default=404, ge=400, le=499, description="The status of answer `status`.")
    reason: str = Field(default="TASK_NOT_FOUND", description="The flat body's reason of answer `status`.")
    task_status: str = Field(default="TASK_STATUS_UNKNOWN", description="task.status of answer `unknown_status`.")
    rate: float = Field(default=1.0, ge=0, le=1, description="Share of the matching polls answered so.")
    prompt_contains: str | None = Field(default=None, min_length=1)
    polls: int | None = Field(default=None, ge=1, description="Only each task's first `polls` polls.")

    def applies(self, task: Task, rng: random.Random) -> bool:
        if self.prompt_contains is not None and self.prompt_contains not in task.request.prompt:
            return False
        if self.polls is not None and task.polls > self.polls:
            return False
        return self.rate >= 1 or rng.random() < self.rate


StatusKey = Annotated[str, StringConstraints(pattern=r"^([45][0-9][0-9]|5xx)$")]


class Faults(BaseModel):
    """Faults injected into API requests. `POST /_mock/faults` replaces the whole set."""

    model_config = ConfigDict(extra="forbid")

    status_rates: dict[StatusKey, float] = Field(
        default_factory=dict,
        description='Share of requests answered with a 4xx or 5xx status (the flat error body); "5xx" picks '
        "500/502/503/504.",
    )
    retry_after: float | None = Field(default=1.0, ge=0, description="Retry-After (real s) on injected 429.")
    latency_ms: float = Field(default=0.0, ge=0, description="Added to every API request.")
    timeout_rate: float = Field(default=0.0, ge=0, le=1)
    timeout_seconds: float = Field(default=30.0, ge=0, description="Hang this long, then answer 504.")
    reset_rate: float = Field(default=0.0, ge=0, le=1, description="Close the connection, nothing done.")
    malformed_rate: float = Field(default=0.0, ge=0, le=1, description="Do the work, garble the answer.")
    video_bandwidth: float | None = Field(
        default=None, gt=0, description="Serve video bytes no faster than this many per second (a slow source)."
    )
    endpoints: list[Endpoint] = Field(default=["submit", "task-result"])
    outcomes: list[ForcedOutcome] = Field(default_factory=list)
    task_result: list[ResultFault] = Field(
        default_factory=list, description="Odd answers of task-result; the first that applies to a poll wins."
    )
    auth: AuthFault | None = None


@dataclass(slots=True)
class Task:
    task_id: str
    tier: ServiceTier
    request: SubmitRequest
    created: float
    queue_s: float
    start: float  # when it leaves the queue and begins rendering (inf: it expires before a slot frees)
    render_s: float
    expires_s: float
    outcome: Outcome
    reason: str
    seed: int
    polls: int = 0

    @property
    def started(self) -> float:
        return self.start

    @property
    def planned_end(self) -> float:
        return math.inf if self.outcome == "hang" else self.started + self.render_s

    @property
    def expires_at(self) -> float:
        return self.created + self.expires_s

    @property
    def finishes_at(self) -> float:
        return min(self.planned_end, self.expires_at)


@dataclass(frozen=True, slots=True)
class TaskView:
    """A task as seen at one instant."""

    status: TaskStatus
    progress: int
    reason: str
    finished_at: float | None


def view(task: Task, now: float, expired_reason: str) -> TaskView:
    if task.planned_end > task.expires_at and now >= task.expires_at:
        return TaskView(TaskStatus.FAILED, 0, expired_reason, task.expires_at)
    if now < task.started:
        return TaskView(TaskStatus.QUEUED, 0, "", None)
    if now < task.planned_end:
        done = (now - task.started) / task.render_s if task.render_s > 0 else 0.0
        return TaskView(TaskStatus.PROCESSING, min(99, int(done * 100)), "", None)
    if task.outcome == "succeed":
        return TaskView(TaskStatus.SUCCEED, 100, "", task.planned_end)
    return TaskView(TaskStatus.FAILED, 0, task.reason, task.planned_end)


@dataclass(slots=True)
class JournalEntry:
    """One API request as the mock saw it: filled in as the request is served, recorded when it ends.

    `status` is 0 for an injected connection reset and 499 when the client left before an answer.
    """

    method: str
    path: str
    endpoint: Endpoint
    time: float
    status: int = 499
    task_id: str | None = None
    tier: ServiceTier | None = None
    fault: str | None = None

    def as_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "method": self.method,
            "path": self.path,
            "endpoint": self.endpoint,
            "time": iso(self.time),
            "status": self.status,
        }
        for key in ("task_id", "tier", "fault"):
            if getattr(self, key) is not None:
                shown[key] = getattr(self, key)
        return shown


@dataclass(frozen=True, slots=True)
class QuotaVerdict:
    message: str
    retry_after: float


@dataclass(slots=True)
class _Window:
    """Timestamps of accepted events within a sliding window."""

    events: deque[float] = field(default_factory=deque)

    def check(self, now: float, length: float, limit: int) -> float | None:
        """Seconds until one more event fits, or None when it fits now."""
        while self.events and self.events[0] <= now - length:
            self.events.popleft()
        if len(self.events) < limit:
            return None
        return self.events[0] + length - now


class MockState:
    """The whole state of one mock API. Not thread-safe: one event loop owns it."""

    JOURNAL_LIMIT = 200_000

    def __init__(self, config: MockConfig | None = None, *, seed: int | None = None) -> None:
        self._seed = seed
        self._initial = config or MockConfig()
        self.reset()

    def reset(self) -> None:
        """Return to the state at start-up: the start-up config, no tasks, journal, quota usage or faults."""
        self.config = self._initial.model_copy(deep=True)
        self.rng = random.Random(self._seed)
        self.set_faults(Faults())
        self.tasks: dict[str, Task] = {}
        self.journal: deque[JournalEntry] = deque(maxlen=self.JOURNAL_LIMIT)
        self._offset = 0.0
        self._epoch = time.time()
        self._rpm: dict[str, _Window] = {"model": _Window(), "default": _Window(), "flex": _Window()}
        # Per tier: when each running slot frees (the finish times of the tasks holding them), and when each
        # waiting task leaves the queue (to start, or expired): enough to schedule FIFO and count the queue.
        self._slots: dict[str, list[float]] = {"default": [], "flex": []}
        self._waiting: dict[str, list[float]] = {"default": [], "flex": []}
        self._tokens_day: dict[str, tuple[int, int]] = {"default": (0, 0), "flex": (0, 0)}

    # clock
    def now(self) -> float:
        return time.time() + self._offset

    def advance(self, simulated_seconds: float) -> None:
        """Move the clock forward by `simulated_seconds` (scaled like every other duration)."""
        self._offset += simulated_seconds * self.config.time_scale

    def scaled(self, simulated_seconds: float) -> float:
        return simulated_seconds * self.config.time_scale

    # quotas
    def check_quota(self, request: SubmitRequest) -> QuotaVerdict | None:
        """Why this submit is over a quota right now, or None when it may go ahead."""
        now = self.now()
        minute = self.scaled(60.0)
        tier = request.service_tier
        if self.config.model_rpm is not None:
            wait = self._rpm["model"].check(now, minute, self.config.model_rpm)
            if wait is not None:
                return QuotaVerdict(f"model rate limit of {self.config.model_rpm} requests per minute", wait)
        quota = self.config.quotas.get(tier, TierQuota())
        if quota.rpm is not None:
            wait = self._rpm[tier].check(now, minute, quota.rpm)
            if wait is not None:
                return QuotaVerdict(f"{tier} tier rate limit of {quota.rpm} requests per minute", wait)
        if quota.max_queued is not None and quota.concurrency is not None:
            waiting = self._waiting[tier]
            while waiting and waiting[0] <= now:
                heapq.heappop(waiting)
            # Only a task that would have to wait for a slot needs a place in the queue.
            busy = sum(1 for end in self._slots[tier] if end > now)
            if busy >= quota.concurrency and len(waiting) >= quota.max_queued:
                return QuotaVerdict(
                    f"{tier} tier queue is full: {quota.max_queued} tasks already wait for a running slot",
                    min(waiting[0] if waiting else math.inf, min(self._slots[tier], default=now + 1.0)) - now,
                )
        if quota.daily_tokens is not None:
            day_length = self.scaled(86400.0)
            day = int((now - self._epoch) // day_length)
            used_day, used = self._tokens_day[tier]
            used = used if used_day == day else 0
            if used + request.tokens() > quota.daily_tokens:
                next_day = self._epoch + (day + 1) * day_length
                return QuotaVerdict(f"{tier} tier daily budget of {quota.daily_tokens} tokens is spent", next_day - now)
        return None

    def _schedule(self, tier: ServiceTier, ready: float, render_s: float, expires_at: float, hang: bool) -> float:
        """When a task ready at `ready` starts: FIFO for the tier's running slots (inf when it expires first)."""
        concurrency = self.config.quotas.get(tier, TierQuota()).concurrency
        slots = self._slots[tier]
        if concurrency is None or len(slots) < concurrency:
            start = ready
        else:
            # Wait for as many holders to finish as are over the limit (the limit may have shrunk).
            ordered = sorted(slots)
            start = max(ready, ordered[len(ordered) - concurrency])
            if start >= expires_at:
                start = math.inf  # expires waiting; it never takes a slot
            else:
                slots[:] = ordered[len(ordered) - concurrency + 1 :]
                heapq.heapify(slots)
        if concurrency is not None and start != math.inf:
            end = math.inf if hang else start + render_s
            heapq.heappush(slots, min(end, expires_at))
        if start > ready:  # it waits for a slot: counted against the queue until it starts or expires
            heapq.heappush(self._waiting[tier], min(start, expires_at))
        return start

    def _count_submit(self, task: Task) -> None:
        now = task.created
        self._rpm["model"].events.append(now)
        self._rpm[task.tier].events.append(now)
        day = int((now - self._epoch) // self.scaled(86400.0))
        used_day, used = self._tokens_day[task.tier]
        self._tokens_day[task.tier] = (day, (used if used_day == day else 0) + task.request.tokens())

    # tasks
    def create_task(self, request: SubmitRequest) -> Task:
        """Create a task for an accepted request (quotas already checked) and count it against them."""
        cfg = self.config
        tier = request.service_tier
        length = request.duration / 5 * cfg.resolution_factor.get(request.resolution, 1.0)
        outcome, reason = self._plan_outcome(request)
        created = self.now()
        queue_s = self.scaled(cfg.queue_seconds[tier] * self._spread())
        render_s = self.scaled(cfg.render_seconds[tier] * length * self._spread())
        expires_s = self.scaled(request.execution_expires_after)
        start = self._schedule(tier, created + queue_s, render_s, created + expires_s, outcome == "hang")
        task = Task(
            task_id=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            tier=tier,
            request=request,
            created=created,
            queue_s=queue_s,
            start=start,
            render_s=render_s,
            expires_s=expires_s,
            outcome=outcome,
            reason=reason,
            seed=request.seed if request.seed is not None and request.seed >= 0 else self.rng.getrandbits(32),
        )
        self.tasks[task.task_id] = task
        self._count_submit(task)
        return task

    def _spread(self) -> float:
        return 1.0 + self.rng.uniform(-self.config.jitter, self.config.jitter)

    def _plan_outcome(self, request: SubmitRequest) -> tuple[Outcome, str]:
        for forced in self.faults.outcomes:
            if forced.prompt_contains is not None and forced.prompt_contains in request.prompt:
                return forced.outcome, forced.reason or self.config.failure_reason
        for i, forced in enumerate(self.faults.outcomes):
            if forced.prompt_contains is None and self._remaining[i] > 0:
                self._remaining[i] -= 1
                return forced.outcome, forced.reason or self.config.failure_reason
        if self.rng.random() < self.config.failure_rate:
            return "fail", self.config.failure_reason
        return "succeed", ""

    def view(self, task: Task) -> TaskView:
        return view(task, self.now(), self.config.expired_reason)

    # faults
    def roll(self, endpoint: Endpoint) -> str | None:
        """Which injected fault, if any, hits this request: "reset", "timeout", "malformed" or a status."""
        faults = self.faults
        if endpoint not in faults.endpoints:
            return None
        rng = self.rng
        if faults.reset_rate and rng.random() < faults.reset_rate:
            return "reset"
        if faults.timeout_rate and rng.random() < faults.timeout_rate:
            return "timeout"
        for status, rate in faults.status_rates.items():
            if rate and rng.random() < rate:
                return rng.choice(SERVER_ERRORS) if status == "5xx" else status
        if faults.malformed_rate and rng.random() < faults.malformed_rate:
            return "malformed"
        return None

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        # Outcomes without a prompt marker apply to the next `count` tasks (every task when count is unset).
        self._remaining = [f.count if f.count is not None else 2**62 for f in faults.outcomes]

    # journal
    def record(self, entry: JournalEntry) -> None:
        self.journal.append(entry)

    def task_summaries(self) -> Iterable[dict[str, Any]]:
        now = self.now()
        for task in self.tasks.values():
            seen = view(task, now, self.config.expired_reason)
            yield {
                "task_id": task.task_id,
                "status": seen.status.value,
                "progress_percent": seen.progress,
                "reason": seen.reason,
                "tier": task.tier,
                "request": redacted(task.request),
                "submitted_at": iso(task.created),
                "started_at": iso(task.started) if task.started <= now and task.started < task.expires_at else None,
                "queued_seconds": round(min(task.started, task.expires_at, now) - task.created, 6),
                "finished_at": iso(seen.finished_at) if seen.finished_at is not None else None,
                "outcome": task.outcome,
                "polls": task.polls,
                "tokens": task.request.tokens(),
            }


def redacted(request: SubmitRequest) -> dict[str, Any]:
    """The request as JSON with inline image data replaced by its size: payloads never leave the mock."""
    body = request.wire()
    for key in ("image", "last_image"):
        value = body.get(key)
        if isinstance(value, str) and value.startswith("data:"):
            head, _, data = value.partition(",")
            body[key] = f"{head},<{len(data)} base64 chars>"
    return body


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

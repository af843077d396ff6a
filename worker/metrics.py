"""Every Prometheus metric of the worker, built against an injected registry.

Names and labels are part of the product (PRODUCT.md); labels come from small fixed sets, never ids.
Label values are pre-initialised so dashboards show zeros instead of gaps.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from contracts.messages import EVENT_STATUSES, TERMINAL_STATUSES, TIERS
from worker.errors import REJECT_REASONS

DUPLICATE_CAUSES = ("answer_lost", "redelivered")
CANCEL_WHEN = ("before_submit", "after_submit", "after_end")
ENDPOINTS = ("submit", "task-result")
DELIVERY_KINDS = ("job", "tracking", "store")
RESOLUTIONS = ("480p", "720p", "1080p")
# Queue waits run from seconds (default) to hours (flex); durations add the render time.
WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600, 7200, 21600, 86400, 172800)
STORE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900)
STORE_FAILURES = ("source_gone", "source_error", "store_error", "verify", "timeout", "refused", "config")
API_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


T = TypeVar("T", Counter, Gauge, Histogram)


class Family(Generic[T]):
    """A labelled metric whose children are kept once made: `labels()` validates the values and takes a
    lock on every call, and the worker asks for the same few children for every job."""

    def __init__(self, metric: T) -> None:
        self.metric: T = metric
        self._children: dict[tuple[str, ...], T] = {}

    def labels(self, *values: str) -> T:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # `*_created` series double the exposition and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        self.jobs_received = Family(
            Counter("seedance_jobs_received", "Job messages taken from the tier queues.", ["tier"], registry=registry)
        )
        self.jobs_completed = Family(
            Counter(
                "seedance_jobs_completed",
                "Jobs that reached a terminal status.",
                ["tier", "status"],
                registry=registry,
            )
        )
        self.jobs_rejected = Family(
            Counter(
                "seedance_jobs_rejected",
                "Messages dead-lettered because they are no valid job.",
                ["reason"],
                registry=registry,
            )
        )
        self.tasks_in_flight = Family(
            Gauge(
                "seedance_tasks_in_flight",
                "Submitted, unfinished tasks, counted in the broker (all replicas).",
                ["tier"],
                registry=registry,
            )
        )
        self.account_slots_taken = Family(
            Gauge(
                "seedance_account_slots_taken",
                "Running-slot permits taken: the account's tasks submitted and not ended (all replicas), against "
                "max_in_flight + queue_ahead.",
                ["tier"],
                registry=registry,
            )
        )
        self.account_submits_last_minute = Family(
            Gauge(
                "seedance_account_submits_last_minute",
                "The account's submits in the last minute (all replicas), against the rpm limit.",
                ["tier"],
                registry=registry,
            )
        )
        self.limits_leader = Gauge(
            "seedance_limits_leader",
            "1 on the replica that reconciles the account's limits (exactly one should).",
            registry=registry,
        )
        self.queue_wait = Family(
            Histogram(
                "seedance_job_queue_wait_seconds",
                "From job creation to the API accepting it.",
                ["tier"],
                buckets=WAIT_BUCKETS,
                registry=registry,
            )
        )
        self.job_duration = Family(
            Histogram(
                "seedance_job_duration_seconds",
                "From job creation to its terminal event.",
                ["tier", "status"],
                buckets=DURATION_BUCKETS,
                registry=registry,
            )
        )
        self.api_requests = Family(
            Counter(
                "seedance_api_requests",
                "Requests to the API by answer (status code, or timeout/reset/transport).",
                ["endpoint", "code"],
                registry=registry,
            )
        )
        self.api_duration = Family(
            Histogram(
                "seedance_api_request_duration_seconds",
                "Latency of API requests.",
                ["endpoint"],
                buckets=API_BUCKETS,
                registry=registry,
            )
        )
        self.api_retries = Family(
            Counter(
                "seedance_api_retries",
                "API requests to be sent again, by why.",
                ["endpoint", "reason"],
                registry=registry,
            )
        )
        self.polls = Family(
            Counter("seedance_polls", "Task-result requests for tracked tasks.", ["tier"], registry=registry)
        )
        self.video_seconds = Family(
            Counter(
                "seedance_video_seconds",
                "Seconds of video generated successfully (billed).",
                ["tier", "resolution"],
                registry=registry,
            )
        )
        self.billed_tokens = Family(
            Counter(
                "seedance_billed_tokens",
                "Tokens of successful videos (the API's billing unit).",
                ["tier", "audio"],
                registry=registry,
            )
        )
        self.worker_ready = Gauge(
            "seedance_worker_ready",
            "1 when this worker takes jobs, 0 when not (broker down, auth fault, stopping).",
            registry=registry,
        )
        self.tier_limit = Family(
            Gauge(
                "seedance_tier_limit",
                "Configured limits per tier, for dashboards.",
                ["tier", "limit"],
                registry=registry,
            )
        )
        self.consumer_paused = Family(
            Gauge(
                "seedance_consumer_paused",
                "1 while the tier's job queue is not consumed (limit reached).",
                ["tier"],
                registry=registry,
            )
        )
        self.permits_unreachable = Family(
            Gauge(
                "seedance_permits_unreachable",
                "1 while the tier's permits in RabbitMQ do not answer (a node lost, a queue missing): the "
                "tier takes no job until they do.",
                ["tier"],
                registry=registry,
            )
        )
        self.submit_window = Histogram(
            "seedance_submit_unconfirmed_seconds",
            "From the API accepting a task to the broker confirming its tracking state: the window in which "
            "a crash makes the job be submitted again.",
            buckets=API_BUCKETS,
            registry=registry,
        )
        self.queue_messages = Family(
            Gauge(
                "seedance_queue_messages",
                "Messages ready in the job queues and the dead-letter queue (broker count).",
                ["queue"],
                registry=registry,
            )
        )
        self.api_access_ok = Gauge(
            "seedance_api_access_ok",
            "0 while the API refuses this worker's key or account (401/403/404 model).",
            registry=registry,
        )
        self.deadline_used = Family(
            Histogram(
                "seedance_job_deadline_used_ratio",
                "Share of its deadline window a job had used when it ended (1 = expired at the deadline).",
                ["tier"],
                buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0),
                registry=registry,
            )
        )
        self.possible_duplicates = Family(
            Counter(
                "seedance_submits_possibly_duplicated",
                "Submits that may repeat one the API already acted on: its answer was lost (answer_lost), or the "
                "job was handed out again by RabbitMQ after a worker stopped or died holding it (redelivered).",
                ["tier", "cause"],
                registry=registry,
            )
        )
        self.videos_stored = Family(
            Counter(
                "seedance_videos_stored",
                "Successful jobs whose video was copied to the store (stored) or could not be (failed).",
                ["tier", "result"],
                registry=registry,
            )
        )
        self.video_store_seconds = Histogram(
            "seedance_video_store_seconds",
            "Time of one successful copy: download, upload and read-back verification.",
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self.video_stored_bytes = Family(
            Counter("seedance_video_stored_bytes", "Bytes of video copied to the store.", ["tier"], registry=registry)
        )
        self.video_store_failures = Family(
            Counter(
                "seedance_video_store_failures",
                "Copy attempts that failed, by why (each may be tried again while the gateway's URL lives).",
                ["reason"],
                registry=registry,
            )
        )
        self.storage_access_ok = Gauge(
            "seedance_storage_access_ok",
            "0 while the video store refuses this worker's credentials (1 without a store).",
            registry=registry,
        )
        self.consumers_cancelled = Family(
            Counter(
                "seedance_consumers_cancelled",
                "Consumers RabbitMQ cancelled on its own (queue deleted, node lost, consumer timeout), each "
                "restored by the worker.",
                ["queue"],
                registry=registry,
            )
        )
        self.unknown_task_status = Family(
            Counter(
                "seedance_task_status_unknown",
                "Task results whose task.status this worker does not know (read as not finished yet).",
                ["tier"],
                registry=registry,
            )
        )
        self.deliveries_failed = Family(
            Counter(
                "seedance_deliveries_failed",
                "Deliveries whose handling failed unexpectedly (a bug, the broker): sent again after a back-off, "
                "by kind (job, tracking, store).",
                ["kind"],
                registry=registry,
            )
        )
        self.deliveries_parked = Family(
            Counter(
                "seedance_deliveries_parked",
                "Deliveries that failed SEEDANCE_DELIVERY_LIMIT times and were parked in seedance.jobs.dead, by kind.",
                ["kind"],
                registry=registry,
            )
        )
        self.jobs_duplicate = Family(
            Counter(
                "seedance_jobs_duplicate",
                "Job messages whose job_id a worker had already taken: acknowledged, never submitted again.",
                ["tier"],
                registry=registry,
            )
        )
        self.cancels = Family(
            Counter(
                "seedance_cancels",
                "Cancels by when they arrived: before_submit (the job ended cancelled at no cost), after_submit "
                "(it ended cancelled, its task may be billed), after_end (nothing changed; counted by the leader).",
                ["when"],
                registry=registry,
            )
        )
        self.remembered_jobs = Gauge(
            "seedance_remembered_job_ids",
            "Job ids this replica remembers (taken, ended or cancelled within the last 72 h).",
            registry=registry,
        )
        self.events_published = Family(
            Counter("seedance_events_published", "Events published to seedance.events.", ["status"], registry=registry)
        )
        self._initialise()

    def _initialise(self) -> None:
        for tier in TIERS:
            self.jobs_received.labels(tier)
            self.tasks_in_flight.labels(tier)
            self.permits_unreachable.labels(tier)
            self.account_slots_taken.labels(tier)
            self.account_submits_last_minute.labels(tier)
            self.queue_wait.labels(tier)
            self.polls.labels(tier)
            self.consumer_paused.labels(tier)
            self.deadline_used.labels(tier)
            for status in TERMINAL_STATUSES:
                self.jobs_completed.labels(tier, status)
                self.job_duration.labels(tier, status)
            for resolution in RESOLUTIONS:
                self.video_seconds.labels(tier, resolution)
            for audio in ("true", "false"):
                self.billed_tokens.labels(tier, audio)
            for cause in DUPLICATE_CAUSES:
                self.possible_duplicates.labels(tier, cause)
            for result in ("stored", "failed"):
                self.videos_stored.labels(tier, result)
            self.video_stored_bytes.labels(tier)
            self.unknown_task_status.labels(tier)
            self.jobs_duplicate.labels(tier)
        for when in CANCEL_WHEN:
            self.cancels.labels(when)
        for kind in DELIVERY_KINDS:
            self.deliveries_failed.labels(kind)
            self.deliveries_parked.labels(kind)
        for failure in STORE_FAILURES:
            self.video_store_failures.labels(failure)
        for reason in REJECT_REASONS:
            self.jobs_rejected.labels(reason)
        for endpoint in ENDPOINTS:
            self.api_duration.labels(endpoint)
            self.api_requests.labels(endpoint, "200")
        for event_status in EVENT_STATUSES:
            self.events_published.labels(event_status)
        self.worker_ready.set(0)
        self.api_access_ok.set(0)  # until the API has accepted the key (checked at start-up)
        self.storage_access_ok.set(1)

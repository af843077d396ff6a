"""Build the Grafana dashboard from the panel list below: `python -m deploy.grafana.build_dashboard [--check]`.

One table of panels is easier to review than 2,000 lines of JSON, and the live-Prometheus test reads the
generated JSON, so every query shown to operators is checked against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "seedance.json"
T = 'tier=~"$tier"'
RI = "$__rate_interval"
TOKENS = "seedance_billed_tokens_total"
# Flex costs half of default (official); `on(tier) group_left` applies the factor per tier.
TIER_PRICE_FACTOR = (
    'label_replace(vector(1), "tier", "default", "", "") or label_replace(vector(0.5), "tier", "flex", "", "")'
)


@dataclass
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]  # (expr, legend)
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


def quantiles(metric: str, by: str, selector: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RI}])))",
            f"p{int(q * 100)} {{{{{by}}}}}",
        )
        for q in qs
    ]


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Jobs (rate, errors, duration)",
        [
            Panel(
                "Jobs received",
                "Job messages taken from the tier queues, per second.",
                [(f"sum by (tier) (rate(seedance_jobs_received_total{{{T}}}[{RI}]))", "{{tier}}")],
                "ops",
            ),
            Panel(
                "Jobs completed by status",
                "Jobs reaching a terminal status (succeeded, failed, expired, rejected, cancelled), per second.",
                [(f"sum by (tier, status) (rate(seedance_jobs_completed_total{{{T}}}[{RI}]))", "{{tier}} {{status}}")],
                "ops",
            ),
            Panel(
                "Error ratio",
                "Share of terminal jobs that did not succeed (failed, expired or rejected).",
                [
                    (
                        f'sum(rate(seedance_jobs_completed_total{{{T},status=~"failed|expired|rejected"}}[{RI}])) / '
                        f"clamp_min(sum(rate(seedance_jobs_completed_total{{{T}}}[{RI}])), 1e-9)",
                        "error ratio",
                    )
                ],
                "percentunit",
            ),
            Panel(
                "Queue wait (created to submitted)",
                "Time from job creation to the API accepting it. Grows when a "
                "tier is at its limits or the API throttles.",
                quantiles("seedance_job_queue_wait_seconds", "tier", T),
                "s",
            ),
            Panel(
                "End-to-end duration (succeeded)",
                "Time from job creation to its succeeded event.",
                quantiles("seedance_job_duration_seconds", "tier", f'{T},status="succeeded"'),
                "s",
            ),
            Panel(
                "Deadline used at completion",
                "Share of its deadline window (created_at + execution_expires_after) "
                "a job had used when it ended; near 1 means jobs finish just in time or expire.",
                quantiles("seedance_job_deadline_used_ratio", "tier", T, (0.5, 0.95)),
                "percentunit",
            ),
            Panel(
                "Cancels and duplicates",
                "Cancels by when they arrived (before_submit: the job ended at no cost; after_submit: it ended, its "
                "task may be billed; after_end: nothing changed), and job messages acknowledged as copies of a job "
                "already taken (never submitted twice), per second.",
                [
                    (f"sum by (when) (rate(seedance_cancels_total[{RI}]))", "cancel {{when}}"),
                    (f"sum by (tier) (rate(seedance_jobs_duplicate_total{{{T}}}[{RI}]))", "duplicate {{tier}}"),
                ],
                "ops",
            ),
            Panel(
                "Rejected messages by reason",
                "Messages dead-lettered to seedance.jobs.dead because they are no valid job (producer bugs).",
                [("sum by (reason) (rate(seedance_jobs_rejected_total[" + RI + "]))", "{{reason}}")],
                "ops",
            ),
            Panel(
                "Events published by status",
                "Events sent to seedance.events, per second.",
                [("sum by (status) (rate(seedance_events_published_total[" + RI + "]))", "{{status}}")],
                "ops",
            ),
        ],
    ),
    (
        "Capacity and saturation",
        [
            Panel(
                "Tasks in flight vs running limit",
                "Submitted, unfinished tasks per tier (counted in the broker, all replicas) against the "
                "account's running limit (SEEDANCE_<TIER>_MAX_IN_FLIGHT) and that limit plus the tasks kept "
                "waiting upstream (SEEDANCE_<TIER>_QUEUE_AHEAD).",
                [
                    (f"max by (tier) (seedance_tasks_in_flight{{{T}}})", "in flight {{tier}}"),
                    (f'max by (tier) (seedance_tier_limit{{{T},limit="max_in_flight"}})', "running limit {{tier}}"),
                    (
                        f'max by (tier) (seedance_tier_limit{{{T},limit="max_in_flight"}}) + '
                        f'max by (tier) (seedance_tier_limit{{{T},limit="queue_ahead"}})',
                        "with queue ahead {{tier}}",
                    ),
                ],
            ),
            Panel(
                "Jobs waiting in RabbitMQ",
                "Ready messages in the tier queues and the dead-letter queue.",
                [("max by (queue) (seedance_queue_messages)", "{{queue}}")],
            ),
            Panel(
                "Tier consumers paused",
                "Workers whose tier consumer is paused because a limit (rate, in flight, tokens, a 429) is reached.",
                [(f"sum by (tier) (seedance_consumer_paused{{{T}}})", "{{tier}}")],
            ),
            Panel(
                "Permits unreachable",
                "Workers whose tier cannot reach its permits in RabbitMQ (a node lost, a queue missing): the tier "
                "takes no job until they answer.",
                [(f"sum by (tier) (seedance_permits_unreachable{{{T}}})", "{{tier}}")],
            ),
            Panel(
                "Workers ready",
                "Workers taking jobs, of all workers scraped.",
                [("sum(seedance_worker_ready)", "ready"), ("count(seedance_worker_ready)", "running")],
                kind="stat",
                width=4,
            ),
            Panel(
                "API access",
                "1 when every worker's key is accepted; 0 during an auth or account fault (401/403/404 model).",
                [("min(seedance_api_access_ok)", "access ok")],
                kind="stat",
                width=4,
            ),
        ],
    ),
    (
        "The video API",
        [
            Panel(
                "API requests by code",
                "Requests to the API per endpoint and answer (HTTP code, timeout, transport).",
                [("sum by (endpoint, code) (rate(seedance_api_requests_total[" + RI + "]))", "{{endpoint}} {{code}}")],
                "reqps",
            ),
            Panel(
                "API latency",
                "API request duration by endpoint.",
                quantiles("seedance_api_request_duration_seconds", "endpoint", "", (0.5, 0.95)),
                "s",
            ),
            Panel(
                "Retries by reason",
                "API requests to be sent again (429, 5xx, timeout, transport, malformed).",
                [
                    (
                        "sum by (endpoint, reason) (rate(seedance_api_retries_total[" + RI + "]))",
                        "{{endpoint}} {{reason}}",
                    )
                ],
                "reqps",
            ),
            Panel(
                "Throttled share (429)",
                "Share of API requests answered 429; sustained, it means the quotas are too small for the load.",
                [
                    (
                        f'(sum(rate(seedance_api_requests_total{{code="429"}}[{RI}])) or vector(0)) / '
                        f"clamp_min(sum(rate(seedance_api_requests_total[{RI}])), 1e-9)",
                        "429 share",
                    )
                ],
                "percentunit",
            ),
            Panel(
                "Double-submission window",
                "Time from the API accepting a task to the broker confirming its "
                "tracking state: a crash inside it submits the job again.",
                quantiles("seedance_submit_unconfirmed_seconds", "instance", "", (0.5, 0.99)),
                "s",
            ),
            Panel(
                "Odd answers: unknown task status",
                "Task results whose task.status the worker does not know; read as not finished, polled again.",
                [(f"sum by (tier) (rate(seedance_task_status_unknown_total{{{T}}}[{RI}]))", "{{tier}}")],
                "reqps",
            ),
            Panel(
                "Failing deliveries",
                "Deliveries whose handling failed unexpectedly (retried with back-off), and those parked in "
                "seedance.jobs.dead after SEEDANCE_DELIVERY_LIMIT failures.",
                [
                    ("sum by (kind) (rate(seedance_deliveries_failed_total[" + RI + "]))", "failed {{kind}}"),
                    ("sum by (kind) (increase(seedance_deliveries_parked_total[" + RI + "]))", "parked {{kind}}"),
                ],
            ),
        ],
    ),
    (
        "Polling, output and cost",
        [
            Panel(
                "Polls per completed job",
                "Task-result polls per job that reached the API and ended.",
                [
                    (
                        f"sum by (tier) (rate(seedance_polls_total{{{T}}}[{RI}])) / clamp_min(sum by (tier) "
                        f'(rate(seedance_jobs_completed_total{{{T},status=~"succeeded|failed|expired"}}[{RI}])), 1e-9)',
                        "{{tier}}",
                    )
                ],
            ),
            Panel(
                "Billed video (seconds per hour)",
                "Seconds of successfully generated video per hour, by tier and "
                "resolution (the API bills successful videos only).",
                [
                    (
                        f"sum by (tier, resolution) (rate(seedance_video_seconds_total{{{T}}}[{RI}])) * 3600",
                        "{{tier}} {{resolution}}",
                    )
                ],
            ),
            Panel(
                "Estimated cost (USD per hour)",
                "Tokens of successful videos x the price per million tokens "
                "($price_audio with audio, $price_silent silent; flex at half price).",
                [
                    (
                        f'(sum by (tier) (rate({TOKENS}{{{T},audio="true"}}[{RI}])) * $price_audio + '
                        f'sum by (tier) (rate({TOKENS}{{{T},audio="false"}}[{RI}])) * $price_silent) '
                        f"* on(tier) group_left() ({TIER_PRICE_FACTOR}) * 3600 / 1e6",
                        "{{tier}}",
                    )
                ],
                "currencyUSD",
            ),
        ],
    ),
    (
        "Account usage (all replicas together)",
        [
            Panel(
                "Submits in the last minute vs limit",
                "The account's accepted submits of the last minute (permits in RabbitMQ, all replicas) against "
                "SEEDANCE_<TIER>_RPM.",
                [
                    (f"max by (tier) (seedance_account_submits_last_minute{{{T}}})", "last minute {{tier}}"),
                    (f'max by (tier) (seedance_tier_limit{{{T},limit="rpm"}})', "limit {{tier}}"),
                ],
            ),
            Panel(
                "Running slots taken vs limit",
                "Slot permits taken (tasks submitted and not ended, all replicas) against the running limit "
                "plus the queue ahead: at the top line, jobs wait in RabbitMQ.",
                [
                    (f"max by (tier) (seedance_account_slots_taken{{{T}}})", "taken {{tier}}"),
                    (
                        f'max by (tier) (seedance_tier_limit{{{T},limit="max_in_flight"}}) + '
                        f'max by (tier) (seedance_tier_limit{{{T},limit="queue_ahead"}})',
                        "limit {{tier}}",
                    ),
                ],
            ),
            Panel(
                "Queued upstream",
                "Tasks in flight beyond the running limit: they wait in the API's own queue (an estimate: it "
                "assumes no other client uses the account).",
                [
                    (
                        f"clamp_min(max by (tier) (seedance_tasks_in_flight{{{T}}}) - "
                        f'max by (tier) (seedance_tier_limit{{{T},limit="max_in_flight"}}), 0)',
                        "{{tier}}",
                    )
                ],
            ),
            Panel(
                "Tokens billed in 24 h vs daily budget",
                "Tokens of successful videos in the last 24 hours (all replicas) against "
                "SEEDANCE_<TIER>_DAILY_TOKENS (the budget also counts submits that did not succeed).",
                [
                    (f"sum by (tier) (increase({TOKENS}{{{T}}}[1d]))", "billed {{tier}}"),
                    (f'max by (tier) (seedance_tier_limit{{{T},limit="daily_tokens"}})', "budget {{tier}}"),
                ],
            ),
            Panel(
                "Limits leader",
                "Workers reconciling the account's limits: exactly one while any runs.",
                [("sum(seedance_limits_leader)", "leaders")],
                extra={"options": {"reduceOptions": {"calcs": ["lastNotNull"]}}},
                kind="stat",
            ),
        ],
    ),
    (
        "Keeping the video (SEEDANCE_STORAGE_URL)",
        [
            Panel(
                "Videos stored",
                "Succeeded jobs whose video was copied and verified (stored) or could not be (failed: the "
                "gateway's URL expired or refused first), per second.",
                [(f"sum by (tier, result) (rate(seedance_videos_stored_total{{{T}}}[{RI}]))", "{{tier}} {{result}}")],
                "ops",
            ),
            Panel(
                "Bytes stored",
                "Bytes of video written to the store, per second.",
                [(f"sum by (tier) (rate(seedance_video_stored_bytes_total{{{T}}}[{RI}]))", "{{tier}}")],
                "Bps",
            ),
            Panel(
                "Copy time",
                "p50/p95 of one successful copy: download, upload and read-back verification. Compare "
                "with the gateway's URL lifetime (about an hour).",
                [
                    (
                        f"histogram_quantile({q}, sum by (le) (rate(seedance_video_store_seconds_bucket[{RI}])))",
                        f"p{int(q * 100)}",
                    )
                    for q in (0.5, 0.95)
                ],
                "s",
            ),
            Panel(
                "Copy failures by reason",
                "Failed copy attempts per second (source_gone, source_error, store_error, verify, timeout, "
                "refused, config); most are tried again while the URL lives.",
                [(f"sum by (reason) (rate(seedance_video_store_failures_total[{RI}]))", "{{reason}}")],
                "ops",
            ),
            Panel(
                "Store access",
                "0 while a worker's store refuses its credentials (intake paused, nothing failed).",
                [("min(seedance_storage_access_ok)", "store access")],
                extra={"options": {"reduceOptions": {"calcs": ["lastNotNull"]}}},
                kind="stat",
            ),
        ],
    ),
]


def _panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if panel.kind == "timeseries" else {},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for i, (expr, legend) in enumerate(panel.targets)
        ],
        **panel.extra,
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for title, row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x = pid + 1, y + 1, 0
        for panel in row:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(panel, pid, x, y))
            pid, x = pid + 1, x + panel.width
        y += 8
    return {
        "uid": "seedance-worker",
        "title": "Seedance worker",
        "description": "Jobs, capacity, the video API, polling and cost of the Seedance worker (RED and USE).",
        "tags": ["seedance"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "editable": True,
        "panels": panels,
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "tier",
                    "label": "Tier",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": "label_values(seedance_jobs_received_total, tier)", "refId": "tier"},
                    "definition": "label_values(seedance_jobs_received_total, tier)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                },
                {
                    "name": "price_audio",
                    "label": "USD per M tokens (audio)",
                    "type": "textbox",
                    "query": "2.4",
                    "current": {"text": "2.4", "value": "2.4"},
                },
                {
                    "name": "price_silent",
                    "label": "USD per M tokens (silent)",
                    "type": "textbox",
                    "query": "1.2",
                    "current": {"text": "1.2", "value": "1.2"},
                },
            ]
        },
        "annotations": {"list": []},
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed JSON is stale")
    if parser.parse_args().check:
        if not OUT.exists() or OUT.read_text() != render():
            print(f"stale: {OUT} (run: make dashboard)", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

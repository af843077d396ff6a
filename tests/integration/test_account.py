"""One API account, several worker processes: together they keep the account's per-minute figure and its
running limit, keep a small bounded queue upstream, get (almost) no 429s, and survive losing a replica."""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime
from itertools import pairwise
from typing import Any

import pytest

from tests.integration.conftest import Bus, Mock, job, wait_ready

pytestmark = [pytest.mark.broker, pytest.mark.server, pytest.mark.slow]

SCALE = 0.05  # the mock's and the workers' clocks: a minute lasts 3 s, a 4 s 480p render about 1.4 s
RPM, RUNNING, AHEAD = 12, 8, 4  # the per-minute figure binds before the running limit


def stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def times(entries: list[dict[str, Any]], key: str) -> list[float]:
    return sorted(stamp(e[key]) for e in entries if e.get(key))


def most_in_any_window(moments: list[float], window: float) -> int:
    most, first = 0, 0
    for last, moment in enumerate(moments):
        while moments[first] <= moment - window:
            first += 1
        most = max(most, last - first + 1)
    return most


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in points:
        running += step
        most = max(most, running)
    return most


@pytest.mark.timeout(240)
async def test_three_replicas_keep_the_accounts_limits_even_when_one_is_killed(
    spawn_worker, bus: Bus, mock: Mock
) -> None:
    mock.config(
        time_scale=SCALE,
        model_rpm=None,
        queue_seconds={"default": 0},
        render_seconds={"default": 60},
        quotas={"default": {"rpm": RPM, "concurrency": RUNNING, "max_queued": 120}},
    )
    settings = {
        "poll_scale": SCALE,
        "default_rpm": RPM,
        "default_max_in_flight": RUNNING,
        "default_queue_ahead": AHEAD,
        "default_prefetch": 4,
        "in_flight_refresh_seconds": 0.2,
    }
    workers = [spawn_worker(**settings) for _ in range(3)]
    for worker in workers:
        await asyncio.to_thread(wait_ready, worker)
    ids = [f"acct-{i:03d}" for i in range(90)]
    await bus.publish_many([job(i, duration=4, resolution="480p") for i in ids])
    while sum(1 for i in ids if bus.terminal(i)) < 25:
        await asyncio.sleep(0.05)
    workers[0].signal(signal.SIGKILL)  # mid-run, whatever it held
    finals = await bus.wait_terminal(ids, timeout=180)
    assert {f["status"] for f in finals.values()} == {"succeeded"}

    journal = mock.requests()
    submits = [r for r in journal if r["endpoint"] == "submit"]
    accepted = times([r for r in submits if r["status"] == 200], "time")
    throttled = sum(1 for r in journal if r["status"] == 429)
    minute = 60 * SCALE
    busiest = most_in_any_window(accepted, minute)
    tasks = mock.tasks()
    running = most_at_once([(stamp(t["started_at"]), stamp(t["finished_at"])) for t in tasks])
    unfinished = most_at_once([(stamp(t["submitted_at"]), stamp(t["finished_at"])) for t in tasks])
    print(
        f"\n{len(accepted)} submits, busiest minute {busiest} (limit {RPM}), {throttled} of {len(journal)} "
        f"requests answered 429, at most {running} running (limit {RUNNING}), {unfinished} submitted and "
        f"unfinished (bound {RUNNING + AHEAD})"
    )
    assert busiest <= RPM + 1, "one over at most, from the clocks of broker and mock"
    assert throttled <= 0.01 * len(journal)
    assert running <= RUNNING
    assert unfinished <= RUNNING + AHEAD
    assert len(accepted) >= len(ids)


async def test_a_slot_that_frees_is_used_at_once_whatever_the_recount_interval(
    start_worker, bus: Bus, mock: Mock
) -> None:
    mock.config(queue_seconds={"default": 0}, render_seconds={"default": 500}, jitter=0)  # 0.24 s renders
    await start_worker(
        default_max_in_flight=1, default_queue_ahead=0, in_flight_refresh_seconds=30, default_poll_min_seconds=5
    )
    ids = [f"one-{i}" for i in range(4)]
    await bus.publish_many([job(i, duration=4, resolution="480p") for i in ids])
    await bus.wait_terminal(ids, timeout=20)
    tasks = sorted(mock.tasks(), key=lambda t: t["submitted_at"])
    gaps = [stamp(later["submitted_at"]) - stamp(earlier["finished_at"]) for earlier, later in pairwise(tasks)]
    assert len(tasks) == 4 and all(0 <= gap < 1.0 for gap in gaps), gaps


async def test_an_api_that_refuses_past_its_running_limit_pauses_the_tier_and_fails_nothing(
    start_worker, bus: Bus, mock: Mock
) -> None:
    # This API answers 429 instead of queueing: the tasks the worker sends ahead are refused.
    mock.config(
        queue_seconds={"default": 0},
        render_seconds={"default": 300},
        quotas={"default": {"concurrency": 2, "max_queued": 0}},
    )
    worker = await start_worker(default_max_in_flight=2, default_queue_ahead=3)
    ids = [f"refused-ahead-{i}" for i in range(10)]
    await bus.publish_many([job(i, duration=4, resolution="480p") for i in ids])
    finals = await bus.wait_terminal(ids, timeout=60)
    assert {f["status"] for f in finals.values()} == {"succeeded"}, "a 429 fails no job"
    throttled = [r for r in mock.submits() if r["status"] == 429]
    assert throttled, "the API did refuse the tasks sent ahead"
    assert await worker.sample("seedance_api_retries_total", endpoint="submit", reason="429") == len(throttled)
    tasks = mock.tasks()
    assert most_at_once([(stamp(t["started_at"]), stamp(t["finished_at"])) for t in tasks]) <= 2

"""A node of a three-node cluster SIGKILLed while jobs flow under tight quotas, with three workers
spread over the nodes (each given every node's URL): the node that leads the permit pools, or the one
that leads the job queue; a worker is connected to either. Nothing is lost, jobs keep flowing on the
other nodes, the account's figures hold, and once the node is back nothing needs a restart."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from datetime import datetime
from typing import Any

import aio_pika
import httpx
import pytest

from contracts.messages import DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, JOBS_EXCHANGE, TERMINAL_STATUSES
from tests.brokers import Cluster
from tests.cluster.test_dead_lettering import STRANDS
from tests.integration.conftest import IMAGE, NO_QUOTAS, wait_ready
from tests.servers import MockThread

pytestmark = [pytest.mark.broker, pytest.mark.server, pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

JOBS = 60
RUNNING = 3  # the account's running limit
QUEUE_AHEAD = 1
OUTAGE_SECONDS = 15


def _node_to_kill(cluster: Cluster, vhost: str, which: str) -> str:
    leaders = cluster.queue_leaders(vhost)
    queue = f"seedance.permits.default.slots.{RUNNING + QUEUE_AHEAD}" if which == "permits" else "seedance.jobs.default"
    return leaders[queue]


def _peak_upstream(tasks: list[dict[str, Any]]) -> int:
    """The most tasks the account had running or queued at once (submitted, not yet finished)."""
    points = []
    for task in tasks:
        start = datetime.fromisoformat(task["submitted_at"]).timestamp()
        end = datetime.fromisoformat(task["finished_at"]).timestamp() if task["finished_at"] else float("inf")
        points += [(start, 1), (end, -1)]
    peak = current = 0
    for _, step in sorted(points, key=lambda p: (p[0], p[1])):
        current += step
        peak = max(peak, current)
    return peak


def _metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


@pytest.mark.parametrize("which", ["permits", "jobs"])
async def test_a_node_loss_costs_no_job(
    which: str,
    cluster: Cluster,
    cluster_vhost: str,
    cluster_mock: MockThread,
    spawn_cluster_worker: Any,
    request: pytest.FixtureRequest,
) -> None:
    if cluster.version() < STRANDS:
        # When the killed node leads a tracking delay queue (the one that declared the topology first
        # leads them all, often the job queue's leader), RabbitMQ 3.10 keeps the tracking states that
        # expire after the kill in that queue (test_dead_lettering.py): a job or a few are never polled.
        reason = "RabbitMQ 3.10 strands at-least-once dead letters after a leader's node dies"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))
    mock = cluster_mock
    quotas = {**NO_QUOTAS, "default": {**NO_QUOTAS["default"], "concurrency": RUNNING, "max_queued": 50}}
    httpx.post(f"{mock.url}/_mock/config", json={"quotas": quotas}, timeout=5).raise_for_status()
    workers = [
        spawn_cluster_worker(i, default_max_in_flight=RUNNING, default_queue_ahead=QUEUE_AHEAD, default_prefetch=4)
        for i in range(3)
    ]
    for worker in workers:
        await asyncio.to_thread(wait_ready, worker, 60)

    # The producer's own connection stays on a node that is not killed (producers are not under test).
    victim = _node_to_kill(cluster, cluster_vhost, which)
    safe = next(node for node in cluster.nodes if node.name != victim)
    connection = await aio_pika.connect_robust(f"{safe.url}{cluster_vhost}")
    channel = await connection.channel(publisher_confirms=True)
    events = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    listen = await channel.declare_queue(exclusive=True)
    await listen.bind(events, routing_key="job.#")
    ended: dict[str, tuple[float, str]] = {}

    async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        event = json.loads(message.body)
        if event["status"] in TERMINAL_STATUSES:
            ended.setdefault(event["job_id"], (time.monotonic(), event["status"]))

    await listen.consume(on_event, no_ack=True)
    jobs = await channel.get_exchange(JOBS_EXCHANGE)
    ids = [f"{which}-{i}" for i in range(JOBS)]
    for job_id in ids:
        body = {"job_id": job_id, "request": {"image": IMAGE, "prompt": f"boat {job_id}", "duration": 4}}
        message = aio_pika.Message(json.dumps(body).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await jobs.publish(message, routing_key="job.default")

    async def until(predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                missing = sorted(set(ids) - set(ended))
                tasks = httpx.get(f"{mock.url}/_mock/tasks", timeout=10).json()["tasks"]
                theirs = [t for t in tasks if t["request"]["prompt"].removeprefix("boat ") in missing]
                queues = cluster.ctl(
                    "list_queues", "-p", cluster_vhost, "name", "messages_ready", "messages_unacknowledged", "consumers"
                )
                raise AssertionError(
                    f"{what} within {timeout} s ({len(ended)} of {JOBS} ended); missing {missing}; "
                    f"their tasks {theirs}; queues:\n{queues}"
                )
            await asyncio.sleep(0.1)

    await until(lambda: len(ended) >= JOBS // 3, 120, "a third of the jobs")
    node = cluster.node_of(victim)
    killed_at = time.monotonic()
    await asyncio.to_thread(node.kill)
    await asyncio.sleep(OUTAGE_SECONDS)
    during = sum(1 for at, _ in ended.values() if at > killed_at)
    await asyncio.to_thread(node.start)
    await until(lambda: len(ended) >= JOBS, 240, "every job")

    times = sorted(at for at, _ in ended.values())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    after_kill = [at for at in times if at > killed_at]
    first_after = after_kill[0] - killed_at if after_kill else float("inf")
    tasks = httpx.get(f"{mock.url}/_mock/tasks", timeout=10).json()["tasks"]
    per_job: dict[str, int] = {}
    for task in tasks:
        job_id = task["request"]["prompt"].removeprefix("boat ")
        per_job[job_id] = per_job.get(job_id, 0) + 1
    duplicates = sum(count - 1 for count in per_job.values())
    counted = sum(_metric(w.metrics_port, "seedance_submits_possibly_duplicated_total") for w in workers)
    peak = _peak_upstream(tasks)
    print(
        f"\nkilled {which} node {victim}: longest gap between completions {max(gaps):.1f} s, "
        f"first completion {first_after:.1f} s after the kill, {during} jobs ended during the "
        f"{OUTAGE_SECONDS} s outage; peak running+queued upstream {peak} (limit {RUNNING + QUEUE_AHEAD}, "
        f"the account's {RUNNING} + 50); "
        f"{duplicates} duplicate submits ({counted:.0f} counted as possible)"
    )
    assert {status for _, status in ended.values()} == {"succeeded"}, "every job ends succeeded"
    assert set(ended) == set(ids)
    assert first_after < 10, "jobs complete on the remaining nodes within 10 s"
    assert max(gaps) < 10
    assert peak <= RUNNING + QUEUE_AHEAD, "the account's running + queued limit held"
    assert duplicates <= counted, "every duplicate submit is one of the documented, counted cases"
    raw = await channel.get_underlay_channel()
    dead = await raw.queue_declare(DEAD_LETTER_QUEUE, passive=True)
    assert dead.message_count == 0, "nothing dead-lettered"

    # The node is back: every worker is ready again without a restart, exactly one leads, and no
    # connection was left with channels piling up.
    for worker in workers:
        await asyncio.to_thread(wait_ready, worker, 30)
    assert sum(_metric(w.metrics_port, "seedance_limits_leader") for w in workers) == 1
    listing = cluster.ctl(
        "list_connections", "-p", cluster_vhost, "channels", "client_properties", "--no-table-headers"
    )
    channels = [int(line.split()[0]) for line in listing.splitlines() if "seedance-worker" in line]
    assert len(channels) == 3 and max(channels) <= 16, f"channels per worker connection: {channels}"
    await connection.close()

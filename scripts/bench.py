"""Benchmarks of the worker against a real RabbitMQ and the mock over a socket: `make bench`.

Prints figures, asserts nothing. Each scenario runs in a vhost of its own and is repeated; medians are
reported with every run shown.

- throughput: jobs per second through one worker process when tasks finish instantly;
- latency: polls per task and the delay from the mock finishing a task to its terminal event, with
  realistic timings scaled down tenfold (reported in real and in unscaled seconds; the broker's own
  per-hop latency does not scale, so smaller scales overstate it);
- memory: the worker's resident memory idle and with 10,000 tasks in flight;
- http: CPU per API request of the worker's API client on each SEEDANCE_HTTP_TRANSPORT (the mock in a
  process of its own, so only the client's CPU is counted);
- job_ids: a worker starting with 300,000 remembered job ids (three days at 100,000 jobs a day, each
  with its `taken` and `ended` records): time to ready and resident memory, reading every record and
  starting from the leader's snapshot;
- cluster: jobs per second and CPU per job through a three-node RabbitMQ cluster (started here, as the
  cluster tests do) next to one node, then three workers on the cluster while the node leading the job
  queue is SIGKILLed for 15 s: the longest gap between two completions, the first completion after the
  kill, and jobs that never ended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx

from contracts.messages import TERMINAL_STATUSES
from tests.servers import free_port, start_mock, start_seaweedfs

KEY = "bench-key"
PERSISTENT = aio_pika.DeliveryMode.PERSISTENT


@contextmanager
def vhost() -> Iterator[str]:
    name = f"seedance-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True, capture_output=True
    )
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=False, capture_output=True)


def worker_env(
    amqp: str, mock_url: str, port: int, env_extra: dict[str, str] | None = None, **settings: Any
) -> dict[str, str]:
    """The environment of a benchmarked worker process: the broker, the mock, its metrics port, settings."""
    env = {
        **os.environ,
        **(env_extra or {}),
        "SEEDANCE_AMQP_URL": amqp,
        "SEEDANCE_API_BASE_URL": mock_url,
        "SEEDANCE_API_KEY": KEY,
        "SEEDANCE_METRICS_PORT": str(port),
        "SEEDANCE_METRICS_HOST": "127.0.0.1",
    }
    env.update({f"SEEDANCE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@contextmanager
def worker(
    amqp: str, mock_url: str, env_extra: dict[str, str] | None = None, **settings: Any
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    # INFO, the default: its cost is part of the job.
    env = worker_env(amqp, mock_url, port, env_extra, log_level=settings.pop("log_level", "INFO"), **settings)
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield proc, port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:13]) / TICK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def job(job_id: str, **request: Any) -> bytes:
    body = {
        "job_id": job_id,
        "request": {"image": "https://example.com/boat.png", "prompt": f"boat {job_id}", **request},
    }
    return json.dumps(body).encode()


async def run_jobs(
    amqp: str, count: int, timeout: float, prefix: str = "b", watch: tuple[int, ...] = (), **request: Any
) -> tuple[float, dict[str, Any]]:
    """Publish `count` jobs, wait for every terminal event; (seconds taken, terminal events by job).

    With `watch`, the CPU seconds those processes used over the same window go to `cpu_used[0]`."""
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        events = await channel.declare_exchange("seedance.events", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        for status in TERMINAL_STATUSES:
            await queue.bind(events, routing_key=f"job.{status}")
        jobs = await channel.get_exchange("seedance.jobs")
        done: dict[str, Any] = {}
        finished = asyncio.Event()

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            event = json.loads(message.body)
            if event["job_id"].startswith(prefix):
                done.setdefault(event["job_id"], event)
            if len(done) >= count:
                finished.set()

        await queue.consume(on_event, no_ack=True)
        cpu_before = sum(cpu_seconds(pid) for pid in watch)
        started = time.perf_counter()
        ids = [f"{prefix}{i}" for i in range(count)]
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    jobs.publish(
                        aio_pika.Message(job(i, **request), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key="job.default",
                    )
                    for i in ids[start : start + 500]
                )
            )
        await asyncio.wait_for(finished.wait(), timeout)
        seconds = time.perf_counter() - started
        cpu_used[0] = sum(cpu_seconds(pid) for pid in watch) - cpu_before
        return seconds, done


cpu_used = [0.0]


def mean_seconds(port: int, histogram: str) -> float:
    """The mean of one of the worker's histograms, read from its /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(histogram))
    count = float(values[f"{histogram}_count"])
    return float(values[f"{histogram}_sum"]) / count if count else 0.0


def unlimited(mock_url: str) -> None:
    """A fresh mock without quotas: the benchmarks measure the worker, not the mock's 429s."""
    httpx.post(f"{mock_url}/_mock/reset").raise_for_status()
    # The mock merges a configuration deeply: a quota is lifted by setting it to null.
    unset = {"rpm": None, "concurrency": None, "max_queued": None, "daily_tokens": None}
    config: dict[str, Any] = {"model_rpm": None, "quotas": {"default": unset, "flex": unset}}
    httpx.post(f"{mock_url}/_mock/config", json=config).raise_for_status()


# The worker as the peer runs: no quotas (the peer has none), instant tasks, one job = one submit, one poll
# and one terminal event.
FAST_WORKER: dict[str, Any] = {
    "poll_scale": 0.00001,
    "tracking_delays_ms": "10,50,100",
    "default_rpm": "",
    "default_max_in_flight": "",
    "default_prefetch": 64,
    "tracking_prefetch": 64,
}
PEER = Path(__file__).resolve().parents[2] / "shared" / "peers" / "celery" / "run.sh"


def _shown(figures: list[tuple[float, float]]) -> str:
    """Median jobs per second and CPU-ms per job of (rate, cpu) runs, with every run shown."""
    rates = ", ".join(f"{r:.0f}" for r, _ in figures)
    cpus = ", ".join(f"{c:.2f}" for _, c in figures)
    return (
        f"{statistics.median(r for r, _ in figures):.0f} jobs/s ({rates}), "
        f"{statistics.median(c for _, c in figures):.2f} CPU-ms/job ({cpus})"
    )


def throughput(runs: int, count: int, *, alone: bool = False) -> None:
    """Jobs per second and CPU per job through one worker process, next to the Celery peer doing the same
    job in the same run (interleaved rounds: the machine is shared and noisy); then two worker processes.
    `alone`: the one worker process only (to compare two versions of the worker quickly)."""
    mock = start_mock(time_scale=0.00001, api_key=KEY, seed=1)
    try:
        mine: list[tuple[float, float]] = []
        peer: list[tuple[float, float]] = []
        pair: list[float] = []
        windows: list[float] = []
        for _ in range(runs):
            unlimited(mock.url)
            with vhost() as amqp, worker(amqp, mock.url, **FAST_WORKER) as (proc, port):
                seconds, done = asyncio.run(run_jobs(amqp, count, 600, watch=(proc.pid,)))
                windows.append(mean_seconds(port, "seedance_submit_unconfirmed_seconds"))
            assert all(e["status"] == "succeeded" for e in done.values())
            mine.append((count / seconds, cpu_used[0] / count * 1000))
            if alone:
                continue
            if PEER.exists():
                with vhost() as amqp:
                    out = subprocess.run([str(PEER), amqp, str(count)], capture_output=True, text=True, check=True)
                line = json.loads(out.stdout.splitlines()[-1])
                peer.append((line["jobs_per_s"], line["cpu_ms_per_job"]))
            unlimited(mock.url)
            with vhost() as amqp, contextlib.ExitStack() as stack:
                for _ in range(2):
                    stack.enter_context(worker(amqp, mock.url, **FAST_WORKER))
                seconds, done = asyncio.run(run_jobs(amqp, count, 600, prefix="p"))
            pair.append(count / seconds)

        print(f"throughput: {count} instant jobs per run, medians of {runs} interleaved runs")
        print(f"  worker, one process:          {_shown(mine)}")
        print(
            "    API accepted -> tracking state confirmed (the double-submission window), mean: "
            f"{', '.join(f'{w * 1000:.0f}' for w in windows)} ms"
        )
        if alone:
            return
        if peer:
            print(f"  Celery prefork peer (-c 4):   {_shown(peer)}")
        else:
            print(f"  Celery prefork peer: not found at {PEER}")
        pairs = ", ".join(f"{r:.0f}" for r in pair)
        print(f"  worker, two processes:        {statistics.median(pair):.0f} jobs/s ({pairs})")
    finally:
        mock.stop()


def latency(runs: int, count: int, scale: float) -> None:
    """Two bursts through one worker: the first from a cold start (it has seen no task finish), the second
    once its schedule has learned how fast the API is."""
    mock = start_mock(time_scale=scale, api_key=KEY, seed=2)
    try:
        figures: dict[str, dict[str, list[float]]] = {
            phase: {"median": [], "p90": [], "polls": []} for phase in ("cold", "warm")
        }
        for _ in range(runs):
            unlimited(mock.url)
            with (
                vhost() as amqp,
                worker(
                    amqp,
                    mock.url,
                    poll_scale=scale,
                    default_max_in_flight=1000,
                    tracking_delays_ms="10,20,50,100,200,500,1000,3000,10000",
                ),
            ):
                for phase in ("cold", "warm"):
                    _, done = asyncio.run(run_jobs(amqp, count, 600, prefix=phase))
                    tasks = {t["task_id"]: t for t in httpx.get(f"{mock.url}/_mock/tasks").json()["tasks"]}
                    lags = sorted(
                        (
                            datetime.fromisoformat(e["finished_at"])
                            - datetime.fromisoformat(tasks[e["task_id"]]["finished_at"])
                        ).total_seconds()
                        for e in done.values()
                    )
                    mine = [tasks[e["task_id"]] for e in done.values()]
                    figures[phase]["median"].append(statistics.median(lags))
                    figures[phase]["p90"].append(lags[int(len(lags) * 0.9)])
                    figures[phase]["polls"].append(sum(t["polls"] for t in mine) / len(mine))
        print(
            f"latency: bursts of {count} jobs, mock and worker at time scale {scale} "
            f"(renders of ~{65 * scale:.1f} s real, ~65 s unscaled)"
        )
        for phase, f in figures.items():
            polls, median, p90 = (statistics.median(f[k]) for k in ("polls", "median", "p90"))
            print(
                f"  {phase}: polls per task {', '.join(f'{p:.2f}' for p in f['polls'])} (median {polls:.2f}); "
                f"task finished -> terminal event median {median * 1000:.0f} ms real = {median / scale:.1f} s "
                f"unscaled, p90 {p90 / scale:.1f} s unscaled"
            )
    finally:
        mock.stop()


def memory(in_flight: int) -> None:
    mock = start_mock(time_scale=1.0, api_key=KEY, seed=3)
    try:
        unlimited(mock.url)
        httpx.post(f"{mock.url}/_mock/faults", json={"outcomes": [{"outcome": "hang", "prompt_contains": "boat"}]})
        with (
            vhost() as amqp,
            worker(amqp, mock.url, default_max_in_flight="", default_rpm="", default_prefetch=64) as (
                proc,
                _,
            ),
        ):
            idle = rss_mib(proc.pid)

            async def publish() -> None:
                connection = await aio_pika.connect(amqp)
                async with connection:
                    channel = await connection.channel(publisher_confirms=True)
                    jobs = await channel.get_exchange("seedance.jobs")
                    for start in range(0, in_flight, 500):
                        await asyncio.gather(
                            *(
                                jobs.publish(
                                    aio_pika.Message(job(f"m{i}"), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                    routing_key="job.default",
                                )
                                for i in range(start, min(in_flight, start + 500))
                            )
                        )

            started = time.perf_counter()
            asyncio.run(publish())
            while httpx.get(f"{mock.url}/_mock/tasks").json()["count"] < in_flight:
                time.sleep(1)
            took = time.perf_counter() - started
            loaded = rss_mib(proc.pid)
            time.sleep(60)  # the first polls of the hanging tasks come about 48 s after submission
            polling = rss_mib(proc.pid)
        print(
            f"memory: worker RSS idle {idle:.1f} MiB; {in_flight} tasks in flight (submitted in {took:.0f} s) "
            f"{loaded:.1f} MiB; a minute later, while polling them, {polling:.1f} MiB"
        )
    finally:
        mock.stop()


def account(runs: int, jobs: int, backlog: int) -> None:
    """Three worker processes sharing one mock account of 10 running slots (renders of about 3 s):
    how busy they keep the slots, and how long a default job waits while a flex backlog is queued."""
    scale = 0.05  # the mock's clock and the workers' poll scale: a 4 s 480p clip renders in 3 s
    mock = start_mock(time_scale=scale, api_key=KEY, seed=5)
    settings: dict[str, Any] = {"poll_scale": scale, "default_max_in_flight": 10, "in_flight_refresh_seconds": 0.5}
    config = {
        "model_rpm": None,
        "jitter": 0,
        "queue_seconds": {"default": 0, "flex": 1800},
        "render_seconds": {"default": 125, "flex": 120},
        "quotas": {"default": {"concurrency": 10, "max_queued": 120}, "flex": {}},
    }
    try:
        utilisation, waits_p50, waits_p99 = [], [], []
        for run in range(runs):
            httpx.post(f"{mock.url}/_mock/reset").raise_for_status()
            httpx.post(f"{mock.url}/_mock/config", json=config).raise_for_status()
            with vhost() as amqp, contextlib.ExitStack() as stack:
                for _ in range(3):
                    stack.enter_context(worker(amqp, mock.url, **settings))
                _, done = asyncio.run(run_jobs(amqp, jobs, 600, prefix=f"u{run}-", duration=4, resolution="480p"))
                tasks = {t["task_id"]: t for t in httpx.get(f"{mock.url}/_mock/tasks").json()["tasks"]}
                mine = [tasks[e["task_id"]] for e in done.values()]
                renders = [_at(t["finished_at"]) - _at(t["started_at"]) for t in mine]
                span = max(_at(t["finished_at"]) for t in mine) - min(_at(t["submitted_at"]) for t in mine)
                utilisation.append(jobs / 10 * statistics.mean(renders) / span)
            # The wait behind a flex backlog, with the workers' clocks at production speed (limits per real
            # minute, flex polls 30 s apart): a scaled-down clock would poll the 1,000 flex tasks in flight
            # twenty times as often as production does and measure that instead.
            httpx.post(f"{mock.url}/_mock/reset").raise_for_status()
            httpx.post(f"{mock.url}/_mock/config", json=config).raise_for_status()
            with vhost() as amqp, contextlib.ExitStack() as stack:
                for _ in range(3):
                    stack.enter_context(worker(amqp, mock.url, default_max_in_flight=10))
                waits = asyncio.run(default_waits_behind_flex(amqp, backlog, 40))
                waits_p50.append(statistics.median(waits))
                waits_p99.append(waits[min(len(waits) - 1, int(len(waits) * 0.99))])
    finally:
        mock.stop()
    print(
        f"account: 3 workers, one account of 10 running slots, {jobs} jobs of 3 s renders: slot utilisation "
        f"{', '.join(f'{u:.1%}' for u in utilisation)} (median {statistics.median(utilisation):.1%}); "
        f"a default job's wait (created to submitted) with {backlog} flex jobs queued: p50 "
        f"{statistics.median(waits_p50) * 1000:.0f} ms, p99 {statistics.median(waits_p99) * 1000:.0f} ms "
        f"(runs: {', '.join(f'{w * 1000:.0f}' for w in waits_p99)} ms)"
    )


async def default_waits_behind_flex(amqp: str, backlog: int, count: int) -> list[float]:
    """Queue `backlog` flex jobs, then publish `count` default jobs a second apart (well within the default
    tier's limits: 3 s renders, polled 2 s apart, hold about 6 of its 15 slots); their created-to-submitted
    waits, sorted."""
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        events = await channel.declare_exchange("seedance.events", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(events, routing_key="job.submitted")
        jobs = await channel.get_exchange("seedance.jobs")
        waits: dict[str, float] = {}
        all_in = asyncio.Event()

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            event = json.loads(message.body)
            if event["job_id"].startswith("urgent-"):
                waits[event["job_id"]] = _at(event["submitted_at"]) - _at(event["created_at"])
                if len(waits) >= count:
                    all_in.set()

        await queue.consume(on_event, no_ack=True)
        for start in range(0, backlog, 500):
            await asyncio.gather(
                *(
                    jobs.publish(
                        aio_pika.Message(job(f"flex-{i}", service_tier="flex"), delivery_mode=PERSISTENT),
                        routing_key="job.flex",
                    )
                    for i in range(start, min(backlog, start + 500))
                )
            )
        for i in range(count):
            body = json.loads(job(f"urgent-{i}"))
            body["created_at"] = datetime.now(UTC).isoformat()
            await jobs.publish(
                aio_pika.Message(json.dumps(body).encode(), delivery_mode=PERSISTENT), routing_key="job.default"
            )
            await asyncio.sleep(1.0)
        await asyncio.wait_for(all_in.wait(), 120)
        return sorted(waits.values())


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def storage(runs: int, videos: int, megabytes: int) -> None:
    """Copy throughput from the mock to a real S3-compatible server, and peak memory on a 200 MB video."""
    import tempfile  # noqa: PLC0415

    mock = start_mock(time_scale=0.001, api_key=KEY, seed=4)
    with tempfile.TemporaryDirectory(prefix="seedance-bench-s3-") as directory:
        store = start_seaweedfs(directory)
        try:
            rates, per_copy, peaks = [], [], []
            for run in range(runs):
                unlimited(mock.url)
                size = megabytes * 1_000_000
                httpx.post(f"{mock.url}/_mock/config", json={"video_bytes_per_second": size // 5}).raise_for_status()
                url = f"s3://{store.bucket}/bench-{uuid.uuid4().hex[:8]}"
                with (
                    vhost() as amqp,
                    worker(amqp, mock.url, store.env(), storage_url=url, poll_scale=0.001) as (
                        proc,
                        port,
                    ),
                ):
                    _, done = asyncio.run(run_jobs(amqp, videos, 600, prefix=f"s{run}-"))
                    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
                finished = [datetime.fromisoformat(e["finished_at"]) for e in done.values()]
                tasks = {t["task_id"]: t for t in httpx.get(f"{mock.url}/_mock/tasks").json()["tasks"]}
                rendered = [datetime.fromisoformat(tasks[e["task_id"]]["finished_at"]) for e in done.values()]
                assert all(e["stored_video"]["bytes"] == size for e in done.values())
                seconds = (max(finished) - min(rendered)).total_seconds()
                rates.append(videos * size / seconds / 1e6)
                copy_seconds = _sample(metrics, "seedance_video_store_seconds_sum")
                per_copy.append(videos * size / copy_seconds / 1e6)
                httpx.post(f"{mock.url}/_mock/config", json={"video_bytes_per_second": 40_000_000}).raise_for_status()
                with (
                    vhost() as amqp,
                    worker(amqp, mock.url, store.env(), storage_url=url, poll_scale=0.001) as (
                        proc,
                        _,
                    ),
                ):
                    _, done = asyncio.run(run_jobs(amqp, 1, 600, prefix=f"big{run}-"))
                    peaks.append(peak_rss_mib(proc.pid))
        finally:
            store.stop()
            mock.stop()
    shown = ", ".join(f"{r:.0f}" for r in rates)
    print(
        f"storage: {videos} videos of {megabytes} MB, mock -> SeaweedFS (S3), copy + read-back verification: "
        f"{shown} MB/s overall, median {statistics.median(rates):.0f} MB/s; each copy (4 at once) "
        f"{statistics.median(per_copy):.0f} MB/s; peak worker RSS copying a 200 MB video "
        f"{', '.join(f'{p:.0f}' for p in peaks)} MiB"
    )


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def http_transports(runs: int, requests: int) -> None:
    """CPU per task-result request through the worker's ApiClient, on each transport, interleaved."""
    import resource  # noqa: PLC0415

    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from contracts.api import SubmitRequest  # noqa: PLC0415
    from worker.api_client import ApiClient  # noqa: PLC0415
    from worker.http_clients import Transport, http_client, timeouts  # noqa: PLC0415
    from worker.metrics import Metrics  # noqa: PLC0415

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    async def one_run(kind: Transport, url: str) -> float:
        api = ApiClient(http_client(kind, timeouts(30)), url, lambda: KEY, Metrics(CollectorRegistry()))
        try:
            task_id = await api.submit(SubmitRequest(image="https://example.com/a.png", prompt="bench"))
            gate = asyncio.Semaphore(32)

            async def poll() -> None:
                async with gate:
                    await api.task_result(task_id)

            await asyncio.gather(*(poll() for _ in range(200)))  # connections open, caches warm
            started = cpu()
            await asyncio.gather(*(poll() for _ in range(requests)))
            return (cpu() - started) / requests * 1000
        finally:
            await api.aclose()

    mock = start_mock(time_scale=0.00001, api_key=KEY, seed=1)
    try:
        figures: dict[Transport, list[float]] = {"aiohttp": [], "httpx": []}
        for _ in range(runs):
            for kind, values in figures.items():
                with asyncio.Runner(loop_factory=_event_loop()) as runner:
                    values.append(runner.run(one_run(kind, mock.url)))
        print(f"http: CPU-ms per task-result request through ApiClient, {requests} requests, 32 at once")
        for kind, values in figures.items():
            shown = ", ".join(f"{v:.3f}" for v in values)
            print(f"  SEEDANCE_HTTP_TRANSPORT={kind:<8} {statistics.median(values):.3f} ({shown})")
    finally:
        mock.stop()


def job_ids(runs: int, ids: int) -> None:  # noqa: PLR0915 - one scenario, its helpers inside
    """Start-up of a worker whose stream holds `ids` jobs' records: from every record, then from a snapshot."""
    import re  # noqa: PLC0415

    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from contracts.brokers import ClusterConnection  # noqa: PLC0415
    from worker.job_ids import IDS_ARGUMENTS, JobIds  # noqa: PLC0415
    from worker.metrics import Metrics  # noqa: PLC0415
    from worker.topology import IDS_STREAM  # noqa: PLC0415

    async def fill(amqp: str) -> None:
        connection = await aio_pika.connect(amqp)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            raw = await channel.get_underlay_channel()
            await raw.queue_declare(IDS_STREAM, durable=True, arguments=IDS_ARGUMENTS)
            batch: list[Any] = []
            for n in range(ids):
                job_id = str(uuid.uuid4())
                for record in (
                    {"job_id": job_id, "record": "taken", "take": n + 1},
                    {"job_id": job_id, "record": "ended"},
                ):
                    batch.append(
                        raw.basic_publish(json.dumps(record, separators=(",", ":")).encode(), routing_key=IDS_STREAM)
                    )
                if len(batch) >= 2000:
                    await asyncio.gather(*batch)
                    batch = []
            await asyncio.gather(*batch)

    async def snapshot(amqp: str) -> int:
        connection = ClusterConnection([amqp])
        await connection.connect()
        try:
            remembered = JobIds(Metrics(CollectorRegistry()))
            await remembered.open(connection, lambda: True)
            size = await remembered.snapshot()
            await remembered.close()
            return size
        finally:
            await connection.close()

    def start(amqp: str, mock_url: str, log: Path) -> tuple[float, float, float, str]:
        """Seconds from spawn to ready, the replay's own seconds (its log line), RSS when ready (MiB)."""
        port = free_port()
        env = worker_env(amqp, mock_url, port, log_format="text")
        started = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while time.monotonic() - started < 300:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        break
                time.sleep(0.05)
            ready = time.monotonic() - started
            rss = rss_mib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        found = re.search(r"job ids \(read in ([0-9.]+) s, from (its start|a snapshot)", log.read_text())
        if found is None:
            return ready, float("nan"), rss, "?"
        return ready, float(found.group(1)), rss, found.group(2)

    mock = start_mock(time_scale=0.001, api_key=KEY, seed=1)
    try:
        with vhost() as amqp:
            began = time.monotonic()
            asyncio.run(fill(amqp))
            print(f"job_ids: {ids} jobs, {2 * ids} records written in {time.monotonic() - began:.0f} s")
            log = Path(f"/tmp/seedance-bench-{uuid.uuid4().hex[:8]}.log")
            for prepare in (None, snapshot):
                size = asyncio.run(prepare(amqp)) if prepare is not None else 0
                figures = [start(amqp, mock.url, log) for _ in range(runs)]
                ready, replay, rss = (statistics.median(f[i] for f in figures) for i in range(3))  # type: ignore[type-var]
                shown = "; ".join(f"{a:.1f} s, {b:.1f} s, {c:.0f} MiB from {d}" for a, b, c, d in figures)
                what = f"after a {size / 1e6:.1f} MB snapshot" if prepare else "every record"
                print(
                    f"  {what}: ready after {ready:.1f} s (reading the ids {replay:.1f} s), RSS when ready "
                    f"{rss:.0f} MiB (runs: {shown})"
                )
            log.unlink(missing_ok=True)
    finally:
        mock.stop()


def _on_cluster_vhost(cluster: Any) -> list[str]:
    """A vhost of its own on `cluster`: every node's URL for it."""
    name = f"seedance-bench-{uuid.uuid4().hex[:8]}"
    cluster.ctl("add_vhost", name)
    cluster.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return [f"{url}{name}" for url in cluster.urls]


async def _completions(amqp: str, count: int, prefix: str, kill: Any, timeout: float) -> tuple[list[float], int]:
    """Publish `count` jobs; call `kill()` (in a thread) once a third have ended. The monotonic times of
    their terminal events, and how many never ended within `timeout`."""
    connection = await aio_pika.connect(amqp)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        events = await channel.declare_exchange("seedance.events", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        for status in TERMINAL_STATUSES:
            await queue.bind(events, routing_key=f"job.{status}")
        ended: dict[str, float] = {}
        a_third, every = asyncio.Event(), asyncio.Event()

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            job_id = json.loads(message.body)["job_id"]
            if job_id.startswith(prefix):
                ended.setdefault(job_id, time.monotonic())
            if len(ended) >= count // 3:
                a_third.set()
            if len(ended) >= count:
                every.set()

        await queue.consume(on_event, no_ack=True)
        jobs = await channel.get_exchange("seedance.jobs")
        for i in range(count):
            message = aio_pika.Message(job(f"{prefix}{i}"), delivery_mode=PERSISTENT)
            await jobs.publish(message, routing_key="job.default")
        async with asyncio.timeout(timeout):
            await a_third.wait()
        await asyncio.to_thread(kill)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(every.wait(), timeout)
        return sorted(ended.values()), count - len(ended)


def _cluster_throughput(cluster: Any, mock_url: str, on_cluster: bool, count: int) -> tuple[float, float]:
    """(jobs per second, CPU-ms per job) of one worker process on the cluster or on the host's node."""
    unlimited(mock_url)
    context: Any = contextlib.nullcontext(",".join(_on_cluster_vhost(cluster))) if on_cluster else vhost()
    with context as amqp, worker(amqp, mock_url, **FAST_WORKER) as (proc, _):
        seconds, done = asyncio.run(run_jobs(amqp.split(",")[0], count, 600, watch=(proc.pid,)))
    assert all(e["status"] == "succeeded" for e in done.values())
    return count / seconds, cpu_used[0] / count * 1000


def _cluster_node_kill(cluster: Any, mock_url: str, count: int, run: int) -> str:
    """Three workers on the cluster; the job queue's leader SIGKILLed once a third of the jobs ended,
    started again after OUTAGE_SECONDS."""
    unlimited(mock_url)
    urls = _on_cluster_vhost(cluster)
    vhost_name = urls[0].rsplit("/", 1)[1]
    killed: list[float] = []
    timers: list[threading.Timer] = []
    with contextlib.ExitStack() as stack:
        for i in range(3):
            amqp = ",".join(urls[i:] + urls[:i])
            stack.enter_context(worker(amqp, mock_url, **{**FAST_WORKER, "in_flight_refresh_seconds": 0.5}))
        victim = cluster.node_of(cluster.queue_leaders(vhost_name)["seedance.jobs.default"])
        producer = next(url for node, url in zip(cluster.nodes, urls, strict=True) if node is not victim)

        def kill() -> None:
            killed.append(time.monotonic())
            victim.kill()
            timers.append(threading.Timer(OUTAGE_SECONDS, victim.start))
            timers[0].start()

        times, lost = asyncio.run(_completions(producer, count, f"k{run}-", kill, 300))
    for timer in timers:
        timer.join()  # the node is back before the next run
    longest = max((b - a for a, b in itertools.pairwise(times)), default=float("nan"))
    after = [t - killed[0] for t in times if t > killed[0]]
    first = f"{after[0]:.1f} s" if after else "none"
    return f"longest gap {longest:.1f} s, first completion {first} after the kill, {lost} of {count} never ended"


OUTAGE_SECONDS = 15


def cluster_run(runs: int, count: int) -> None:
    """One worker through a three-node cluster next to one node; then a node kill under three workers."""
    from tests.brokers import start_cluster  # noqa: PLC0415 - only this scenario starts brokers

    mock = start_mock(time_scale=0.00001, api_key=KEY, seed=3)
    started = time.perf_counter()
    cluster = start_cluster(Path(tempfile.mkdtemp(prefix="seedance-bench-cluster-")))
    print(f"cluster: three nodes started and joined in {time.perf_counter() - started:.0f} s")
    try:
        single, three = [], []
        for _ in range(runs):
            single.append(_cluster_throughput(cluster, mock.url, False, count))
            three.append(_cluster_throughput(cluster, mock.url, True, count))
        kills = [_cluster_node_kill(cluster, mock.url, count, run) for run in range(runs)]
    finally:
        cluster.stop()
        mock.stop()

    print(f"cluster: {count} instant jobs per run through one worker process, medians of {runs} interleaved runs")
    print(f"  one node:             {_shown(single)}")
    print(f"  three-node cluster:   {_shown(three)}")
    print(f"  the job queue's leader SIGKILLed for {OUTAGE_SECONDS} s under three workers, {count} jobs:")
    for line in kills:
        print(f"    {line}")


def _event_loop() -> Any:
    """The worker's loop (uvloop) where it is installed."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--in-flight", type=int, default=10000)
    parser.add_argument("--scale", type=float, default=0.1, help="time scale of the latency runs")
    parser.add_argument(
        "--only", choices=["throughput", "latency", "memory", "storage", "account", "http", "job_ids", "cluster"]
    )
    parser.add_argument("--ids", type=int, default=300_000, help="job_ids: jobs remembered")
    parser.add_argument("--alone", action="store_true", help="throughput: the one worker process only")
    args = parser.parse_args()
    if args.only in (None, "throughput"):
        throughput(args.runs, args.jobs, alone=args.alone)
    if args.only in (None, "latency"):
        latency(args.runs, min(args.jobs, 200), args.scale)
    if args.only in (None, "memory"):
        memory(args.in_flight)
    if args.only in (None, "storage"):
        storage(args.runs, 10, 50)
    if args.only in (None, "account"):
        account(args.runs, 100, 5000)
    if args.only in (None, "http"):
        http_transports(args.runs, 5000)
    if args.only in (None, "job_ids"):
        job_ids(args.runs, args.ids)
    if args.only in (None, "cluster"):
        cluster_run(args.runs, min(args.jobs, 600))


if __name__ == "__main__":
    main()

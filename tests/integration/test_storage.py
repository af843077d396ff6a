"""Keeping every video: the worker copies succeeded videos into a real S3-compatible server (SeaweedFS)
and a real directory, verifies them, and survives an expired source, a refused credential and a kill."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import obstore
import pytest
from obstore.store import from_url

from tests.integration.conftest import NO_QUOTAS, Bus, Mock, WorkerProcess, job, wait_for, wait_ready
from tests.servers import SeaweedFS

pytestmark = [pytest.mark.broker, pytest.mark.server]


@pytest.fixture
def prefix() -> str:
    return f"run-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The store's credentials in this process's environment, as a deployment would set them."""
    env = seaweedfs.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


async def stored_object(seaweedfs: SeaweedFS, url: str) -> bytes:
    """The bytes of an object, read with the store's own credentials (not the worker's)."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    store = from_url(
        f"s3://{bucket}",
        config={
            "access_key_id": seaweedfs.access_key,
            "secret_access_key": seaweedfs.secret_key,
            "endpoint": seaweedfs.endpoint,
            "region": "us-east-1",
        },
        client_options={"allow_http": True},
    )
    return bytes(await (await obstore.get_async(store, key)).bytes_async())


async def served(event: dict[str, Any], mock: Mock) -> bytes:
    """What the mock serves at the event's video URL (its bytes are deterministic per task)."""
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(event["video_url"])
        assert response.status_code == 200
        return response.content


async def test_every_video_of_both_tiers_lands_in_s3_verified(
    start_worker, bus: Bus, mock: Mock, seaweedfs: SeaweedFS, s3_env: dict[str, str], prefix: str
) -> None:
    mock.config(video_bytes_per_second=150_000, quotas=NO_QUOTAS)
    worker = await start_worker(storage_url=f"s3://{seaweedfs.bucket}/{prefix}")
    default_ids = [f"keep-{i}" for i in range(20)]
    flex_ids = [f"keep-flex-{i}" for i in range(10)]
    await bus.publish_many([job(j, duration=4 + n % 3) for n, j in enumerate(default_ids)])
    await bus.publish_many([job(j, service_tier="flex", resolution="480p") for j in flex_ids], routing_key="job.flex")
    finals = await bus.wait_terminal([*default_ids, *flex_ids], timeout=90)
    total = 0
    for job_id, event in finals.items():
        assert event["status"] == "succeeded", event
        stored = event["stored_video"]
        assert event["storage_error"] is None
        assert stored["url"] == f"s3://{seaweedfs.bucket}/{prefix}/{job_id}/{event['task_id']}.mp4"
        assert stored["content_type"] == "video/mp4"
        source = await served(event, mock)
        kept = await stored_object(seaweedfs, stored["url"])
        assert kept == source, job_id
        assert stored["bytes"] == len(kept) and stored["sha256"] == hashlib.sha256(kept).hexdigest()
        total += len(kept)
    assert await worker.sample("seedance_videos_stored_total", tier="default", result="stored") == 20
    assert await worker.sample("seedance_videos_stored_total", tier="flex", result="stored") == 10
    stored_bytes = await worker.sample("seedance_video_stored_bytes_total", tier="default")
    stored_bytes += await worker.sample("seedance_video_stored_bytes_total", tier="flex")
    assert stored_bytes == total
    assert await worker.sample("seedance_video_store_seconds_count") == 30


async def test_a_directory_store_keeps_the_files(start_worker, bus: Bus, mock: Mock, tmp_path: Path) -> None:
    directory = tmp_path / "kept videos"
    await start_worker(storage_url=f"file://{directory}")
    await bus.publish(job("dir-1", duration=7))
    event = (await bus.wait_terminal(["dir-1"]))["dir-1"]
    path = directory / "dir-1" / f"{event['task_id']}.mp4"
    assert event["stored_video"]["url"] == f"file://{path}"
    assert path.read_bytes() == await served(event, mock)


async def test_a_source_that_expired_ends_succeeded_with_a_storage_error(
    start_worker, bus: Bus, mock: Mock, tmp_path: Path
) -> None:
    mock.config(video_url_ttl=0)  # the gateway's URL is dead by the time anyone fetches it
    worker = await start_worker(storage_url=f"file://{tmp_path}")
    await bus.publish(job("late-copy-1"))
    event = (await bus.wait_terminal(["late-copy-1"]))["late-copy-1"]
    assert event["status"] == "succeeded", "the video was rendered and billed"
    assert event["stored_video"] is None
    assert event["storage_error"]["code"] == "VIDEO_UNAVAILABLE"
    assert "403" in event["storage_error"]["message"]
    assert await worker.sample("seedance_videos_stored_total", tier="default", result="failed") == 1
    assert await worker.sample("seedance_video_store_failures_total", reason="source_gone") == 1


async def test_a_copy_that_keeps_failing_stops_when_the_url_expires(
    start_worker, bus: Bus, mock: Mock, tmp_path: Path
) -> None:
    mock.config(video_url_ttl=3)
    mock.faults(status_rates={"503": 1.0}, endpoints=["video"])
    await start_worker(storage_url=f"file://{tmp_path}")
    await bus.publish(job("flaky-copy-1"))
    event = (await bus.wait_terminal(["flaky-copy-1"], timeout=30))["flaky-copy-1"]
    assert event["status"] == "succeeded" and event["stored_video"] is None
    assert event["storage_error"]["code"] == "VIDEO_URL_EXPIRED"
    downloads = [r for r in mock.requests() if r["endpoint"] == "video"]
    assert len(downloads) >= 2, "tried again while the URL lived"


async def test_a_store_that_refuses_the_credentials_pauses_intake_and_fails_nothing(
    start_worker,
    bus: Bus,
    mock: Mock,
    seaweedfs: SeaweedFS,
    s3_env: dict[str, str],
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    worker = await start_worker(storage_url=f"s3://{seaweedfs.bucket}/{prefix}")
    await bus.publish(job("refused-1"))

    async def refused() -> bool:
        answer = (await worker.readyz()).json()
        return answer["storage_access_ok"] is False and answer["ready"] is False

    await wait_for(refused, what="readiness naming the store")
    assert await worker.sample("seedance_storage_access_ok") == 0
    await wait_for(lambda: _consumers(bus, "seedance.jobs.default", 0), what="job intake paused")
    assert not bus.terminal("refused-1"), "nothing failed"
    readiness = (await worker.readyz()).json()
    assert "not-the-secret" not in str(readiness) and "not-the-secret" not in await worker.metrics()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)  # the secret is fixed
    event = (await bus.wait_terminal(["refused-1"], timeout=30))["refused-1"]
    assert event["status"] == "succeeded" and event["stored_video"] is not None
    assert await stored_object(seaweedfs, event["stored_video"]["url"]) == await served(event, mock)
    await wait_for(lambda: _ready(worker), what="ready again")


async def test_a_slow_copy_never_delays_polling(
    start_worker, bus: Bus, mock: Mock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.handler")
    mock.config(video_bytes_per_second=1_000_000)
    mock.faults(video_bandwidth=500_000)  # 5 MB at 0.5 MB/s: a 10 s copy
    await start_worker(storage_url=f"file://{tmp_path}", storage_concurrency=1)
    await bus.publish(job("slow-copy-1"))
    await wait_for(lambda: "copying the video" in caplog.text, what="the first copy under way")
    await bus.publish(job("polled-1"))
    # The second task is polled to its end and waits for the (only) copy slot, while the first still copies.
    await wait_for(lambda: _depth(bus, "seedance.store.default", 1), timeout=8, what="the second task done")
    assert not bus.terminal("slow-copy-1"), "the first copy is still running"
    finals = await bus.wait_terminal(["slow-copy-1", "polled-1"], timeout=60)
    assert all(f["stored_video"] for f in finals.values())


async def test_a_worker_killed_mid_copy_leaves_the_copy_to_another(
    spawn_worker, bus: Bus, mock: Mock, seaweedfs: SeaweedFS, prefix: str
) -> None:
    mock.config(video_bytes_per_second=8_000_000)  # 40 MB
    mock.faults(video_bandwidth=8_000_000)  # a 5 s copy
    url = f"s3://{seaweedfs.bucket}/{prefix}"
    first = spawn_worker(storage_url=url, env=seaweedfs.env())
    await asyncio.to_thread(wait_ready, first)
    await bus.publish(job("killed-1"))
    await wait_for(lambda: "copying the video" in first.log(), timeout=20, what="the copy under way")
    first.signal(signal.SIGKILL)
    await asyncio.to_thread(first.proc.wait)
    assert not bus.terminal("killed-1")
    mock.faults()
    second = spawn_worker(storage_url=url, env=seaweedfs.env())
    await asyncio.to_thread(wait_ready, second)
    event = (await bus.wait_terminal(["killed-1"], timeout=60))["killed-1"]
    assert event["status"] == "succeeded"
    assert await stored_object(seaweedfs, event["stored_video"]["url"]) == await served(event, mock)
    assert "copying the video" in second.log(), "the second worker made the copy again"
    assert len(mock.tasks()) == 1, "copied again, not submitted again"


async def test_a_200_mb_video_is_copied_in_under_150_mib_of_memory(
    spawn_worker, bus: Bus, mock: Mock, seaweedfs: SeaweedFS, prefix: str
) -> None:
    mock.config(video_bytes_per_second=40_000_000)  # 5 s at 720p: 200 MB
    worker = spawn_worker(storage_url=f"s3://{seaweedfs.bucket}/{prefix}", env=seaweedfs.env())
    await asyncio.to_thread(wait_ready, worker)
    await bus.publish(job("big-1"))
    event = (await bus.wait_terminal(["big-1"], timeout=120))["big-1"]
    assert event["stored_video"]["bytes"] == 200_000_000
    peak = _peak_rss_mib(worker)
    print(f"\npeak RSS copying a 200 MB video: {peak:.1f} MiB")
    assert peak < 150


def _peak_rss_mib(worker: WorkerProcess) -> float:
    with open(f"/proc/{worker.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def _consumers(bus: Bus, queue: str, expected: int) -> bool:
    return await bus.consumers(queue) == expected


async def _depth(bus: Bus, queue: str, expected: int) -> bool:
    return await bus.queue_depth(queue) == expected


async def _ready(worker: Any) -> bool:
    return (await worker.readyz()).status_code == 200

"""Copying videos into a store: a real directory (`file://`) and the mock in-process as the source; the
copy stage of the handler on top. (The same against a real S3-compatible server: tests/integration.)"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from mock_server import Faults, MockConfig, create_app
from mock_server.app import MockApp
from mock_server.testing import InProcessTransport
from tests.factories import waiting_for_the_copy
from worker.access import Access
from worker.api_client import ApiClient
from worker.errors import CopyFailed, StoreRefused, VideoGone
from worker.handler import Delivery, Finish, JobHandler, Submit, Track
from worker.limits import TierLimits
from worker.metrics import Metrics
from worker.settings import Settings
from worker.stopping import Stopping
from worker.storage import VideoStore, check_url
from worker.submitting import Submitter
from worker.tracking import TrackingState

JOB = b'{"job_id": "job-1", "request": {"image": "https://example.com/boat.png", "prompt": "boat"}}'


@dataclass
class Rig:
    app: MockApp
    http: httpx.AsyncClient
    store: VideoStore
    directory: Path
    metrics: Metrics

    async def video_url(self, **request: object) -> str:
        """Submit a task to the mock and wait for its video URL."""
        body = {"image": "https://example.com/boat.png", "prompt": "boat", **request}
        task_id = (await self.http.post("/v3/async/seedance-v1.5-pro-i2v", json=body)).json()["task_id"]
        for _ in range(1000):
            result = (await self.http.get("/v3/async/task-result", params={"task_id": task_id})).json()
            if result["videos"]:
                return str(result["videos"][0]["video_url"])
            await asyncio.sleep(0.005)
        pytest.fail("no video")

    def faults(self, **faults: object) -> None:
        self.app.state.set_faults(Faults.model_validate(faults))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    app = create_app(MockConfig(api_key="k", time_scale=0.0001, video_bytes_per_second=300_000), seed=4)
    transport = InProcessTransport(app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://mock", headers={"Authorization": "Bearer k"}, timeout=5
    ) as http:
        metrics = Metrics(CollectorRegistry())
        store = VideoStore(f"file://{tmp_path}/videos", http, metrics, timeout_seconds=30)
        yield Rig(app, http, store, tmp_path / "videos", metrics)


async def test_a_copy_stores_exactly_the_served_bytes_under_a_key_naming_the_job(rig: Rig) -> None:
    url = await rig.video_url(duration=6)
    served = (await rig.http.get(url)).content
    stored = await rig.store.copy(url, VideoStore.key("order-7:clip-1", "task-9"))
    path = rig.directory / "order-7:clip-1" / "task-9.mp4"
    assert path.read_bytes() == served
    assert stored.url == f"file://{rig.directory}/order-7:clip-1/task-9.mp4"
    assert (stored.bytes, stored.sha256) == (len(served), hashlib.sha256(served).hexdigest())
    assert stored.content_type == "video/mp4"
    assert stored.bytes == 6 * 300_000
    assert rig.metrics.registry.get_sample_value("seedance_video_store_seconds_count") == 1


async def test_a_second_copy_overwrites_the_first(rig: Rig) -> None:
    url = await rig.video_url()
    key = VideoStore.key("job-1", "task-1")
    first = await rig.store.copy(url, key)
    second = await rig.store.copy(url, key)
    assert first == second
    assert [p.name for p in (rig.directory / "job-1").iterdir()] == ["task-1.mp4"]


async def test_an_expired_or_missing_source_is_gone_for_good(rig: Rig) -> None:
    url = await rig.video_url()
    rig.app.state.config = rig.app.state.config.model_copy(update={"time_scale": 1.0})
    rig.app.state.advance(3601)
    with pytest.raises(VideoGone) as caught:
        await rig.store.copy(url, "x/y.mp4")
    assert "403" in caught.value.message
    with pytest.raises(VideoGone):
        await rig.store.copy("http://mock/_mock/videos/no-such-task.mp4", "x/z.mp4")
    assert not (rig.directory / "x").exists() or not any((rig.directory / "x").iterdir())


@pytest.mark.parametrize(
    ("faults", "reason"),
    [
        ({"status_rates": {"503": 1.0}, "endpoints": ["video"]}, "source_error"),
        ({"reset_rate": 1.0, "endpoints": ["video"]}, "source_error"),
    ],
)
async def test_a_failing_source_is_a_failed_attempt_that_leaves_nothing(
    rig: Rig, faults: dict[str, object], reason: str
) -> None:
    url = await rig.video_url()
    rig.faults(**faults)
    with pytest.raises(CopyFailed) as caught:
        await rig.store.copy(url, "a/b.mp4")
    assert caught.value.reason == reason
    assert not (rig.directory / "a" / "b.mp4").exists(), "no partial object"


async def test_a_stored_object_that_differs_from_the_download_fails_verification(rig: Rig) -> None:
    (rig.directory / "k").mkdir(parents=True)
    (rig.directory / "k" / "v.mp4").write_bytes(b"tampered")
    with pytest.raises(CopyFailed) as caught:
        await rig.store._verify("k/v.mp4", 8, hashlib.sha256(b"original").hexdigest())
    assert caught.value.reason == "verify"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://host/x", "must start with one of"),
        ("file://relative/dir", "file:///absolute/path"),
        ("s3:///prefix", "names no bucket"),
        ("s3://bucket/prefix?secret=1", "takes no query"),
    ],
)
def test_an_unusable_store_url_is_refused_with_a_reason(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        check_url(url)


@pytest.mark.parametrize(
    ("job_id", "task_id", "key"),
    [("a.b:c-1", "t", "a.b:c-1/t.mp4"), ("..", "t", "__/t.mp4"), ("job", "../../etc", "job/.._.._etc.mp4")],
)
def test_keys_are_deterministic_and_never_leave_the_prefix(job_id: str, task_id: str, key: str) -> None:
    assert VideoStore.key(job_id, task_id) == key


# The copy stage of the handler
@dataclass
class Stage:
    handler: JobHandler
    rig: Rig
    store_access: Access
    submitter: Submitter


@pytest.fixture
async def stage(rig: Rig) -> AsyncIterator[Stage]:
    settings = Settings(poll_scale=0.0001, progress_interval_seconds=0, storage_url=rig.store.url)
    stopping = Stopping()
    api = ApiClient(rig.http, "http://mock", lambda: "k", rig.metrics)
    api_access = Access("the API", api.check_access, rig.metrics.api_access_ok, stopping, retry_max_seconds=0.01)
    store_access = Access(
        "the video store", rig.store.check_write, rig.metrics.storage_access_ok, stopping, retry_max_seconds=0.01
    )
    limits = {t: TierLimits(t, Settings().tiers[t]) for t in ("default", "flex")}
    handler = JobHandler(settings, api, limits, api_access, rig.metrics, store=rig.store, store_access=store_access)
    yield Stage(handler, rig, store_access, Submitter(handler, limits, stopping.sleep))
    stopping.set()
    await store_access.close()


async def until_copy_stage(stage: Stage) -> TrackingState:
    submit = stage.handler.handle_job(Delivery(JOB, "default"))
    assert isinstance(submit, Submit)
    outcome = await stage.submitter.submit(submit)
    for _ in range(1000):
        assert isinstance(outcome, Track)
        if outcome.state.stage == "store":
            return outcome.state
        await asyncio.sleep(0.002)
        outcome = await stage.handler.handle_tracking(outcome.state.model_copy(update={"next_poll_at": None}))
    pytest.fail("never reached the copy stage")


async def test_a_succeeded_task_goes_to_the_copy_stage_then_ends_with_its_stored_video(stage: Stage) -> None:
    state = await until_copy_stage(stage)
    assert state.video_url is not None and state.video_url_expires_at is not None
    outcome = await stage.handler.handle_store(state)
    assert isinstance(outcome, Finish)
    event = outcome.event
    assert event.status == "succeeded" and event.storage_error is None
    assert event.stored_video is not None
    assert event.video_url == state.video_url, "the gateway's URL is still given"
    path = Path(event.stored_video.url.removeprefix("file://"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == event.stored_video.sha256


async def test_a_failed_copy_is_tried_again_after_a_back_off(stage: Stage) -> None:
    state = await until_copy_stage(stage)
    stage.rig.faults(status_rates={"502": 1.0}, endpoints=["video"])
    outcome = await stage.handler.handle_store(state)
    assert isinstance(outcome, Track) and outcome.state.stage == "store"
    assert outcome.state.store_attempts == 1
    assert 0.5 <= outcome.delay <= 1.0
    stage.rig.faults()
    final = await stage.handler.handle_store(outcome.state)
    assert isinstance(final, Finish) and final.event.stored_video is not None


async def test_no_copy_before_the_url_expires_ends_succeeded_with_a_storage_error(stage: Stage) -> None:
    state = await until_copy_stage(stage)
    soon = datetime.now(UTC) + timedelta(seconds=0.5)
    stage.rig.faults(status_rates={"503": 1.0}, endpoints=["video"])
    outcome = await stage.handler.handle_store(state.model_copy(update={"video_url_expires_at": soon}))
    assert isinstance(outcome, Finish)
    assert outcome.event.status == "succeeded" and outcome.event.stored_video is None
    assert outcome.event.storage_error is not None and outcome.event.storage_error.code == "VIDEO_URL_EXPIRED"


async def test_a_source_that_refuses_ends_succeeded_with_a_storage_error_at_once(stage: Stage) -> None:
    state = await until_copy_stage(stage)
    stage.rig.faults(status_rates={"400": 1.0}, endpoints=["video"])  # not 403: that one means "gone"
    outcome = await stage.handler.handle_store(state)
    assert isinstance(outcome, Track), "a 400 from the source may pass: tried again"
    stage.rig.faults()
    gone = state.model_copy(update={"video_url": "http://mock/_mock/videos/nothing-here.mp4"})
    final = await stage.handler.handle_store(gone)
    assert isinstance(final, Finish)
    assert final.event.storage_error is not None and final.event.storage_error.code == "VIDEO_UNAVAILABLE"


async def test_a_store_that_refuses_pauses_the_worker_and_fails_nothing(stage: Stage, tmp_path: Path) -> None:
    state = await until_copy_stage(stage)
    real = stage.rig.store

    class Refusing:
        url = real.url
        key = staticmethod(VideoStore.key)
        allowed = False

        async def copy(self, source: str, key: str) -> object:
            raise StoreRefused("refused", "The operation lacked the necessary privileges")

        async def check_write(self) -> None:
            if not self.allowed:
                raise StoreRefused("refused", "still refused")

    refusing = Refusing()
    stage.handler._store = refusing  # type: ignore[assignment]
    stage.store_access._check = refusing.check_write
    outcome = await stage.handler.handle_store(state)
    assert isinstance(outcome, Track), "the copy waits; the job is not finished"
    assert stage.store_access.ok is False
    assert stage.rig.metrics.registry.get_sample_value("seedance_storage_access_ok") == 0
    refusing.allowed = True
    for _ in range(300):
        if stage.store_access.ok:
            break
        await asyncio.sleep(0.01)
    assert stage.store_access.ok is True, "the probe finds the store accepts the worker again"


async def test_without_a_store_a_left_copy_ends_succeeded_saying_so(rig: Rig) -> None:
    settings = Settings(poll_scale=0.0001)
    stopping = Stopping()
    api = ApiClient(rig.http, "http://mock", lambda: "k", rig.metrics)
    access = Access("the API", api.check_access, rig.metrics.api_access_ok, stopping, retry_max_seconds=0.01)
    handler = JobHandler(settings, api, {}, access, rig.metrics)
    state = waiting_for_the_copy(
        "j", "t", tier="flex", generate_audio=False, video_url="http://mock/_mock/videos/t.mp4"
    )
    outcome = await handler.handle_store(state)
    assert isinstance(outcome, Finish) and outcome.event.status == "succeeded"
    assert outcome.event.storage_error is not None and outcome.event.storage_error.code == "STORAGE_NOT_CONFIGURED"

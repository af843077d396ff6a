"""Pure logic of the worker: back-off, tier limits, the poll schedule and delay levels."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from contracts.api import TaskResult
from tests.factories import Pool, tier_settings
from worker.backoff import backoff_delay
from worker.errors import LimitReached
from worker.limits import NotSent, PermitsUnreachable, TierLimits, token_unit
from worker.settings import Settings
from worker.tracking import PollSchedule, TrackingState, capped, pick_delay_level


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 8, 20])
def test_backoff_grows_exponentially_within_half_and_full_step(attempt: int) -> None:
    rng = random.Random(attempt)
    step = min(60.0, 1.0 * 2 ** (attempt - 1))
    delays = [backoff_delay(attempt, base=1.0, cap=60.0, rng=rng) for _ in range(200)]
    assert min(delays) >= step / 2
    assert max(delays) <= step
    assert len(set(delays)) > 100, "jitter spreads retries"


def test_backoff_never_undercuts_retry_after() -> None:
    assert backoff_delay(1, base=1.0, cap=60.0, retry_after=42.0) == 42.0


def test_the_permit_queues_name_their_quota_and_the_slots_include_the_queue_ahead() -> None:
    limits = TierLimits("flex", tier_settings(rpm=30, max_in_flight=4, queue_ahead=2, daily_tokens=10**9))
    assert limits.rpm_queue == "seedance.permits.flex.rpm.30"
    assert limits.rpm_used_queue == "seedance.permits.flex.rpm.30.used.61000ms", "a minute and a second"
    assert limits.slots_queue == "seedance.permits.flex.slots.6"
    assert limits.tokens_queue("2026-11-25") == "seedance.permits.flex.tokens.2026-11-25.1000000000"


@pytest.mark.parametrize("budget", [1, 250, 64 * 2**20, 500_000_000_000])
def test_a_days_budget_fits_in_64_mib_of_permits_and_is_never_exceeded(budget: int) -> None:
    unit = token_unit(budget)
    assert math.ceil(budget / unit) <= 2**26
    assert unit == 1 or budget > 2**26, "exact to the token for budgets up to 64 M"
    for tokens in (40_594, 108_900, 585_225):
        assert math.ceil(tokens / unit) * unit >= tokens, "a job is charged at least its tokens"


async def test_unset_quotas_limit_nothing_and_take_no_permits() -> None:
    limits = TierLimits("default", tier_settings(rpm=None, max_in_flight=None))
    assert limits.capacity is None
    for _ in range(100):
        async with limits.slot(10**9) as slot:
            slot.keep()
    assert limits.wait_time() == 0


async def test_a_429_blocks_the_tier_for_its_retry_after() -> None:
    clock = Clock()
    limits = TierLimits("default", tier_settings(), clock=clock)
    limits.block_for(30, "the API's 429")
    assert limits.wait_time() == pytest.approx(30)
    with pytest.raises(LimitReached) as caught:
        async with limits.slot(1):
            pass
    assert (caught.value.limit, caught.value.wait) == ("the API's 429", pytest.approx(30))
    clock.now += 30
    assert limits.wait_time() == 0


def _state(tier: str = "default", **fields: object) -> TrackingState:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    base: dict[str, object] = {
        "job_id": "j",
        "tier": tier,
        "task_id": "t",
        "created_at": now,
        "deadline": now + timedelta(hours=2),
        "submitted_at": now,
        "duration": 5,
        "resolution": "720p",
        "generate_audio": True,
        "tokens": 1,
    }
    return TrackingState.model_validate({**base, **fields})


def _result(status: str = "TASK_STATUS_PROCESSING", progress: int = 0, eta: int = 0) -> TaskResult:
    return TaskResult.model_validate(
        {"task": {"task_id": "t", "status": status, "progress_percent": progress, "eta": eta}}
    )


def test_before_any_task_finished_the_first_poll_comes_early() -> None:
    schedule = PollSchedule(Settings())
    assert schedule.first_delay(_state()) == 4.0  # twice the default tier's shortest interval
    assert schedule.first_delay(_state("flex")) == 60.0


def test_the_first_poll_comes_when_the_video_could_plausibly_be_done() -> None:
    schedule = PollSchedule(Settings())
    schedule.observe("default", 5, "720p", 60.0)  # the API is as fast as expected
    assert schedule.first_delay(_state()) == pytest.approx(48.0)  # 80 % of 60 s
    assert schedule.first_delay(_state(duration=10, resolution="1080p")) == pytest.approx(0.8 * 60 * 2 * 1.8)


def test_a_tier_that_has_seen_none_of_its_own_tasks_finish_polls_early_whatever_the_other_tier_learned() -> None:
    schedule = PollSchedule(Settings())
    schedule.observe("default", 5, "720p", 60.0)
    assert schedule.first_delay(_state("flex")) == 60.0, "twice flex's shortest interval, not 80 % of 1800 s"
    schedule.observe("flex", 5, "720p", 1800.0)
    assert schedule.first_delay(_state("flex")) == pytest.approx(0.8 * 1800)


def test_the_schedule_learns_how_fast_the_api_really_is() -> None:
    schedule = PollSchedule(Settings())
    for _ in range(20):
        schedule.observe("default", 5, "720p", 90.0)  # 1.5 x slower than expected
    assert schedule.first_delay(_state()) == pytest.approx(0.8 * 90, rel=0.01)
    schedule.observe("flex", 5, "720p", 3600.0)
    assert schedule.first_delay(_state("flex")) == pytest.approx(0.8 * 3600)
    assert schedule.first_delay(_state()) == pytest.approx(0.8 * 90, rel=0.01), "tiers learn apart"
    fast = PollSchedule(Settings())
    fast.observe("default", 5, "720p", 0.6)
    assert fast.first_delay(_state()) == 2.0, "never below the tier's shortest interval"


def test_flex_polls_far_less_often_than_default() -> None:
    schedule = PollSchedule(Settings())
    now = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    default = schedule.next_delay(_state(interval=2.0), _result("TASK_STATUS_QUEUED"), now)
    flex = schedule.next_delay(_state("flex", interval=30.0), _result("TASK_STATUS_QUEUED"), now)
    assert default <= 15
    assert flex >= 30


def test_the_next_poll_follows_eta_then_progress_then_backs_off() -> None:
    schedule = PollSchedule(Settings())
    now = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)  # 60 s after submission
    assert schedule.next_delay(_state(), _result(eta=7), now) == 7
    assert schedule.next_delay(_state(), _result(progress=90), now) == pytest.approx(60 * 10 / 90)
    assert schedule.next_delay(_state(), _result(progress=10), now) == 15, "capped at the tier's maximum"
    assert schedule.next_delay(_state(interval=4.0), _result(), now) == 6.0
    assert schedule.next_delay(_state(interval=0.1), _result(eta=1), now) == 2.0, "floored at the minimum"


def test_poll_scale_shrinks_every_interval() -> None:
    schedule = PollSchedule(Settings(poll_scale=0.001))
    assert schedule.first_delay(_state()) == pytest.approx(0.004)
    schedule.observe("default", 5, "720p", 0.06)
    assert schedule.first_delay(_state()) == pytest.approx(0.048)


def test_no_poll_is_planned_past_the_deadline() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert capped(now, 100, now + timedelta(seconds=10)) == now + timedelta(seconds=10)


@pytest.mark.parametrize(("seconds", "level"), [(0.01, 1000), (1.5, 1000), (4.9, 2000), (45, 30000), (9999, 300000)])
def test_the_longest_delay_level_that_does_not_overshoot_is_picked(seconds: float, level: int) -> None:
    assert pick_delay_level(Settings().tracking_delays_ms, seconds) == level


def test_delay_levels_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEEDANCE_TRACKING_DELAYS_MS", "500, 100,200")
    assert Settings().tracking_delays_ms == (100, 200, 500)
    monkeypatch.setenv("SEEDANCE_TRACKING_DELAYS_MS", "soon")
    with pytest.raises(ValueError, match="milliseconds"):
        Settings()


def test_a_key_and_a_key_file_together_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("SEEDANCE_API_KEY", "k")
    monkeypatch.setenv("SEEDANCE_API_KEY_FILE", str(tmp_path / "key"))
    with pytest.raises(ValueError, match="not both"):
        Settings()


def test_the_key_file_is_read_afresh_each_time(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    key = tmp_path / "key"
    key.write_text("first\n")
    monkeypatch.setenv("SEEDANCE_API_KEY_FILE", str(key))
    settings = Settings()
    assert settings.read_api_key() == "first"
    key.write_text("rotated")
    assert settings.read_api_key() == "rotated"
    assert "first" not in repr(settings) and "rotated" not in repr(settings)


def test_an_empty_key_variable_means_no_key(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    key = tmp_path / "key"
    key.write_text("from-file")
    monkeypatch.setenv("SEEDANCE_API_KEY", "")
    monkeypatch.setenv("SEEDANCE_API_KEY_FILE", str(key))
    assert Settings().read_api_key() == "from-file"


async def test_a_new_pool_is_filled_in_batches_not_one_confirm_at_a_time() -> None:
    limits = TierLimits("default", tier_settings(rpm=None, max_in_flight=250, queue_ahead=0))
    pool = Pool(free=0, new=True)
    await limits.attach(pool)  # type: ignore[arg-type]
    assert pool.free == 250
    assert pool.batches == [100, 100, 50]


async def test_a_new_pool_that_refuses_its_first_permits_while_starting_is_still_filled_in_full() -> None:
    limits = TierLimits("default", tier_settings(rpm=None, max_in_flight=7, queue_ahead=0))
    pool = Pool(free=0, new=True, refusing=2)
    await limits.attach(pool)  # type: ignore[arg-type]
    assert (pool.free, pool.refusing) == (7, 0)


@pytest.mark.parametrize(
    ("failure", "connected", "owed"),
    [
        (NotSent("channel being restored"), True, True),  # the ack before it went through: owe it
        (NotSent("connection lost"), False, False),  # the ack may be lost too: its state frees it again
        (PermitsUnreachable("no confirm"), True, False),  # the broker may have taken it
    ],
)
async def test_an_ended_tasks_slot_is_owed_only_when_it_cannot_be_freed_twice(
    failure: PermitsUnreachable, connected: bool, owed: bool
) -> None:
    limits = TierLimits("default", tier_settings(rpm=None, max_in_flight=1, queue_ahead=0))
    pool = Pool(free=0)  # the one slot is taken by a running task
    await limits.attach(pool)  # type: ignore[arg-type]
    pool.failure, pool.connected = failure, connected
    await limits.task_ended()  # never raises
    assert limits.unreachable is not None
    pool.failure = None
    await limits.check()
    await limits.check()
    assert pool.free == (1 if owed else 0)
    assert limits.unreachable is None


async def test_a_slot_a_submit_did_not_keep_is_owed_and_given_back_by_the_next_take() -> None:
    limits = TierLimits("default", tier_settings(rpm=None, max_in_flight=2, queue_ahead=0))
    pool = Pool(free=2)
    await limits.attach(pool)  # type: ignore[arg-type]
    async with limits.slot(1):
        pool.failure, pool.connected = NotSent("connection lost"), False
    assert pool.free == 1
    pool.failure, pool.connected = None, True
    async with limits.slot(1) as slot:
        slot.keep()
    assert pool.free == 1, "given back first, then one taken"

"""The submit loop (worker.submitting): permits held and the job recorded taken around each attempt the
handler decides, a slot kept only by a task the API accepted, waits paused and counted."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from contracts.messages import JobMessage
from tests.factories import Pool, tier_settings, tracking_state
from worker.errors import LimitReached
from worker.handler import Defer, Duplicate, Finish, Submit, Track, Wait
from worker.limits import TierLimits
from worker.submitting import Submitter

JOB = JobMessage.model_validate({"job_id": "j-1", "request": {"image": "https://e.com/a.png", "prompt": "boat"}})


def submit(**fields: Any) -> Submit:
    state = tracking_state("j-1")
    return Submit(JOB, state, **{"take": 7, "recorded": False, **fields})


class Decisions:
    """A handler whose attempts answer, in turn, what the test gave: what each attempt found (the free
    running slots, whether the job was recorded, how long it had been held) is kept."""

    def __init__(self, pool: Pool, *answers: Any) -> None:
        self.pool = pool
        self.answers = list(answers)
        self.attempts: list[tuple[int, bool, float]] = []
        self.limits_reached: list[LimitReached] = []

    def check(self, job: Submit) -> None:
        return None

    async def attempt(self, job: Submit) -> Any:
        self.attempts.append((self.pool.free, job.recorded, job.held))
        answer = self.answers.pop(0)
        return answer(job) if callable(answer) else answer

    def limit_reached(self, job: Submit, full: LimitReached) -> Defer:
        self.limits_reached.append(full)
        return Defer("full", job.state.created_at, job.state.attempts, job.take)


class Rig:
    def __init__(self, *answers: Any, free: int = 1, first: bool = True, stops: bool = False) -> None:
        self.pool = Pool(free=free)
        self.handler = Decisions(self.pool, *answers)
        self.limits = TierLimits("default", tier_settings(rpm=None, max_in_flight=1, queue_ahead=0))
        self.records: list[tuple[str, int]] = []
        self.pauses: list[float] = []
        self.first = first
        self.stops = stops

    async def taken(self, job_id: str, take: int) -> bool:
        self.records.append((job_id, take))
        return self.first

    async def pause(self, seconds: float) -> bool:
        self.pauses.append(seconds)
        return not self.stops

    async def run(self, job: Submit) -> Any:
        await self.limits.attach(self.pool)  # type: ignore[arg-type]
        submitter = Submitter(self.handler, {"default": self.limits}, self.pause, taken=self.taken)  # type: ignore[arg-type]
        return await submitter.submit(job)


def accepted(job: Submit) -> Track:
    return Track(job.state, 1.0, submitted=True)


def failed(job: Submit) -> Finish:
    return Finish(job.state, None)


@pytest.mark.parametrize(("answer", "free_after"), [(accepted, 0), (failed, 1)], ids=["accepted", "failed"])
async def test_an_attempt_is_made_holding_a_slot_and_recorded_and_only_an_accepted_task_keeps_it(
    answer: Any, free_after: int
) -> None:
    rig = Rig(answer)
    outcome = await rig.run(submit())
    assert isinstance(outcome, Track | Finish)
    assert rig.handler.attempts == [(0, True, 0.0)], "the slot taken and the record written before the API call"
    assert rig.records == [("j-1", 7)]
    assert rig.pool.free == free_after


async def test_a_copy_whose_taken_record_came_second_never_reaches_the_api_and_gives_its_slot_back() -> None:
    rig = Rig(accepted, first=False)
    outcome = await rig.run(submit())
    assert isinstance(outcome, Duplicate) and outcome.job_id == "j-1"
    assert rig.handler.attempts == []
    assert rig.pool.free == 1


async def test_a_job_recorded_before_is_not_recorded_again() -> None:
    rig = Rig(accepted)
    await rig.run(submit(recorded=True))
    assert rig.records == []
    assert rig.handler.attempts == [(0, True, 0.0)]


async def test_a_wait_is_paused_between_attempts_counted_as_held_and_the_job_recorded_once() -> None:
    rig = Rig(lambda job: Wait(replace(job, failures=1), 0.5), lambda job: Wait(job, 0.25), accepted)
    outcome = await rig.run(submit())
    assert isinstance(outcome, Track)
    assert rig.pauses == [0.5, 0.25]
    assert [held for _, _, held in rig.handler.attempts] == [0.0, 0.5, 0.75]
    assert all(free == 0 for free, _, _ in rig.handler.attempts), "each attempt holds a slot"
    assert rig.records == [("j-1", 7)]
    assert rig.pool.free == 0


async def test_a_worker_stopping_during_a_wait_puts_the_job_back_with_its_take() -> None:
    rig = Rig(lambda job: Wait(job, 0.5), stops=True)
    outcome = await rig.run(submit())
    assert isinstance(outcome, Defer) and outcome.reason == "worker stopping" and outcome.take == 7
    assert rig.pool.free == 1, "the slot given back"


async def test_a_full_limit_is_the_handlers_to_decide_and_no_attempt_is_made() -> None:
    rig = Rig(accepted, free=0)
    outcome = await rig.run(submit())
    assert isinstance(outcome, Defer)
    assert [full.limit for full in rig.handler.limits_reached] == ["running slots"]
    assert rig.handler.attempts == [] and rig.records == []

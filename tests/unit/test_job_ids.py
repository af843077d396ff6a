"""Remembered job ids and what the handler does with them: copies, cancels (broker-free; the stream
itself is exercised in tests/integration/test_job_ids.py)."""

# ruff: noqa: F811 - the handler tests' `env` fixture is imported, and named as a parameter in each test

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import pytest
from prometheus_client import CollectorRegistry

from tests.factories import waiting_for_the_copy
from tests.unit.test_handler import (
    Env,
    env,  # noqa: F401 - the handler's fixture, used here too
    job,
    until_finished,
)
from worker.handler import Delivery, Duplicate, Finish, JobHandler, Track
from worker.job_ids import CANCELLED, ENDED, TAKEN, JobIds, Known
from worker.metrics import Metrics


class MemoryIds(JobIds):
    """JobIds with its records kept in a list instead of the stream: what the handler recorded, and the
    submits the API had seen when it did."""

    def __init__(self, env: Env) -> None:
        super().__init__(Metrics(CollectorRegistry()))
        self.env = env
        self.records: list[tuple[dict[str, Any], int]] = []
        self.earlier: dict[str, int] = {}

    async def _record(self, record: dict[str, Any]) -> None:
        self.records.append((record, len(self.env.submits())))
        if record["record"] == "taken" and record["job_id"] in self.earlier:
            # another copy's record lands in the stream just before
            self._apply_record({**record, "take": self.earlier[record["job_id"]]})
        self._apply_record(record)  # as the stream's reader would


@pytest.fixture
def ids(env: Env) -> MemoryIds:
    remembered = MemoryIds(env)
    h = env.handler
    env.handler = JobHandler(h._settings, h._api, h._limits, h._api_access, env.metrics, ids=remembered)
    env.taken = remembered.taken
    return remembered


@pytest.mark.parametrize(
    ("known", "take", "redelivered", "duplicate"),
    [
        (Known(), None, False, False),  # never seen
        (Known(taken=True, take=7), None, False, True),  # a producer's copy
        (Known(taken=True, take=7), 7, False, False),  # the worker's own message, put back
        (Known(taken=True, take=7), 8, False, True),  # another copy's message, put back
        (Known(taken=True, take=7), None, True, False),  # handed out again after its holder died
        (Known(taken=True, ended=True, take=7), 7, True, True),  # ended: any copy is one
        (Known(cancelled=True), None, False, False),  # cancelled, never taken: it ends cancelled
    ],
)
def test_which_messages_are_copies(known: Known, take: int | None, redelivered: bool, duplicate: bool) -> None:
    assert known.duplicate(take, redelivered) is duplicate


def test_facts_accumulate_and_old_ids_are_forgotten() -> None:
    now = [1_000_000.0]
    ids = JobIds(Metrics(CollectorRegistry()), clock=lambda: now[0])
    assert ids.apply("a", TAKEN, take=5) == 0
    now[0] += 3600
    assert ids.apply("a", ENDED) == TAKEN
    assert ids.apply("a", TAKEN, take=9) == TAKEN | ENDED
    assert ids.known("a") == Known(taken=True, ended=True, take=5)  # the first take stands
    ids.apply("b", CANCELLED, reason="why")
    assert ids.known("b") == Known(cancelled=True, reason="why")
    now[0] += 72 * 3600 - 1800  # "a" was first seen 72.5 h ago, "b" 71.5 h ago
    assert ids.forget_older() == 1
    assert ids.known("a") == Known()
    assert ids.known("b").cancelled
    assert len(ids) == 1


def test_a_batch_applies_its_records_in_order_and_skips_only_the_bad_ones() -> None:
    ids = JobIds(Metrics(CollectorRegistry()))
    records: list[Any] = [
        {"record": "taken", "job_id": "a", "take": 1},
        {"record": "taken"},  # no job id
        5,
        {"record": "batch", "records": []},  # batches do not nest
        {"record": "taken", "job_id": "a", "take": 2},  # a second copy, later in the batch
        {"record": "ended", "job_id": "b", "end": 3},
    ]
    ids._apply_record({"record": "batch", "records": records})
    assert ids.known("a") == Known(taken=True, take=1)
    assert ids.known("b") == Known(taken=True, ended=True)
    assert len(ids) == 2


async def test_the_taken_record_is_written_before_the_api_sees_the_submit(env: Env, ids: MemoryIds) -> None:
    outcome = await env.handle_job(Delivery(job(job_id="j-1"), "default", take=42))
    assert isinstance(outcome, Track)
    assert ids.records == [({"job_id": "j-1", "record": "taken", "take": 42}, 0)]
    assert len(env.submits()) == 1


async def test_a_copy_is_acknowledged_without_a_submission(env: Env, ids: MemoryIds) -> None:
    await env.handle_job(Delivery(job(job_id="j-2"), "default", take=1))
    copy = await env.handle_job(Delivery(job(job_id="j-2"), "default", take=2))
    assert copy == Duplicate("j-2", "default")
    assert len(env.submits()) == 1


async def test_of_two_copies_taken_at_once_the_one_whose_record_comes_first_goes_on(env: Env, ids: MemoryIds) -> None:
    ids.earlier["j-7"] = 99  # unknown when this copy arrives; its record is read first all the same
    outcome = await env.handle_job(Delivery(job(job_id="j-7"), "default", take=1))
    assert outcome == Duplicate("j-7", "default")
    assert env.submits() == []
    assert ids.known("j-7").take == 99


async def test_its_own_message_put_back_is_submitted_without_a_second_record(env: Env, ids: MemoryIds) -> None:
    ids.apply("j-3", TAKEN, take=11)  # taken by this worker, then put back (a back-off, a limit)
    outcome = await env.handle_job(Delivery(job(job_id="j-3"), "default", take=11, take_header=11))
    assert isinstance(outcome, Track)
    assert ids.records == []
    assert len(env.submits()) == 1


async def test_a_job_handed_out_again_after_its_holder_died_goes_on(env: Env, ids: MemoryIds) -> None:
    ids.apply("j-8", TAKEN, take=12)  # the dead holder's record; its message comes back without a token
    outcome = await env.handle_job(Delivery(job(job_id="j-8"), "default", redelivered=True, take=13))
    assert isinstance(outcome, Track)
    assert ids.records == []
    assert len(env.submits()) == 1


async def test_a_job_cancelled_before_it_came_ends_cancelled_at_no_cost(env: Env, ids: MemoryIds) -> None:
    ids.apply("j-4", CANCELLED, reason="withdrawn")
    outcome = await env.handle_job(Delivery(job(job_id="j-4"), "default", take=3))
    assert isinstance(outcome, Finish)
    assert outcome.event is not None
    assert outcome.event.status == "cancelled"
    assert outcome.event.error is not None and outcome.event.error.code == "CANCELLED"
    assert outcome.event.error.message == "withdrawn"
    assert env.submits() == []
    assert ids.records == []


async def test_a_job_cancelled_after_submission_ends_at_once_and_its_task_is_followed_in_silence(
    env: Env, ids: MemoryIds
) -> None:
    env.app.state.config.render_seconds["default"] = 600.0  # long enough to poll it a few times
    submitted = await env.handle_job(Delivery(job(job_id="j-5"), "default", take=4))
    assert isinstance(submitted, Track)
    ids.apply("j-5", CANCELLED)
    cancelled = await env.handler.handle_tracking(submitted.state)
    assert isinstance(cancelled, Track)
    (event,) = cancelled.events
    assert event.status == "cancelled"
    assert event.error is not None and event.error.code == "CANCELLED_AFTER_SUBMIT"
    assert event.task_id == submitted.state.task_id
    assert cancelled.state.cancelled
    outcome: Track | Finish = cancelled
    published = []
    for _ in range(10_000):
        if isinstance(outcome, Finish):
            break
        published.extend(outcome.events)
        await asyncio.sleep(max(0.0, outcome.delay))
        outcome = await env.handler.handle_tracking(outcome.state)
    assert isinstance(outcome, Finish)
    assert outcome.event is None  # the task's end publishes nothing more
    assert [e.status for e in published] == ["cancelled"]
    assert outcome.state.polls > 0


async def test_an_ended_job_is_never_taken_again_even_when_handed_out_again(env: Env, ids: MemoryIds) -> None:
    final = await until_finished(env, await env.handle_job(Delivery(job(job_id="j-6"), "default", take=5)))
    assert final.event is not None and final.event.status == "succeeded"
    ids.apply("j-6", ENDED)  # what the consumer records with the terminal event
    again = await env.handle_job(Delivery(job(job_id="j-6"), "default", redelivered=True, take=6))
    assert again == Duplicate("j-6", "default")


async def test_a_job_cancelled_while_its_video_waits_for_the_copy_ends_without_a_copy(env: Env, ids: MemoryIds) -> None:
    state = waiting_for_the_copy("j-9", "t-9")
    ids.apply("j-9", CANCELLED)
    outcome = await env.handler.handle_store(state)
    assert isinstance(outcome, Finish)
    assert outcome.event is not None
    assert (outcome.event.status, outcome.event.task_id) == ("cancelled", "t-9")
    assert outcome.event.error is not None and outcome.event.error.code == "CANCELLED_AFTER_SUBMIT"
    assert outcome.event.stored_video is None and outcome.event.video_url is None
    # Its `cancelled` event out, the state's next pass ends it in silence.
    later = await env.handler.handle_store(state.model_copy(update={"cancelled": True}))
    assert later == Finish(state.model_copy(update={"cancelled": True}), None)


async def test_a_second_copy_of_a_tasks_state_is_dropped_once_its_job_ended(env: Env, ids: MemoryIds) -> None:
    """A tracking state whose ack was lost comes back beside the state that replaced it: once either copy
    has seen the task end, the other is neither polled nor published nor frees the task's slot."""
    submitted = await env.handle_job(Delivery(job(job_id="j-10"), "default", take=7))
    assert isinstance(submitted, Track)
    polls = len(env.app.state.journal)
    ids.apply("j-10", ENDED)  # the other copy's end, read from the stream
    outcome = await env.handler.handle_tracking(submitted.state)
    assert outcome == Finish(submitted.state, None)
    assert not outcome.frees_slot
    assert len(env.app.state.journal) == polls, "no poll for a copy of an ended job"


async def test_of_two_handlings_of_a_tasks_end_only_the_first_in_the_stream_wins(ids: MemoryIds) -> None:
    assert await ids.ended("j-11") is True
    assert await ids.ended("j-11") is False  # a copy of its state, come back after a lost ack
    assert ids.known("j-11").ended


async def test_of_two_handlings_of_a_tasks_end_that_is_not_its_jobs_only_the_first_frees(ids: MemoryIds) -> None:
    assert await ids.freed("j-12") is True
    assert await ids.freed("j-12") is False  # a copy of its state, come back after a lost ack
    assert ids.known("j-12").freed
    assert not ids.known("j-12").ended, "the job goes on (to the copy stage)"
    assert await ids.ended("j-12") is True, "its job's end is recorded apart"
    ids.apply("j-15", TAKEN, take=2**31)  # the largest take token, right below the freed bit
    assert await ids.freed("j-15")
    assert ids.known("j-15") == Known(taken=True, take=2**31, freed=True)


async def test_a_second_copy_of_a_tasks_state_is_dropped_once_the_other_left_for_the_copy_stage(
    env: Env, ids: MemoryIds
) -> None:
    """Polled, the copy saw the task succeed and went to the copy stage as well: two copies of one
    video, two `succeeded` events."""
    submitted = await env.handle_job(Delivery(job(job_id="j-13"), "default", take=8))
    assert isinstance(submitted, Track)
    polls = len(env.app.state.journal)
    assert await ids.freed("j-13")  # the other copy's, read from the stream
    for copy in (submitted.state, submitted.state.model_copy(update={"cancelled": True})):
        outcome = await env.handler.handle_tracking(copy)
        assert outcome == Finish(copy, None)
        assert not outcome.frees_slot
    assert len(env.app.state.journal) == polls, "no poll for a copy whose task's end was handled"


async def test_a_second_copy_of_a_store_state_is_dropped_once_its_job_ended(env: Env, ids: MemoryIds) -> None:
    state = waiting_for_the_copy("j-14", "t-14")
    ids.apply("j-14", ENDED)  # the other copy's video copied and its `succeeded` event out
    outcome = await env.handler.handle_store(state)
    assert outcome == Finish(state, None)


async def test_a_snapshot_stream_not_yet_running_on_this_node_is_read_again_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a cluster, a stream another replica just declared has no running member on this node for a
    moment: the broker closes the channel, and aiormq fails the read with CancelledError."""
    monkeypatch.setattr("worker.job_ids.SNAPSHOT_RETRY_SECONDS", 0.0)
    refusals = [
        aiormq.exceptions.ChannelPreconditionFailed("PRECONDITION_FAILED - no running replica on the local node"),
        asyncio.CancelledError("PRECONDITION_FAILED - stream queue does not have a running replica"),
    ]
    calls = []

    class Refusing(JobIds):
        async def _load_snapshot(self) -> None:
            calls.append(1)
            if refusals:
                raise refusals.pop(0)
            self.snapshot_ids = 3

    ids = Refusing(Metrics(CollectorRegistry()))
    await ids._start_from_snapshot()
    assert (len(calls), ids.snapshot_ids) == (3, 3)


async def test_a_real_cancellation_while_waiting_for_the_snapshot_is_not_swallowed() -> None:
    class Waiting(JobIds):
        async def _load_snapshot(self) -> None:
            await asyncio.sleep(3600)

    task = asyncio.create_task(Waiting(Metrics(CollectorRegistry()))._start_from_snapshot())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

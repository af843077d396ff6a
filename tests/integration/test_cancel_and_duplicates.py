"""Cancelling jobs and copies of jobs, end to end: real worker processes, the real broker, the mock API,
and the producer's client (README, "Cancelling a job, and the same job published twice")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from contracts.client import Client, NotConfirmed
from contracts.messages import DEAD_LETTER_QUEUE
from tests.integration.conftest import IMAGE, Bus, Mock, WorkerProcess, job, rabbitmqctl, wait_for, wait_ready
from tests.integration.test_processes import metric

pytestmark = [pytest.mark.broker, pytest.mark.server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def client(vhost: str) -> AsyncIterator[Client]:
    async with await Client.connect(vhost) as the_client:
        yield the_client


def tasks_of(mock: Mock, job_id: str) -> list[dict[str, Any]]:
    """The mock's tasks made for this job (the test jobs' prompts name them)."""
    return [t for t in mock.tasks() if t["request"]["prompt"] == f"boat {job_id}"]


async def ready(*workers: WorkerProcess) -> None:
    await asyncio.gather(*(asyncio.to_thread(wait_ready, w, 30) for w in workers))


async def stop(*workers: WorkerProcess) -> None:
    for worker in workers:
        worker.signal(signal.SIGTERM)
    for worker in workers:
        await asyncio.to_thread(worker.proc.wait, 30)


async def test_a_copy_published_after_the_first_was_taken_is_submitted_once_though_every_replica_restarted(
    bus: Bus, mock: Mock, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    mock.config(render_seconds={"default": 2000})  # 2 s at the test's time scale
    first = [spawn_worker() for _ in range(3)]
    await ready(*first)
    await bus.publish(job("twice-1"))
    await wait_for(lambda: tasks_of(mock, "twice-1"), what="the first copy submitted")
    taken = time.monotonic()
    # Every replica that could take the copy has restarted since: only the stream remembers the first.
    await stop(*first)
    again = [spawn_worker() for _ in range(3)]
    await ready(*again)
    await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - taken)))  # the copy goes out 2 s after
    await bus.publish(job("twice-1"))
    await wait_for(
        lambda: sum(metric(w, "seedance_jobs_duplicate_total", tier="default") for w in again) == 1,
        what="the copy counted as a duplicate",
    )
    (final,) = (await bus.wait_terminal(["twice-1"])).values()
    assert final["status"] == "succeeded"
    assert len(tasks_of(mock, "twice-1")) == 1
    assert len(bus.terminal("twice-1")) == 1


async def test_a_cancel_ends_a_job_held_back_at_no_cost_and_a_submitted_one_keeping_its_slot_to_the_end(
    bus: Bus, mock: Mock, client: Client, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    mock.config(render_seconds={"flex": 3000}, queue_seconds={"flex": 0})
    worker = spawn_worker(flex_max_in_flight=1, flex_queue_ahead=0)
    await ready(worker)
    await bus.publish(job("hold-1", service_tier="flex"), "job.flex")
    await wait_for(lambda: tasks_of(mock, "hold-1"), what="hold-1 submitted")
    await bus.publish(job("waits-1", service_tier="flex"), "job.flex")
    await wait_for(
        lambda: metric(worker, "seedance_jobs_received_total", tier="flex") >= 2, what="waits-1 taken and held back"
    )
    await client.cancel("waits-1", "not needed any more")
    waited = (await bus.wait_terminal(["waits-1"]))["waits-1"]
    assert waited["status"] == "cancelled"
    assert waited["error"] == {"code": "CANCELLED", "message": "not needed any more"}
    assert waited["task_id"] is None
    assert tasks_of(mock, "waits-1") == []

    await client.cancel("hold-1")
    held = (await bus.wait_terminal(["hold-1"]))["hold-1"]
    (task,) = tasks_of(mock, "hold-1")
    assert held["status"] == "cancelled"
    assert held["error"]["code"] == "CANCELLED_AFTER_SUBMIT"
    assert held["task_id"] == task["task_id"]
    # The task still renders: its running slot stays taken until the API reports its end.
    assert task["finished_at"] is None
    await bus.publish(job("next-1", service_tier="flex"), "job.flex")
    assert (await bus.wait_terminal(["next-1"], timeout=40))["next-1"]["status"] == "succeeded"
    (ended,) = tasks_of(mock, "hold-1")
    (following,) = tasks_of(mock, "next-1")
    assert ended["finished_at"] is not None
    assert following["submitted_at"] >= ended["finished_at"]
    # Nothing more after its `cancelled` event, though the task went on to its end.
    statuses = [e["status"] for e in bus.events["hold-1"]]
    assert statuses[0] == "submitted"
    assert statuses[-1] == "cancelled"
    assert [s for s in statuses if s not in ("submitted", "progress")] == ["cancelled"]
    assert metric(worker, "seedance_jobs_completed_total", tier="flex", status="cancelled") == 2
    assert metric(worker, "seedance_cancels_total", when="before_submit") == 1
    assert metric(worker, "seedance_cancels_total", when="after_submit") == 1


async def test_a_cancel_that_comes_before_its_job_holds_across_a_worker_restart(
    bus: Bus, mock: Mock, client: Client, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker()
    await ready(worker)
    await client.cancel("early-1", "the order was withdrawn")
    await stop(worker)
    again = spawn_worker()
    await ready(again)
    await bus.publish(job("early-1"), reply_to=bus.reply_queue, correlation_id="corr-early")
    ended = (await bus.wait_terminal(["early-1"]))["early-1"]
    assert ended["status"] == "cancelled"
    assert ended["error"] == {"code": "CANCELLED", "message": "the order was withdrawn"}
    assert tasks_of(mock, "early-1") == []
    # The terminal event goes to reply_to as well.
    await wait_for(lambda: bus.replies, what="the reply")
    assert json.loads(bus.replies[0].body)["status"] == "cancelled"
    assert bus.replies[0].correlation_id == "corr-early"


async def test_a_cancel_after_the_end_changes_nothing_and_is_counted(
    bus: Bus, client: Client, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker()
    await ready(worker)
    # A late cancel is counted by the leader (once for all replicas): one worker leads a moment after ready.
    await wait_for(lambda: metric(worker, "seedance_limits_leader") == 1, what="the worker leading")
    await bus.publish(job("done-1"))
    assert (await bus.wait_terminal(["done-1"]))["done-1"]["status"] == "succeeded"
    await client.cancel("done-1")
    await wait_for(lambda: metric(worker, "seedance_cancels_total", when="after_end") == 1, what="the late cancel")
    assert [e["status"] for e in bus.terminal("done-1")] == ["succeeded"]


async def test_an_unreadable_cancel_is_dead_lettered_once_with_its_reason(
    bus: Bus, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    workers = [spawn_worker(), spawn_worker()]
    await ready(*workers)
    await wait_for(lambda: sum(metric(w, "seedance_limits_leader") for w in workers) == 1, what="a leader")
    await bus.publish({"job": "no id"}, routing_key="job.cancel")
    await wait_for(lambda: bus.queue_depth(DEAD_LETTER_QUEUE), what="the dead letter")
    dead = await bus.get(DEAD_LETTER_QUEUE)
    assert dead is not None
    assert dead.headers["x-seedance-reason-code"] == "invalid_cancel"
    assert "job_id" in str(dead.headers["x-seedance-reason"])
    assert json.loads(dead.body) == {"job": "no id"}
    await wait_for(
        lambda: sum(metric(w, "seedance_jobs_rejected_total", reason="invalid_cancel") for w in workers) == 1,
        what="the rejection counted",
    )
    assert await bus.queue_depth(DEAD_LETTER_QUEUE) == 0  # parked once, not by each replica


async def test_the_client_gets_the_result_when_the_replica_that_served_the_job_is_killed(
    vhost: str, mock: Mock, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    mock.config(render_seconds={"default": 3000})
    serving = spawn_worker()
    await ready(serving)
    async with await Client.connect(vhost, follow=True) as client:
        handle = await client.submit(image=IMAGE, prompt="boat killed-1", job_id="killed-1", metadata={"n": 1})
        await wait_for(lambda: tasks_of(mock, "killed-1"), what="the job submitted")
        other = spawn_worker()
        await ready(other)
        serving.signal(signal.SIGKILL)
        result = await handle.result(timeout=60)
    assert result.status == "succeeded"
    assert result.task_id == tasks_of(mock, "killed-1")[0]["task_id"]
    assert result.metadata == {"n": 1}
    assert len(tasks_of(mock, "killed-1")) == 1


async def test_the_client_follows_a_jobs_events_to_its_end(
    vhost: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    await ready(spawn_worker())
    async with await Client.connect(vhost, follow=True) as client:
        handle = await client.submit({"image": IMAGE, "prompt": "boat events-1"}, tier="default")
        statuses = [event.status async for event in handle.events(timeout=30)]
    assert statuses[0] == "submitted"
    assert statuses[-1] == "succeeded"
    assert set(statuses[1:-1]) <= {"progress"}


def test_the_blocking_client_works_from_a_plain_script(vhost: str, spawn_worker: Callable[..., WorkerProcess]) -> None:
    wait_ready(spawn_worker(), 30)
    script = f"""
from contracts.client import BlockingClient

with BlockingClient({vhost!r}) as client:
    job = client.submit(image={IMAGE!r}, prompt="boat script-1", job_id="script-1")
    print(job.job_id, job.result(timeout=60).status)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=90, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["script-1", "succeeded"]


async def test_the_readmes_client_example_runs_as_written(
    vhost: str, spawn_worker: Callable[..., WorkerProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    await ready(spawn_worker())
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### The producer's client") :]
    (example,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    code, run_line = example.rsplit("\n\n\n", 1)
    assert run_line.startswith("asyncio.run(main(")
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    await asyncio.wait_for(scope["main"](vhost, IMAGE), timeout=60)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("submitted")
    assert lines[-3].startswith("succeeded")
    assert lines[-2].startswith("video: http")
    assert lines[-1] in ("cancelled CANCELLED", "cancelled CANCELLED_AFTER_SUBMIT")


@contextlib.contextmanager
def publishers_blocked() -> Iterator[None]:
    """A memory alarm on the broker: it stops reading from publishing connections, so no confirm comes."""
    watermark = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().").strip()
    rabbitmqctl("set_vm_memory_high_watermark", "0")
    try:
        yield
    finally:
        rabbitmqctl("eval", f"vm_memory_monitor:set_vm_memory_high_watermark({watermark}).")


async def test_a_job_whose_confirms_are_lost_is_sent_again_and_still_submitted_once(
    vhost: str, bus: Bus, mock: Mock, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker()
    await ready(worker)
    async with await Client.connect(vhost, confirm_timeout=0.5, attempts=3) as client:
        with publishers_blocked(), pytest.raises(NotConfirmed, match="after 3 attempts"):
            await client.submit(image=IMAGE, prompt="boat resent-1", job_id="resent-1")
        # The alarm over, the broker reads the three copies the client sent, and the worker takes them at
        # once: the stream's order decides which one goes on.
        await wait_for(
            lambda: metric(worker, "seedance_jobs_duplicate_total", tier="default") == 2, what="the two copies"
        )
    (final,) = (await bus.wait_terminal(["resent-1"])).values()
    assert final["status"] == "succeeded"
    assert metric(worker, "seedance_jobs_received_total", tier="default") == 3
    assert len(tasks_of(mock, "resent-1")) == 1
    assert len(bus.terminal("resent-1")) == 1

"""The worker as a real process: SIGTERM drains, SIGKILL at random points loses nothing, and the
command-line tools behave as their help says."""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from contracts.messages import TERMINAL_STATUSES
from tests.imaging import png
from tests.integration.conftest import (
    MOCK_KEY,
    NO_QUOTAS,
    Bus,
    Mock,
    WorkerProcess,
    amqp_host,
    job,
    rabbitmqctl,
    wait_for,
    wait_ready,
    worker_env,
)
from tests.servers import free_port
from worker.settings import Settings

pytestmark = [pytest.mark.broker, pytest.mark.server]
ROOT = Path(__file__).resolve().parents[2]


async def test_sigterm_stops_intake_returns_in_flight_work_and_exits_0(spawn_worker, bus: Bus, mock: Mock) -> None:
    mock.config(render_seconds={"default": 2000, "flex": 2000})
    # Every submit is throttled, so deliveries sit in the worker waiting out Retry-After when SIGTERM comes.
    mock.faults(status_rates={"429": 0.7}, retry_after=0.5, endpoints=["submit"])
    worker = spawn_worker(drain_timeout_seconds=3, max_hold_seconds=30)
    await asyncio.to_thread(wait_ready, worker)
    ids = [f"term-{i}" for i in range(20)]
    await bus.publish_many([job(i) for i in ids])
    await wait_for(lambda: any(r["status"] == 429 for r in mock.submits()), what="a throttled submit")
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.proc.wait, 15)
    assert code == 0, worker.log()
    assert time.monotonic() - started < 3 + 5, "drained within the configured timeout"
    assert "stopping: intake closed" in worker.log()
    mock.faults()
    again = spawn_worker()
    await asyncio.to_thread(wait_ready, again)
    finals = await bus.wait_terminal(ids, timeout=60)
    assert {f["status"] for f in finals.values()} == {"succeeded"}, "nothing was lost or failed by the stop"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sigkill_at_random_points_loses_no_job(spawn_worker, bus: Bus, mock: Mock) -> None:
    mock.config(quotas=NO_QUOTAS, model_rpm=None)
    rng = random.Random(20261124)
    ids = [f"kill-{i:03d}" for i in range(300)]
    settings = {"default_max_in_flight": 100, "flex_max_in_flight": 100, "default_prefetch": 8, "flex_prefetch": 4}
    kills = 0
    for round_ in range(8):
        worker = spawn_worker(**settings)
        await asyncio.to_thread(wait_ready, worker)
        if round_ == 0:  # the first worker has declared the queues
            await bus.publish_many([job(i, duration=rng.choice([4, 5, 8])) for i in ids[:150]])
            await bus.publish_many([job(i, service_tier="flex") for i in ids[150:]], routing_key="job.flex")
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        worker.signal(signal.SIGKILL)
        await asyncio.to_thread(worker.proc.wait)
        kills += 1
    spawn_worker(**settings)
    finals = await bus.wait_terminal(ids, timeout=180)

    assert set(finals) == set(ids), "every job has a terminal event"
    for job_id in ids:
        statuses = {e["status"] for e in bus.events[job_id] if e["status"] in TERMINAL_STATUSES}
        assert statuses == {"succeeded"}, (job_id, statuses)
    submissions = collections.Counter(t["request"]["prompt"] for t in mock.tasks())
    duplicates = sum(n - 1 for n in submissions.values())
    assert set(submissions) == {f"boat {i}" for i in ids}
    # Each kill can catch at most the deliveries in hand between an API answer and a broker confirm.
    bound = kills * (settings["default_prefetch"] + settings["flex_prefetch"])
    print(f"\nkill test: {len(ids)} jobs, {kills} SIGKILLs, {duplicates} duplicate submissions (bound {bound})")
    assert duplicates <= bound


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert done.returncode == code, done
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert words in done.stderr


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("contracts.cli", "enqueue", "--duration", "five"), 2, "invalid int value"),
        (("contracts.cli", "enqueue", "--prompt", "p", "--image", "/no/such/file.png"), 2, "cannot read image"),
        (
            ("contracts.cli", "enqueue", "--prompt", "p", "--image", "https://e.com/a.png", "--duration", "30"),
            2,
            "request.duration",
        ),
        (("contracts.cli", "enqueue", "--prompt", "p", "--image", str(ROOT / "pyproject.toml")), 2, "not a readable"),
        (("contracts.cli", "frobnicate"), 2, "invalid choice"),
        (("contracts.cli", "enqueue", "--prompt", "p"), 2, "--image is required"),
        (("contracts.cli", "enqueue", "--image", "https://e.com/a.png"), 2, "--prompt is required"),
        (("contracts.cli", "cancel"), 2, "JOB_ID"),
        (("contracts.cli", "cancel", "no spaces allowed"), 2, "job_id"),
        (("contracts.cli", "events", "--amqp-url", "notaurl"), 2, "--amqp-url"),
        (
            ("contracts.cli", "enqueue", "--prompt", "p", "--image", "https://e.com/a.png", "--metadata", "{x"),
            2,
            "not valid JSON",
        ),
        (
            ("contracts.cli", "enqueue", "--prompt", "p", "--image", "https://e.com/a.png", "--metadata", "[1]"),
            2,
            "JSON object",
        ),
        (
            ("contracts.cli", "--amqp-url", "notaurl", "enqueue", "--prompt", "p", "--image", "https://e.com/a.png"),
            2,
            "--amqp-url",
        ),
        (("mock_server", "--port", "http"), 2, "invalid port"),
        (("mock_server", "--time-scale", "0"), 2, "greater than 0"),
    ],
)
def test_a_bad_argument_gets_one_line_and_a_non_zero_exit(args: tuple[str, ...], code: int, words: str) -> None:
    assert_one_line_error(run(*args), code, words)


def test_a_bad_worker_setting_gets_one_line_and_a_non_zero_exit() -> None:
    done = run("worker", env={"SEEDANCE_DEFAULT_RPM": "lots", "SEEDANCE_API_KEY": "sk-very-secret"})
    assert_one_line_error(done, 1, "SEEDANCE_DEFAULT_RPM")
    assert "sk-very-secret" not in done.stderr


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SEEDANCE_AMQP_URL": "notaurl"}, "SEEDANCE_AMQP_URL: must look like amqp://"),
        ({"SEEDANCE_AMQP_URL": "amqp://guest:hunter2@host:port/"}, "SEEDANCE_AMQP_URL: has a port"),
        ({"SEEDANCE_DEFAULT_POLL_MIN_SECONDS": "20"}, "SEEDANCE_DEFAULT_POLL_MIN_SECONDS (20.0) is above"),
        ({"SEEDANCE_AMBIGUOUS_SUBMIT": "maybe"}, "SEEDANCE_AMBIGUOUS_SUBMIT: Input should be 'retry' or 'fail'"),
        ({"SEEDANCE_API_BASE_URL": "127.0.0.1:8080"}, "SEEDANCE_API_BASE_URL: must be an absolute http(s)://host"),
        ({"SEEDANCE_API_BASE_URL": "ftp://api.example.com"}, "SEEDANCE_API_BASE_URL: must be an absolute"),
        ({"SEEDANCE_API_BASE_URL": "https://api.example.com/v3"}, "SEEDANCE_API_BASE_URL: must be only"),
        ({"SEEDANCE_API_BASE_URL": "https://hunter2@api.example.com"}, "SEEDANCE_API_BASE_URL: must not hold"),
        ({"SEEDANCE_API_KEY": "sk-hunter2 second-word"}, "SEEDANCE_API_KEY: holds whitespace inside it"),
        ({"SEEDANCE_API_KEY": "sk-hunter2\x07"}, "SEEDANCE_API_KEY: holds a control"),
        ({"SEEDANCE_HTTP_TRANSPORT": "http11"}, "SEEDANCE_HTTP_TRANSPORT: Input should be 'aiohttp' or 'httpx'"),
    ],
)
def test_a_bad_setting_names_its_variable(env: dict[str, str], words: str) -> None:
    done = run("worker", env=env)
    assert_one_line_error(done, 1, words)
    assert "hunter2" not in done.stderr


def test_a_key_file_holding_an_unusable_key_is_refused_at_start_up(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-hunter2\nsk-another\n")  # two keys pasted into one secret
    done = run("worker", env={"SEEDANCE_API_KEY_FILE": str(key_file)})
    assert_one_line_error(done, 1, "SEEDANCE_API_KEY_FILE: the key it holds holds whitespace inside it")
    assert "hunter2" not in done.stderr


async def test_a_key_with_a_trailing_newline_works(spawn_worker, bus: Bus, mock: Mock) -> None:
    worker = spawn_worker(api_key=MOCK_KEY + "\n")  # as `echo` into a variable, or a mounted secret, leaves it
    await asyncio.to_thread(wait_ready, worker)
    await bus.publish(job("newline-1"))
    assert (await bus.wait_terminal(["newline-1"]))["newline-1"]["status"] == "succeeded"


async def test_a_missing_key_is_not_ready_said_once_and_picked_up_when_it_appears(
    spawn_worker, mock: Mock, tmp_path: Path
) -> None:
    key_file = tmp_path / "not-yet"
    worker = spawn_worker(api_key="", api_key_file=str(key_file), auth_retry_max_seconds=0.05)
    await wait_for(lambda: "no API key configured" in worker.log(), what="the reason")
    ready = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/readyz", timeout=2)
    assert ready.status_code == 503
    assert ready.json()["api_access_ok"] is False
    assert ready.json()["api_access_problem"].startswith("no API key configured")
    key_file.write_text(MOCK_KEY)  # the secret is mounted late: checked again every 50 ms or so
    await asyncio.to_thread(wait_ready, worker)
    assert worker.log().count("no API key configured") == 1, "said once, not at every check"


async def test_an_http_base_url_off_this_machine_is_warned_about(spawn_worker) -> None:
    worker = spawn_worker(api_base_url="http://api.example.invalid:8080")
    await wait_for(lambda: "travels unencrypted" in worker.log(), what="the warning")
    assert "SEEDANCE_API_BASE_URL is http://" in worker.log()


async def test_a_wrong_key_is_noticed_at_start_up_before_any_job(spawn_worker, mock: Mock) -> None:
    worker = spawn_worker(api_key="not-the-key")
    await wait_for(lambda: "refuses this worker's access" in worker.log(), what="the refusal")
    assert _readyz(worker) == 503 and metric(worker, "seedance_api_access_ok") == 0
    probes = mock.requests()
    assert probes and {r["endpoint"] for r in probes} == {"task-result"}, "a free task-result, never a submit"
    assert "not-the-key" not in worker.log()


def test_worker_help_lists_every_setting() -> None:
    done = run("worker", "--help")
    assert done.returncode == 0
    for name in Settings.model_fields:
        assert f"SEEDANCE_{name.upper()}" in done.stdout


def test_the_cli_without_a_command_prints_its_usage() -> None:
    done = run("contracts.cli")
    assert done.returncode == 2
    usage, error = done.stderr.strip().splitlines()
    assert usage.startswith("usage: seedance")
    assert "choose a command: enqueue, events or cancel" in error


def test_every_command_shows_and_takes_the_global_options_after_its_name(vhost: str) -> None:
    for command in ("enqueue", "events", "cancel"):
        assert "--amqp-url" in run("contracts.cli", command, "--help").stdout
    enqueue = run("contracts.cli", "enqueue", "--help").stdout
    assert "required, unless --file holds them" in enqueue
    assert "exit status with --wait: 0 the job succeeded" in enqueue
    assert "default 3600" in enqueue
    done = run("contracts.cli", "events", "--amqp-url", vhost, "--timeout", "0.2")
    assert done.returncode == 0, done.stderr
    assert "following seedance.events" in done.stderr


async def test_seedance_cancel_takes_back_a_job_before_it_is_published(
    spawn_worker: Callable[..., WorkerProcess], bus: Bus, mock: Mock, vhost: str
) -> None:
    await asyncio.to_thread(wait_ready, spawn_worker())
    done = await asyncio.to_thread(run, "contracts.cli", "cancel", "cli-cancel-1", "--amqp-url", vhost, "--reason", "r")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"cancel": "cli-cancel-1"}
    image = "https://e.com/a.png"
    args = ("enqueue", "--image", image, "--prompt", "p", "--job-id", "cli-cancel-1", "--wait", "--timeout", "30")
    waited = await asyncio.to_thread(run, "contracts.cli", *args, "--amqp-url", vhost)
    assert waited.returncode == 1, waited.stderr  # it ended, not succeeded
    final = json.loads(waited.stdout.splitlines()[-1])
    assert (final["status"], final["error"]["code"], final["error"]["message"]) == ("cancelled", "CANCELLED", "r")
    assert mock.submits() == []


def test_the_cli_cannot_reach_a_broker_in_one_line() -> None:
    done = run("contracts.cli", "--amqp-url", "amqp://guest:hunter2@127.0.0.1:1/", "events", "--count", "1")
    assert_one_line_error(done, 1, "cannot reach RabbitMQ")
    assert "hunter2" not in done.stderr


async def test_enqueue_with_a_local_image_waits_for_the_terminal_event(
    spawn_worker, bus: Bus, mock: Mock, vhost: str
) -> None:
    worker = spawn_worker(log_level="DEBUG")  # per-job lines are at debug; INFO has a summary a minute
    await asyncio.to_thread(wait_ready, worker)
    env = worker_env(vhost, mock.url)
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "contracts.cli",
        "events",
        "--count",
        "2",
        "--timeout",
        "30",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert follower.stderr is not None
    line = await asyncio.wait_for(follower.stderr.readline(), timeout=30)
    assert b"following seedance.events" in line, "the follower says once its queue is bound"
    sample = ROOT / "worker" / "samples" / "boat.png"
    done = await asyncio.to_thread(
        run,
        "contracts.cli",
        "enqueue",
        "--image",
        str(sample),
        "--prompt",
        "a boat",
        "--job-id",
        "cli-1",
        "--metadata",
        '{"from": "cli"}',
        "--wait",
        "--timeout",
        "30",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert '"enqueued": "cli-1"' in lines[0]
    assert '"status": "succeeded"' in lines[-1]
    (task,) = mock.tasks()
    assert task["request"]["image"].startswith("data:image/png;base64,<")
    out, _ = await asyncio.wait_for(follower.communicate(), timeout=40)
    followed = out.decode().splitlines()
    assert len(followed) == 2 and all('"job_id": "cli-1"' in line for line in followed)
    log = worker.log()
    assert f"job_id=cli-1 task_id={task['task_id']}" in log, "log lines name the job and the task"
    image_data = base64.b64encode(sample.read_bytes()).decode()
    for secret in (MOCK_KEY, image_data[:40], "guest:guest"):
        assert secret not in log and secret not in done.stdout, "no key, password or image data leaks"


async def test_without_a_broker_the_worker_stays_alive_not_ready_and_stops_cleanly(spawn_worker) -> None:
    import httpx  # noqa: PLC0415

    worker = spawn_worker(amqp_url="amqp://guest:guest@127.0.0.1:1/")
    base = f"http://127.0.0.1:{worker.metrics_port}"
    for _ in range(100):
        try:
            health = httpx.get(f"{base}/healthz", timeout=1)
            break
        except httpx.TransportError:
            await asyncio.sleep(0.1)
    assert health.status_code == 200
    ready = httpx.get(f"{base}/readyz", timeout=1)
    assert ready.status_code == 503
    assert ready.json()["broker_connected"] is False
    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, 10) == 0
    assert "cannot reach RabbitMQ" in worker.log()


async def test_a_second_sigint_exits_at_once(spawn_worker, bus: Bus, mock: Mock) -> None:
    worker = spawn_worker(drain_timeout_seconds=60, api_timeout_seconds=60)
    await asyncio.to_thread(wait_ready, worker)
    mock.faults(latency_ms=20000, endpoints=["submit"])  # a submit in flight keeps the drain waiting
    await bus.publish(job("stuck-1"))
    await wait_for(lambda: metric(worker, "seedance_jobs_received_total") == 1, what="the job in hand")
    worker.signal(signal.SIGINT)
    await wait_for(lambda: "stopping: intake closed, 1 deliveries in hand" in worker.log(), what="the drain")
    assert worker.proc.poll() is None, "the first SIGINT drains, waiting for the submit"
    worker.signal(signal.SIGINT)
    assert await asyncio.to_thread(worker.proc.wait, 5) == 130


async def test_a_rotated_key_file_is_picked_up_after_an_auth_fault(
    spawn_worker, bus: Bus, mock: Mock, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("revoked-key\n")
    worker = spawn_worker(api_key="", api_key_file=str(key_file))
    # The key is checked at start-up, before any job arrives: refused, so never ready.
    await wait_for(lambda: "refuses this worker's access" in worker.log(), what="the refusal")
    assert _readyz(worker) == 503 and metric(worker, "seedance_api_access_ok") == 0
    await bus.publish(job("rotate-1"))
    await wait_for(lambda: _depth(bus, "seedance.jobs.default", 1), what="the job waiting in its queue")
    assert not bus.terminal("rotate-1"), "a refused key fails no job"
    assert not mock.submits(), "and submits nothing"
    key_file.write_text(MOCK_KEY)
    final = (await bus.wait_terminal(["rotate-1"], timeout=20))["rotate-1"]
    assert final["status"] == "succeeded"
    assert "revoked-key" not in worker.log() and MOCK_KEY not in worker.log()


def metric(worker: WorkerProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples (with these labels) on a worker process's /metrics."""
    import httpx  # noqa: PLC0415
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    text = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=2).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _readyz(worker: WorkerProcess) -> int:
    import httpx  # noqa: PLC0415

    return httpx.get(f"http://127.0.0.1:{worker.metrics_port}/readyz", timeout=2).status_code


async def _depth(bus: Bus, queue: str, expected: int) -> bool:
    return await bus.queue_depth(queue) == expected


async def test_an_unknown_seedance_variable_is_named_at_start_up(spawn_worker) -> None:
    worker = spawn_worker(defaultrpm=5)
    await asyncio.to_thread(wait_ready, worker)
    assert "ignoring SEEDANCE_DEFAULTRPM (did you mean SEEDANCE_DEFAULT_RPM?)" in worker.log()


async def test_sigterm_ends_a_connect_that_never_completes(spawn_worker) -> None:
    import socket  # noqa: PLC0415

    import httpx  # noqa: PLC0415

    with socket.socket() as silent:  # accepts TCP connections (the kernel does) and never speaks AMQP
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        worker = spawn_worker(amqp_url=f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/")
        health = f"http://127.0.0.1:{worker.metrics_port}/healthz"

        def alive() -> bool:
            try:
                return httpx.get(health, timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(alive, what="the worker's health endpoint")
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.proc.wait, 10) == 0, worker.log()
    assert time.monotonic() - started < 5, "SIGTERM ends the connect loop promptly"


async def test_a_missing_vhost_is_named_by_the_worker_and_the_cli(spawn_worker) -> None:
    url = f"amqp://guest:guest@{amqp_host()}/no-such-vhost"
    worker = spawn_worker(amqp_url=url)
    await wait_for(lambda: "does not exist, or the user has no access" in worker.log(), what="the vhost named")
    assert "'no-such-vhost'" in worker.log()
    assert _readyz(worker) == 503
    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, 10) == 0
    done = await asyncio.to_thread(run, "contracts.cli", "--amqp-url", url, "events", "--count", "1")
    assert_one_line_error(done, 1, "RabbitMQ refused the virtual host 'no-such-vhost'")


async def test_given_several_urls_the_worker_and_the_cli_use_one_that_answers(
    spawn_worker, bus: Bus, mock: Mock, vhost: str
) -> None:
    """The first node of the list is down (nothing listens): the worker connects to the next, names the
    node it is connected to, and prints neither URL's password."""
    dead = f"amqp://guest:first-secret@127.0.0.1:{free_port()}/{vhost.rsplit('/', 1)[1]}"
    live = vhost
    worker = spawn_worker(amqp_url=f"{dead},{live}")
    await asyncio.to_thread(wait_ready, worker, 30)
    await bus.publish(job("listed"))
    assert (await bus.wait_terminal(["listed"]))["listed"]["status"] == "succeeded"
    log = worker.log()
    assert f"connected to RabbitMQ at {live.split('@')[1].split('/')[0]}" in log
    assert "first-secret" not in log
    ready = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/readyz", timeout=5).json()
    assert ready["broker_node"] == live.split("@")[1].split("/")[0]
    done = await asyncio.to_thread(run, "contracts.cli", "--amqp-url", f"{dead},{live}", "events", "--timeout", "0.5")
    assert done.returncode == 0, done.stderr
    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, 10) == 0


def test_the_mock_on_a_taken_port_says_so_in_one_line() -> None:
    import socket  # noqa: PLC0415

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        done = run("mock_server", "--port", str(taken.getsockname()[1]))
    assert_one_line_error(done, 1, "cannot listen on 127.0.0.1:")


def test_the_mock_exits_0_on_sigterm() -> None:
    from tests.servers import start_mock  # noqa: PLC0415

    server = start_mock(time_scale=0.01)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0


async def test_enqueue_wait_says_the_job_is_still_waiting(spawn_worker, bus: Bus, mock: Mock, vhost: str) -> None:
    mock.faults(outcomes=[{"outcome": "hang", "prompt_contains": "forever"}])
    worker = spawn_worker()
    await asyncio.to_thread(wait_ready, worker)
    args = ("contracts.cli", "enqueue", "--image", "https://e.com/a.png", "--prompt", "forever", "--job-id", "wait-1")
    done = await asyncio.to_thread(
        run, *args, "--wait", "--timeout", "3", "--status-every", "0.5", env=worker_env(vhost, mock.url)
    )
    assert done.returncode == 3, done.stderr
    assert '"status": "submitted"' in done.stdout
    waiting = [line for line in done.stderr.splitlines() if "wait-1 still waiting" in line]
    assert 2 <= len(waiting) <= 7, done.stderr
    assert re.search(r"last event (submitted|progress \(\d+ % rendered\)) \dm\d\ds ago", waiting[-1]), waiting[-1]
    assert "no terminal event within 3 s" in done.stderr


def _broker_major() -> int:
    return int(rabbitmqctl("eval", "rabbit_misc:version().").strip().strip('"').split(".")[0])


async def test_the_worker_takes_job_messages_as_large_as_its_broker_does(spawn_worker, vhost: str) -> None:
    """Unset, the limit is the broker's default max_message_size for its version (asked of rabbitmqctl here,
    announced over AMQP to the worker); set, the setting."""
    worker = spawn_worker()
    await asyncio.to_thread(wait_ready, worker)
    ready = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/readyz", timeout=2).json()
    assert ready["max_message_bytes"] == (16 if _broker_major() >= 4 else 128) * 1024 * 1024
    assert "job messages up to" in worker.log()
    chosen = spawn_worker(max_message_bytes=5000)
    await asyncio.to_thread(wait_ready, chosen)
    assert httpx.get(f"http://127.0.0.1:{chosen.metrics_port}/readyz", timeout=2).json()["max_message_bytes"] == 5000


def test_the_cli_on_a_vhost_no_worker_declared_says_so_at_once(vhost: str) -> None:
    done = run("contracts.cli", "enqueue", "--amqp-url", vhost, "--image", "https://e.com/a.png", "--prompt", "p")
    assert_one_line_error(done, 1, "no queue took the job: start seedance-worker once")


async def test_the_cli_names_a_size_the_broker_refuses(spawn_worker, vhost: str, tmp_path: Path) -> None:
    """A job with a local image over the broker's max_message_size is refused as too large, in one line,
    not as an unreachable broker: on 4.x over its default (16 MiB); on 3.x (128 MiB by default) the limit
    is lowered to 1 MiB at run time first (new channels take it)."""
    await asyncio.to_thread(wait_ready, spawn_worker())
    four = _broker_major() >= 4
    image = tmp_path / "big.png"
    image.write_bytes(png(1000, 1000) + os.urandom((17 if four else 1) * 1024 * 1024 + 1024))  # padded after IEND
    before = rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).").strip()
    if not four:
        rabbitmqctl("eval", "application:set_env(rabbit, max_message_size, 1048576).")
    try:
        args = ("enqueue", "--amqp-url", vhost, "--image", str(image), "--prompt", "p")
        done = await asyncio.to_thread(run, "contracts.cli", *args)
    finally:
        if not four:
            restore = (
                f"application:set_env(rabbit, max_message_size, {before[4:-1]})."
                if before.startswith("{ok,")
                else ("application:unset_env(rabbit, max_message_size).")
            )
            rabbitmqctl("eval", restore)
    assert rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).").strip() == before
    assert_one_line_error(done, 1, "RabbitMQ refused the message's size")

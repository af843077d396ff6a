"""A real Prometheus scrapes a worker that processes jobs from the mock, then every query of the Grafana
dashboard and of the alert rules is run against it: dashboard queries must return series, alert queries
must be valid, and every rule must load and evaluate without error."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import Bus, Mock, job, wait_for, wait_ready
from tests.servers import free_port

pytestmark = [pytest.mark.broker, pytest.mark.server, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "seedance.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
VARIABLES = {"$__rate_interval": "1m", "$tier": ".*", "$price_audio": "2.4", "$price_silent": "1.2"}


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            found.append((f"{panel['title']} [{target['refId']}]", expr))
    return found


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def test_every_dashboard_query_has_its_variables_substituted() -> None:
    for title, expr in dashboard_queries():
        assert "$" not in expr, title


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run scripts/ensure-prometheus.sh (make test does)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    proc = None

    def start(target: str) -> str:
        nonlocal proc
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [{"job_name": "seedance-worker", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail("prometheus did not become ready")

    yield start, tmp_path  # type: ignore[misc]
    if proc is not None:
        proc.terminate()
        proc.wait(10)


async def query(url: str, expr: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        answer: dict[str, Any] = (await http.get(f"{url}/api/v1/query", params={"query": expr})).json()
        return answer


async def _has_series(url: str, expr: str) -> bool:
    return bool((await query(url, expr))["data"]["result"])


async def _scraped(url: str) -> float:
    result = (await query(url, "count_over_time(up[1h])"))["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


async def scrapes(url: str, count: int) -> None:
    """Wait until Prometheus has scraped the worker `count` more times."""
    seen = await _scraped(url)

    async def enough() -> bool:
        return await _scraped(url) >= seen + count

    await wait_for(enough, 30, f"{count} more scrapes")


async def test_dashboard_and_alert_queries_work_against_a_live_prometheus(
    spawn_worker, bus: Bus, mock: Mock, prometheus
) -> None:
    start_prometheus, _ = prometheus
    worker = spawn_worker()
    await asyncio.to_thread(wait_ready, worker)
    url = await asyncio.to_thread(start_prometheus, f"127.0.0.1:{worker.metrics_port}")
    # Counters must be scraped at zero (twice) before the workload moves them.
    await wait_for(lambda: _has_series(url, "seedance_jobs_received_total"), 30, "the first scrape")
    await scrapes(url, 2)

    # A workload that makes every series move: both tiers, throttling and 5xx, a failure, an expiry,
    # two rejections, audio and silent videos.
    mock.faults(
        status_rates={"429": 0.2, "503": 0.1},
        retry_after=0.05,
        outcomes=[{"outcome": "fail", "prompt_contains": "doomed"}],
    )
    ids = [f"obs-{i}" for i in range(12)]
    await bus.publish_many([job(i, generate_audio=i.endswith(("1", "3"))) for i in ids])
    flex_ids = [f"obs-flex-{i}" for i in range(6)]
    await bus.publish_many([job(i, service_tier="flex", resolution="480p") for i in flex_ids], routing_key="job.flex")
    await bus.publish(job("obs-doomed-1"))
    old = (datetime.now(UTC) - timedelta(hours=3)).isoformat()
    await bus.publish({**job("obs-late-1", execution_expires_after=3600), "created_at": old})
    await bus.publish(b"{broken")
    await bus.publish({"job_id": "obs-bad-1", "request": {"prompt": "no image"}})
    finals = await bus.wait_terminal([*ids, *flex_ids, "obs-doomed-1", "obs-late-1", "obs-bad-1"], timeout=90)
    assert {f["status"] for f in finals.values()} == {"succeeded", "failed", "expired", "rejected"}
    await scrapes(url, 4)  # so every rate has two samples after the last change, and alerts were evaluated

    empty, failed = [], []
    for title, expr in dashboard_queries():
        answer = await query(url, expr)
        if answer.get("status") != "success":
            failed.append(f"{title}: {answer.get('error')}")
        elif not answer["data"]["result"]:
            empty.append(f"{title}: {expr}")
    assert failed == [], "dashboard queries Prometheus refuses"
    assert empty == [], "dashboard queries that return no series"

    for name, expr in alert_queries():
        answer = await query(url, expr)
        assert answer.get("status") == "success", f"{name}: {answer.get('error')}"

    async with httpx.AsyncClient(timeout=10) as http:
        rules = (await http.get(f"{url}/api/v1/rules")).json()["data"]["groups"]
        labels = (
            await http.get(f"{url}/api/v1/label/tier/values", params={"match[]": "seedance_jobs_received_total"})
        ).json()["data"]
    loaded = [rule for group in rules for rule in group["rules"]]
    assert len(loaded) == len(alert_queries())
    assert all(rule["health"] == "ok" for rule in loaded), [r.get("lastError") for r in loaded]
    assert set(labels) == {"default", "flex"}, "the dashboard's tier variable has values"
    # The workload itself is visible where the dashboard and the alerts look.
    firing = {r["name"] for r in loaded if r["state"] in ("firing", "pending")}
    assert {"SeedanceJobsExpiring", "SeedanceMessagesDeadLettered"} <= firing


def test_every_alert_has_a_runbook_section() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
        for h in re.findall(r"^## (.+)$", operations, flags=re.MULTILINE)
    }
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            link = rule["annotations"]["runbook_url"]
            assert link.startswith("docs/operations.md#"), link
            assert link.split("#", 1)[1] in anchors, f"{rule['alert']}: no section for {link}"

"""The README promises what the code has: every setting and every metric is documented."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from worker.metrics import Metrics
from worker.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = [name for name in Settings.model_fields if f"SEEDANCE_{name.upper()}" not in README]
    assert missing == []


def test_every_metric_is_in_the_readme() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    names = set()
    for family in registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    missing = sorted(n for n in names if n not in README)
    assert missing == []


def test_the_readme_starts_with_the_two_setup_commands() -> None:
    commands = re.findall(r"^make (\w+)", README, flags=re.MULTILINE)
    assert commands[:2] == ["demo", "test"]


def test_every_dashboard_panel_and_alert_is_in_the_readme() -> None:
    import yaml  # noqa: PLC0415

    from deploy.grafana.build_dashboard import ROWS  # noqa: PLC0415

    titles = [panel.title for _, panels in ROWS for panel in panels]
    assert [t for t in titles if f"| {t} |" not in README] == []
    rules = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy/prometheus/alerts.yml").read_text())
    alerts = [rule["alert"] for group in rules["groups"] for rule in group["rules"]]
    assert [a for a in alerts if f"`{a}`" not in README] == []


def test_json_log_lines_carry_the_job_and_task_ids() -> None:
    import json  # noqa: PLC0415
    import logging  # noqa: PLC0415

    from worker.logs import JsonFormatter  # noqa: PLC0415

    record = logging.LogRecord("worker.consumer", logging.INFO, __file__, 1, "job %s", ("succeeded",), None)
    record.job_id, record.task_id, record.tier = "j-1", "t-1", "flex"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "job succeeded"
    assert (line["job_id"], line["task_id"], line["tier"], line["level"]) == ("j-1", "t-1", "flex", "info")

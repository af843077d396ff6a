"""Small builders shared by unit and integration tests."""

from __future__ import annotations

from typing import Any

from worker.settings import TierSettings


def tier_settings(**fields: Any) -> TierSettings:
    """The default tier's settings as documented (600 a minute, 10 running, 5 queued ahead), with `fields`
    changed."""
    values: dict[str, Any] = {
        "name": "default",
        "rpm": 600,
        "max_in_flight": 10,
        "queue_ahead": 5,
        "daily_tokens": None,
        "prefetch": 8,
        "expected_seconds": 60.0,
        "poll_min_seconds": 2.0,
        "poll_max_seconds": 15.0,
    }
    values.update(fields)
    return TierSettings(**values)

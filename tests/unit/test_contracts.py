"""The shared models: defaults, cost, tolerance of the task result, the job message, schema freshness."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from contracts import generate
from contracts.api import SubmitRequest, TaskResult, TaskStatus
from contracts.messages import JobEvent, JobMessage

URL = "https://example.com/first.png"


def test_defaults_follow_the_reference_page() -> None:
    wire = SubmitRequest(image=URL, prompt="p").wire()
    assert wire == {
        "image": URL,
        "prompt": "p",
        "fps": 24,
        "ratio": "adaptive",
        "duration": 5,
        "resolution": "720p",
        "watermark": False,
        "camera_fixed": False,
        "generate_audio": True,
        "service_tier": "default",
        "execution_expires_after": 172800,
    }


@pytest.mark.parametrize(
    ("resolution", "duration", "tokens"), [("720p", 5, 108900), ("480p", 4, 864 * 496 * 97 // 1024)]
)
def test_tokens_follow_the_documented_formula(resolution: str, duration: int, tokens: int) -> None:
    request = SubmitRequest(image=URL, prompt="p", resolution=resolution, duration=duration)  # type: ignore[arg-type]
    assert request.tokens() == tokens


def test_a_task_result_reads_ttl_as_string_or_int_and_ignores_unknown_fields() -> None:
    raw: dict[str, Any] = {
        "task": {"task_id": "t", "status": "TASK_STATUS_SUCCEED", "new_field": 1},
        "videos": [{"video_url": "https://v/x.mp4", "video_url_ttl": "3600"}],
        "extra": {"seed": "5", "debug_info": {"submit_time_ms": "17"}},
        "surprise": True,
    }
    result = TaskResult.model_validate(raw)
    assert result.videos[0].video_url_ttl == 3600
    raw["videos"][0]["video_url_ttl"] = 7200
    assert TaskResult.model_validate(raw).videos[0].video_url_ttl == 7200


def test_an_unknown_task_status_reads_as_unknown() -> None:
    result = TaskResult.model_validate({"task": {"task_id": "t", "status": "TASK_STATUS_PAUSED"}})
    assert result.task.status is TaskStatus.UNKNOWN
    assert not result.task.status.finished


@pytest.mark.parametrize("job_id", ["a", "A-z_0.9:x", "x" * 128])
def test_job_ids_of_the_allowed_alphabet_are_accepted(job_id: str) -> None:
    JobMessage.model_validate({"job_id": job_id, "request": {"image": URL, "prompt": "p"}})


@pytest.mark.parametrize("job_id", ["", "x" * 129, "has space", "slash/no", "ünï"])
def test_other_job_ids_are_rejected(job_id: str) -> None:
    with pytest.raises(ValidationError):
        JobMessage.model_validate({"job_id": job_id, "request": {"image": URL, "prompt": "p"}})


def test_created_at_must_carry_an_offset() -> None:
    ok = JobMessage.model_validate(
        {"job_id": "j", "request": {"image": URL, "prompt": "p"}, "created_at": "2026-01-01T00:00:00Z"}
    )
    assert ok.created_at == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValidationError, match="timezone"):
        JobMessage.model_validate(
            {"job_id": "j", "request": {"image": URL, "prompt": "p"}, "created_at": "2026-01-01T00:00:00"}
        )


def test_large_metadata_is_rejected() -> None:
    with pytest.raises(ValidationError, match="metadata"):
        JobMessage.model_validate(
            {"job_id": "j", "request": {"image": URL, "prompt": "p"}, "metadata": {"blob": "x" * 20_000}}
        )


def test_a_misspelt_job_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="metdata"):
        JobMessage.model_validate({"job_id": "j", "request": {"image": URL, "prompt": "p"}, "metdata": {}})


def test_events_tolerate_fields_added_later() -> None:
    event = JobEvent.model_validate({"job_id": "j", "status": "failed", "new": 1})
    assert event.terminal


def test_committed_schema_files_are_fresh() -> None:
    stale = generate.stale()
    assert stale == [], f"regenerate with `make schemas`: {stale}"

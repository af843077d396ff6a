"""Lasting problems are said once, again when they change, and otherwise only as reminders."""

from __future__ import annotations

from worker.logs import Repeats


def test_a_lasting_problem_is_said_once_then_only_when_it_changes() -> None:
    repeats = Repeats(remind_seconds=3600)
    assert repeats.news("HTTP 403 INVALID_API_KEY") is True
    assert [repeats.news("HTTP 403 INVALID_API_KEY") for _ in range(100)] == [None] * 100
    assert repeats.news("no API key configured") is True, "a new problem is said at once"
    assert repeats.clear() is True and repeats.clear() is False
    assert repeats.news("no API key configured") is True, "said again after it was over"


def test_a_problem_that_outlasts_the_reminder_interval_is_said_again() -> None:
    repeats = Repeats(remind_seconds=0)
    assert repeats.news("down") is True
    assert repeats.news("down") is False, "a reminder, not news"

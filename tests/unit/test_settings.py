"""Settings: each tier's view, errors that name the variable, unknown variables, the CLI's help."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from contracts.cli import build_parser
from worker.settings import Settings, describe, unknown_variables


def test_each_tier_reads_its_own_variables_scaled_by_the_poll_scale() -> None:
    settings = Settings(flex_rpm=7, default_poll_min_seconds=3, poll_scale=0.5, flex_daily_tokens=None)
    default, flex = settings.tiers["default"], settings.tiers["flex"]
    assert (default.rpm, flex.rpm) == (600, 7)
    assert (default.poll_min_seconds, default.poll_max_seconds) == (1.5, 7.5)
    assert (default.expected_seconds, flex.expected_seconds) == (30.0, 900.0)
    assert flex.daily_tokens is None


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"default_rpm": "lots"}, "SEEDANCE_DEFAULT_RPM: Input should be a valid integer"),
        ({"flex_poll_min_seconds": 400}, "SEEDANCE_FLEX_POLL_MIN_SECONDS (400.0) is above SEEDANCE_FLEX_POLL_MAX"),
        ({"amqp_url": "amqp://user:s3cret@/vhost"}, "SEEDANCE_AMQP_URL: must look like amqp://"),
        ({"amqp_url": "http://user:s3cret@host/"}, "SEEDANCE_AMQP_URL: must look like amqp://"),
        ({"tracking_delays_ms": "1000,soon"}, "SEEDANCE_TRACKING_DELAYS_MS: must be comma-separated"),
    ],
)
def test_a_bad_setting_is_described_by_its_variable_without_its_value(values: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)  # type: ignore[arg-type]
    message = describe(caught.value)
    assert words in message
    assert "s3cret" not in message


def test_the_vhost_is_read_from_the_url() -> None:
    assert Settings(amqp_url="amqp://g:g@h:5672/").vhost == "/"  # type: ignore[arg-type]
    assert Settings(amqp_url="amqp://g:g@h:5672/team%2Fa").vhost == "team/a"  # type: ignore[arg-type]


def test_unknown_seedance_variables_are_found_with_the_closest_setting() -> None:
    found = unknown_variables(
        {"SEEDANCE_DEFAULTRPM": "5", "SEEDANCE_DEFAULT_RPM": "5", "SEEDANCE_NONSENSE": "1", "HOME": "/root"}
    )
    assert found == ["SEEDANCE_DEFAULTRPM (did you mean SEEDANCE_DEFAULT_RPM?)", "SEEDANCE_NONSENSE"]


def test_every_cli_flag_has_help_text() -> None:
    parser = build_parser()
    missing = [
        f"{name} {action.option_strings}"
        for name, sub in parser._subparsers._group_actions[0].choices.items()  # type: ignore[union-attr]
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    missing += [str(a.option_strings) for a in parser._actions if a.option_strings and not a.help]
    assert missing == []

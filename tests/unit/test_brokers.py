"""Broker addresses: one URL or several of one cluster, checked without ever quoting a password."""

from __future__ import annotations

from typing import Any

import pytest

from contracts.brokers import (
    BrokerUrlError,
    broker_urls,
    broker_version,
    default_max_message_size,
    describe_failure,
    redact,
    vhost,
    where,
)
from worker.settings import Settings


def test_several_urls_of_one_cluster_are_split_and_checked() -> None:
    value = "amqp://u:p1@rabbit-0:5672/prod, amqp://u:p2@rabbit-1:5672/prod,amqp://u:p3@rabbit-2/prod"
    assert broker_urls(value) == [
        "amqp://u:p1@rabbit-0:5672/prod",
        "amqp://u:p2@rabbit-1:5672/prod",
        "amqp://u:p3@rabbit-2/prod",
    ]
    settings = Settings(amqp_url=value)  # type: ignore[arg-type]
    assert settings.vhost == "prod"
    assert len(settings.amqp_urls) == 3


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("amqp://u:secret@a/x,http://u:secret@b/x", "URL 2 of 2 must look like"),
        ("amqp://u:secret@a:port/x", "port that is not a number"),
        ("amqp://u:secret@a/one,amqp://u:secret@b/two", "different virtual hosts"),
        (" , ", "is empty"),
    ],
)
def test_a_bad_url_list_is_named_without_its_passwords(value: str, said: str) -> None:
    with pytest.raises(BrokerUrlError) as caught:
        broker_urls(value)
    assert said in str(caught.value)
    assert "secret" not in str(caught.value)


def test_every_password_of_a_list_is_redacted() -> None:
    shown = redact("amqp://u:first@a:5672/v,amqp://u:second@b:5672/v,amqp://u:third@c/v")
    assert shown == "amqp://u:***@a:5672/v,amqp://u:***@b:5672/v,amqp://u:***@c/v"
    assert where("amqps://u:pw@rabbit-1/v") == "rabbit-1:5671"
    assert vhost("amqp://u:pw@h/team%2Fa") == "team/a"


def test_a_refused_message_size_is_named_as_such() -> None:
    error = Exception("PRECONDITION_FAILED - message size 20971520 is larger than configured max size 16777216")
    assert describe_failure(error, "/").startswith("RabbitMQ refused the message's size")


@pytest.mark.parametrize(
    ("properties", "limit"),
    [
        ({"product": b"RabbitMQ", "version": b"4.0.5"}, 16),
        ({"product": "RabbitMQ", "version": "4.3.0"}, 16),
        ({"product": "RabbitMQ", "version": "3.10.8"}, 128),
        ({"product": "RabbitMQ", "version": "3.13.7"}, 128),
        ({}, 128),
        (None, 128),
    ],
)
def test_the_default_message_size_limit_follows_the_broker_version(properties: Any, limit: int) -> None:
    assert default_max_message_size(properties) == limit * 1024 * 1024


def test_the_broker_version_is_named_for_the_log() -> None:
    assert broker_version({"product": b"RabbitMQ", "version": b"4.0.5"}) == "RabbitMQ 4.0.5"
    assert broker_version(None) == "unknown"


def test_an_empty_message_size_setting_means_the_broker_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEEDANCE_MAX_MESSAGE_BYTES", "")  # as compose writes `${VAR:-}`
    assert Settings(api_key="k").max_message_bytes is None

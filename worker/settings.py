"""The worker's configuration: one frozen pydantic-settings class read once, from `SEEDANCE_*` variables.

No other module reads the environment. `seedance-worker --help` prints every field below with its
variable name, default and description; the README lists them too.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from contracts.api import ServiceTier
from contracts.brokers import broker_urls, vhost
from contracts.messages import TIERS
from worker.storage import check_url

PREFIX = "SEEDANCE_"


@dataclass(frozen=True, slots=True)
class TierSettings:
    """The settings of one tier, read from `SEEDANCE_<TIER>_*`; times already multiplied by the poll scale."""

    name: ServiceTier
    rpm: int | None
    max_in_flight: int | None
    queue_ahead: int
    daily_tokens: int | None
    prefetch: int
    expected_seconds: float
    poll_min_seconds: float
    poll_max_seconds: float


class Settings(BaseSettings):
    """Everything the worker can be told. Every field maps to `SEEDANCE_<FIELD NAME IN CAPITALS>`."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="ignore")

    # Where things are
    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@localhost:5672/"),
        description="RabbitMQ URL (may hold a password); several URLs of one cluster's nodes separated by commas.",
    )
    api_base_url: str = Field(default="https://api.highwayapi.ai", description="Base URL of the video API.")
    api_key: SecretStr | None = Field(default=None, description="API key; or use SEEDANCE_API_KEY_FILE.")
    api_key_file: Path | None = Field(
        default=None, description="File holding the API key; re-read after an auth fault (rotated secrets)."
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address for /metrics, /healthz, /readyz.")  # noqa: S104
    metrics_port: int = Field(default=9100, ge=0, le=65535, description="Port for /metrics, /healthz, /readyz.")

    # The API
    api_timeout_seconds: float = Field(default=30.0, gt=0, description="Per-request timeout for API calls.")
    http_transport: Literal["aiohttp", "httpx"] = Field(
        default="aiohttp",
        description="What carries API requests and video downloads under httpx.AsyncClient: aiohttp's client "
        "(through httpx-aiohttp; a third of the CPU per request) or httpx's own transport (httpcore; adds a "
        "write timeout). Both honour HTTPS_PROXY/HTTP_PROXY/ALL_PROXY/NO_PROXY.",
    )
    submit_max_attempts: int = Field(
        default=8,
        ge=1,
        description="Submit attempts on 5xx/timeouts/resets before a job fails (429s don't count).",
    )
    retry_base_seconds: float = Field(default=1.0, gt=0, description="First back-off step; doubles per attempt.")
    retry_max_seconds: float = Field(default=60.0, gt=0, description="Longest back-off step (before jitter).")
    max_hold_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Longest a job delivery is held waiting for a limit or back-off; past it the job goes back "
        "to its queue (well under RabbitMQ's 30 min consumer_timeout).",
    )
    poll_refused_max_seconds: float = Field(
        default=300.0,
        ge=0,
        description="How long task-result answers of 400, 404, 409, 422 or another 4xx (not 401/403/429) are "
        "polled again with back-off before the job fails with the API's reason (a gateway catching up right "
        "after a submit answers 404 for a while).",
    )
    auth_retry_max_seconds: float = Field(
        default=300.0, gt=0, description="Longest wait between checks of the key after an auth/account fault."
    )
    ambiguous_submit: Literal["retry", "fail"] = Field(
        default="retry",
        description="A submit whose answer was lost (timeout, reset, garbled) may have created a task: `retry` "
        "sends it again (it may be paid twice), `fail` ends the job failed with SUBMIT_AMBIGUOUS.",
    )

    # The account's quotas per tier, for all replicas together (kept in RabbitMQ; empty: unlimited)
    default_rpm: int | None = Field(default=600, ge=1, description="Submits per minute of the account, default tier.")
    flex_rpm: int | None = Field(default=600, ge=1, description="Submits per minute of the account, flex tier.")
    default_max_in_flight: int | None = Field(
        default=10, ge=1, description="Tasks the API runs at once for the account (its concurrency), default tier."
    )
    flex_max_in_flight: int | None = Field(
        default=1000, ge=1, description="Tasks the API runs at once for the account, flex tier."
    )
    default_queue_ahead: int = Field(
        default=5,
        ge=0,
        description="Further tasks kept waiting in the API's own queue, so a slot that frees is taken at once "
        "(0 for an API that answers 429 past its running limit), default tier.",
    )
    flex_queue_ahead: int = Field(default=20, ge=0, description="The same, flex tier.")
    default_daily_tokens: int | None = Field(
        default=None, ge=1, description="Tokens per UTC day of the account, default tier."
    )
    flex_daily_tokens: int | None = Field(
        default=500_000_000_000, ge=1, description="Tokens per UTC day of the account, flex tier."
    )
    default_prefetch: int = Field(default=8, ge=1, description="Jobs taken at once from the default queue.")
    flex_prefetch: int = Field(default=4, ge=1, description="Jobs taken at once from the flex queue.")
    tracking_prefetch: int = Field(default=32, ge=1, description="Tracking messages handled at once per tier.")
    in_flight_refresh_seconds: float = Field(
        default=1.0, gt=0, description="How often tasks in flight are recounted (and the limits reconciled)."
    )

    # Tracking
    tracking_delays_ms: Annotated[tuple[int, ...], NoDecode] = Field(
        default=(1000, 2000, 5000, 10000, 30000, 60000, 300000),
        description="Delay levels of the tracking queues, comma-separated milliseconds; one queue per level.",
    )
    poll_scale: float = Field(
        default=1.0,
        gt=0,
        description="Multiplies every poll interval, render estimate and the per-minute window (for fast mocks).",
    )
    default_expected_seconds: float = Field(
        default=60.0, gt=0, description="Expected time to finish a 5 s 720p clip, default tier."
    )
    flex_expected_seconds: float = Field(
        default=1800.0, gt=0, description="Expected time to finish a 5 s 720p clip, flex tier."
    )
    default_poll_min_seconds: float = Field(default=2.0, gt=0, description="Shortest poll interval, default.")
    default_poll_max_seconds: float = Field(default=15.0, gt=0, description="Longest poll interval, default.")
    flex_poll_min_seconds: float = Field(default=30.0, gt=0, description="Shortest poll interval, flex.")
    flex_poll_max_seconds: float = Field(default=300.0, gt=0, description="Longest poll interval, flex.")
    progress_interval_seconds: float = Field(
        default=10.0, ge=0, description="Fewest seconds between two progress events of one job."
    )
    expired_reason_marker: str = Field(
        default="expire", description="A FAILED reason containing this (any case) ends the job `expired`."
    )

    # Keeping the video
    storage_url: str | None = Field(
        default=None,
        description="Where to copy every successful video before its event: file:///dir, s3://bucket/prefix, "
        "gs://bucket/prefix or az://container/prefix (credentials from AWS_*/GOOGLE_*/AZURE_*). Unset: no copy.",
    )
    storage_concurrency: int = Field(default=4, ge=1, description="Videos copied at once per tier.")
    storage_timeout_seconds: float = Field(
        default=900.0,
        gt=0,
        le=1500,
        description="Longest one copy attempt may take (it holds a delivery: well under RabbitMQ's 30 min).",
    )

    # Messages and the broker
    max_message_bytes: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Larger job messages are rejected. Unset: the broker's default `max_message_size` for its version "
            "(16 MiB on RabbitMQ 4.x, 128 MiB on 3.x); set it when the broker's was changed."
        ),
    )
    delivery_limit: int = Field(
        default=10, ge=1, description="Deliveries of one job before RabbitMQ dead-letters it (quorum queues)."
    )
    drain_timeout_seconds: float = Field(
        default=20.0,
        ge=0,
        description="On SIGTERM, how long in-flight work may finish before it is returned.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")
    log_format: Literal["json", "text"] = Field(default="json", description="json lines or plain text.")

    @field_validator("tracking_delays_ms", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return tuple(int(part) for part in value.split(",") if part.strip())
            except ValueError:
                raise ValueError("must be comma-separated whole milliseconds, e.g. 1000,5000,30000") from None
        return value

    @field_validator("tracking_delays_ms")
    @classmethod
    def _sorted_delays(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("needs at least one positive delay")
        return tuple(sorted(set(value)))

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value)

    @field_validator(
        "api_key",
        "api_key_file",
        "default_rpm",
        "flex_rpm",
        "default_max_in_flight",
        "flex_max_in_flight",
        "default_daily_tokens",
        "flex_daily_tokens",
        "storage_url",
        "max_message_bytes",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `SEEDANCE_API_KEY=` (as compose writes `${SEEDANCE_API_KEY:-}`) means unset, not empty.
        return None if value == "" else value

    @field_validator("api_base_url")
    @classmethod
    def _api_base_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("api_key", mode="before")
    @classmethod
    def _stripped_key(cls, value: object) -> object:
        # A mounted secret or `echo` into a variable ends in a newline: never part of the key.
        if isinstance(value, str):
            value = value.strip()
            problem = key_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        # The message never quotes the URL: it may hold a password.
        broker_urls(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set SEEDANCE_API_KEY or SEEDANCE_API_KEY_FILE, not both")
        if self.api_key_file is not None:
            try:
                problem = key_problem(self.api_key_file.read_text().strip())
            except OSError:
                problem = None  # not there yet (a secret mounted later): not ready until it is
            except UnicodeDecodeError:
                problem = "is not UTF-8 text"
            if problem is not None:
                raise ValueError(f"{PREFIX}API_KEY_FILE: the key it holds {problem}")
        for tier in TIERS:
            low, high = getattr(self, f"{tier}_poll_min_seconds"), getattr(self, f"{tier}_poll_max_seconds")
            if low > high:
                name = f"{PREFIX}{tier.upper()}_POLL_MIN_SECONDS"
                raise ValueError(f"{name} ({low}) is above {PREFIX}{tier.upper()}_POLL_MAX_SECONDS ({high})")
        return self

    @cached_property
    def tiers(self) -> Mapping[ServiceTier, TierSettings]:
        """Each tier's settings, so callers never spell `default_`/`flex_` themselves."""
        scale = self.poll_scale

        def one(tier: ServiceTier) -> TierSettings:
            def get(name: str) -> Any:
                return getattr(self, f"{tier}_{name}")

            return TierSettings(
                name=tier,
                rpm=get("rpm"),
                max_in_flight=get("max_in_flight"),
                queue_ahead=get("queue_ahead"),
                daily_tokens=get("daily_tokens"),
                prefetch=get("prefetch"),
                expected_seconds=get("expected_seconds") * scale,
                poll_min_seconds=get("poll_min_seconds") * scale,
                poll_max_seconds=get("poll_max_seconds") * scale,
            )

        return {tier: one(tier) for tier in TIERS}

    @property
    def vhost(self) -> str:
        """The virtual host the AMQP URLs name (`/` when they name none)."""
        return vhost(self.amqp_urls[0])

    @property
    def amqp_urls(self) -> list[str]:
        """The broker's URLs: one, or the nodes of one cluster (see contracts.brokers)."""
        return broker_urls(self.amqp_url.get_secret_value())

    def read_api_key(self) -> str | None:
        """The key as it is now: from the variable, or freshly read from the file (which may rotate), with
        surrounding whitespace stripped. None when there is none, or when the file holds no usable key."""
        if self.api_key is not None:
            return self.api_key.get_secret_value() or None
        if self.api_key_file is not None:
            try:
                key = self.api_key_file.read_text().strip()
            except (OSError, UnicodeDecodeError):
                return None
            return key if key and key_problem(key) is None else None
        return None

    @property
    def api_in_clear(self) -> bool:
        """Whether the key would travel unencrypted to another machine: http:// to a host not on loopback."""
        parts = urlsplit(self.api_base_url)
        return parts.scheme == "http" and not is_loopback(parts.hostname or "")


def check_base_url(value: str) -> str:
    """`value` if it is an absolute http(s)://host[:port] URL (a trailing slash allowed); ValueError naming
    what is wrong otherwise. The API's paths are absolute, so a path here would be silently dropped."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an absolute http(s)://host[:port] URL, e.g. https://api.highwayapi.ai")
    if not parts.hostname:
        raise ValueError("names no host; use http(s)://host[:port]")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold a user name or password (the key goes in SEEDANCE_API_KEY)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be only http(s)://host[:port]: the API's paths are fixed (no path or query)")
    return f"{parts.scheme}://{parts.netloc}"


def key_problem(key: str) -> str | None:
    """Why `key` (already stripped) cannot go into an Authorization header, or None when it can. Never
    quotes the key."""
    for char in key:
        if char.isspace():
            return "holds whitespace inside it"
        if not char.isprintable() or ord(char) > 126:
            return "holds a control or non-ASCII character"
    return None


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower().endswith(".localhost")


def variable(field: str) -> str:
    """The environment variable of a settings field."""
    return f"{PREFIX}{field.upper()}"


def describe(error: ValidationError) -> str:
    """One line naming each bad variable and what is wrong with it; never the value (it may be a secret)."""
    parts = []
    for err in error.errors(include_input=False, include_url=False, include_context=False):
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{variable(str(err['loc'][0]))}: {message}" if err["loc"] else message)
    return "; ".join(parts)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """`SEEDANCE_*` variables that name no setting, each with the closest setting when one is close."""
    known = {variable(name) for name in Settings.model_fields}
    found = []
    for name in sorted(environ):
        if name.startswith(PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            found.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return found

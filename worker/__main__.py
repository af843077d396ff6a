"""`seedance-worker`: configuration from the environment, signals, and the life cycle of resources."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import NoReturn

import httpx
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from contracts import validation_message
from contracts.messages import TIERS
from worker.api_client import ApiClient
from worker.cli import redact
from worker.consumer import Worker
from worker.handler import JobHandler
from worker.health import HealthServer
from worker.limits import TierLimits
from worker.logs import configure
from worker.metrics import Metrics
from worker.settings import Settings

log = logging.getLogger("worker")


def _environment_help() -> str:
    lines = ["configuration (environment variables):"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if default is PydanticUndefined or default is None:
            shown = "unset"
        elif hasattr(default, "get_secret_value"):
            shown = redact(default.get_secret_value())
        elif isinstance(default, tuple):
            shown = ",".join(str(v) for v in default)
        else:
            shown = str(default)
        lines.append(f"  SEEDANCE_{name.upper():<34} {field.description} [default: {shown}]")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    return _Parser(
        prog="seedance-worker",
        description="Consume Seedance jobs from RabbitMQ, submit them to the video API, track them and "
        "publish completion events. Configured only through the environment.",
        epilog=_environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


async def serve(settings: Settings, stopping: asyncio.Event) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for tier in TIERS:
        metrics.tier_limit.labels(tier, "rpm").set(settings.rpm(tier))
        metrics.tier_limit.labels(tier, "max_in_flight").set(settings.max_in_flight(tier))
        metrics.tier_limit.labels(tier, "daily_tokens").set(settings.daily_tokens(tier) or 0)
    limits = {
        tier: TierLimits(settings.rpm(tier), settings.max_in_flight(tier), settings.daily_tokens(tier))
        for tier in TIERS
    }
    timeout = httpx.Timeout(settings.api_timeout_seconds, connect=min(10.0, settings.api_timeout_seconds))
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            httpx.AsyncClient(
                base_url=settings.api_base_url,
                timeout=timeout,
                # httpcore checks every pooled connection on each request: a small pool is cheaper per call.
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                headers={"User-Agent": "seedance-worker"},
            )
        )
        api = ApiClient(http, settings.read_api_key, metrics)
        worker: Worker | None = None

        async def sleep(seconds: float) -> bool:
            assert worker is not None  # noqa: S101
            return await worker.sleep(seconds)

        handler = JobHandler(settings, api, limits, metrics, sleep=sleep)
        worker = Worker(settings, handler, api, limits, metrics, stopping)
        await stack.enter_async_context(
            HealthServer(registry, worker.readiness, settings.metrics_host, settings.metrics_port)
        )
        await worker.run()


def _install_signals(loop: asyncio.AbstractEventLoop, stopping: asyncio.Event) -> None:
    def first(sig: signal.Signals) -> None:
        if stopping.is_set():
            if sig == signal.SIGINT:
                # A second Ctrl-C means now: unacked deliveries return to RabbitMQ on their own.
                os._exit(130)
            return
        log.warning("received %s: stopping", sig.name)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, first, sig)


async def _main(settings: Settings) -> None:
    stopping = asyncio.Event()
    _install_signals(asyncio.get_running_loop(), stopping)
    await serve(settings, stopping)


def main(argv: list[str] | None = None) -> None:
    build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.exit(f"seedance-worker: invalid configuration: {validation_message(exc)}")
    configure(settings.log_level, settings.log_format)
    if settings.read_api_key() is None:
        log.warning("no API key configured (SEEDANCE_API_KEY or SEEDANCE_API_KEY_FILE): not ready until one is")
    try:
        asyncio.run(_main(settings))
    except OSError as exc:
        sys.exit(f"seedance-worker: {exc.strerror or exc}")


if __name__ == "__main__":
    main()

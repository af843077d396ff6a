"""`seedance-worker`: configuration from the environment, signals, and the life cycle of resources."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from contracts.brokers import redact
from contracts.commandline import OneLineParser
from worker.access import Access
from worker.api_client import ApiClient
from worker.errors import StorageError
from worker.handler import JobHandler
from worker.health import HealthServer
from worker.http_clients import http_client, timeouts
from worker.intake import Intake
from worker.job_ids import JobIds
from worker.limits import TierLimits
from worker.logs import configure
from worker.metrics import Metrics
from worker.service import Service
from worker.settings import Settings, describe, unknown_variables
from worker.stopping import Stopping
from worker.storage import VideoStore

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


def build_parser() -> argparse.ArgumentParser:
    return OneLineParser(
        prog="seedance-worker",
        description="Consume Seedance jobs from RabbitMQ, submit them to the video API, track them and "
        "publish completion events. Configured only through the environment.",
        epilog=_environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


async def serve(settings: Settings, stopping: Stopping) -> None:
    """Run the worker with these settings until `stopping` is set, then drain and close everything."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    limits = {}
    # Long enough that a permit of a submit in progress (one API request at most) is never taken for a leak.
    window = 2 * settings.api_timeout_seconds + 2 * settings.in_flight_refresh_seconds + 5
    for tier, config in settings.tiers.items():
        for name, value in (
            ("rpm", config.rpm),
            ("max_in_flight", config.max_in_flight),
            ("queue_ahead", config.queue_ahead),
            ("daily_tokens", config.daily_tokens),
        ):
            metrics.tier_limit.labels(tier, name).set(value if value is not None else float("nan"))
        limits[tier] = TierLimits(
            tier, config, minute_seconds=60 * settings.poll_scale, reconcile_window_seconds=window
        )
    timeout = timeouts(settings.api_timeout_seconds)
    async with contextlib.AsyncExitStack() as stack:
        client = http_client(settings.http_transport, timeout)
        # One request is at most a phase of sending and one of waiting: bounded as a whole by both.
        total = 2 * settings.api_timeout_seconds
        api = ApiClient(client, settings.api_base_url, settings.read_api_key, metrics, total_seconds=total)
        stack.push_async_callback(api.aclose)
        retry_max = settings.auth_retry_max_seconds
        api_access = Access(
            "the API",
            api.check_access,
            metrics.api_access_ok,
            stopping,
            retry_max_seconds=retry_max,
            checked_at_start=True,
        )
        stack.push_async_callback(api_access.close)
        store = store_access = None
        if settings.storage_url is not None:
            # Downloads of pre-signed video URLs: a client of their own, which never carries the API key.
            downloads = await stack.enter_async_context(
                http_client(settings.http_transport, timeout, follow_redirects=True)
            )
            store = VideoStore(
                settings.storage_url, downloads, metrics, timeout_seconds=settings.storage_timeout_seconds
            )
            store_access = Access(
                "the video store", store.check_write, metrics.storage_access_ok, stopping, retry_max_seconds=retry_max
            )
            stack.push_async_callback(store_access.close)
        ids = JobIds(metrics)
        intake = Intake(settings, limits, api_access, store_access, metrics, stopping, ids)
        api_access.on_change = intake.wake
        if store_access is not None:
            store_access.on_change = intake.wake
        handler = JobHandler(
            settings, api, limits, api_access, metrics, store=store, store_access=store_access, ids=ids
        )
        service = Service(settings, handler, intake, limits, metrics, stopping, api_access, store_access, ids)
        await stack.enter_async_context(
            HealthServer(registry, service.readiness, settings.metrics_host, settings.metrics_port)
        )
        api_access.start()  # no job is taken before the API has accepted the key
        await service.run()


def _install_signals(loop: asyncio.AbstractEventLoop, stopping: Stopping) -> None:
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
    stopping = Stopping()
    _install_signals(asyncio.get_running_loop(), stopping)
    await serve(settings, stopping)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (less CPU per I/O event: the worker is all I/O events),
    else asyncio's own."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return None
    return uvloop.new_event_loop


def _tune_gc() -> None:
    """Collect cycles less often: each job allocates a few hundred short-lived containers that reference
    counting frees, and the default threshold (700) ran the cycle collector every ten jobs or so, for 6 % of
    the worker's CPU. Everything alive after start-up (modules, settings) is frozen out of its scans."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def main(argv: list[str] | None = None) -> None:
    build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.exit(f"seedance-worker: invalid configuration: {describe(exc)}")
    configure(settings.log_level, settings.log_format)
    for name in unknown_variables(os.environ):
        log.warning("ignoring %s: no such setting (seedance-worker --help lists them)", name)
    if settings.api_in_clear:
        log.warning("SEEDANCE_API_BASE_URL is http:// to a host off this machine: the API key travels unencrypted")
    _tune_gc()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_main(settings))
    except OSError as exc:
        sys.exit(f"seedance-worker: {exc.strerror or exc}")
    except StorageError as exc:
        sys.exit(f"seedance-worker: SEEDANCE_STORAGE_URL: {exc.message}")


if __name__ == "__main__":
    main()

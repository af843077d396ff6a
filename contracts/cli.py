"""`seedance`: the producer's tool, built on the producer's client (contracts.client). `seedance enqueue`
publishes a job (and with --wait follows it to its end), `seedance events` prints events as they are
published, `seedance cancel` takes a job back. It speaks only the public wire contract and loads nothing
of the worker."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
from pydantic import ValidationError

from contracts import validation_message
from contracts.brokers import BrokerUrlError, broker_urls, describe_failure, redact, vhost
from contracts.client import DEFAULT_AMQP_URL, Client, ClientError, InvalidJob, Job, NotRouted, dump
from contracts.commandline import OneLineParser
from contracts.images import ImageError, to_data_uri
from contracts.messages import EVENT_STATUSES, JobEvent, JobMessage

DEFAULT_TIMEOUT = 3600.0
WAIT_EXIT_CODES = """exit status with --wait: 0 the job succeeded; 1 it ended otherwise (failed, expired, rejected,
cancelled) or RabbitMQ could not be reached; 2 a bad argument or an invalid job; 3 no terminal event within
--timeout (the job goes on). Without --wait: 0 once RabbitMQ confirmed the job."""


class UsageError(Exception):
    """A bad argument: reported in one line, exit status 2."""


def _amqp_option(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--amqp-url",
        default=default,
        help="RabbitMQ URL, or several URLs of one cluster separated by commas "
        "(default: $SEEDANCE_AMQP_URL or amqp://guest:guest@localhost:5672/)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="seedance",
        description="Publish Seedance jobs, follow their events, cancel them.",
        epilog="seedance COMMAND --help describes each command.",
    )
    _amqp_option(parser, os.environ.get("SEEDANCE_AMQP_URL", DEFAULT_AMQP_URL))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    # Every command takes --amqp-url too, before or after its name (SUPPRESS: unset, the global one holds).
    common = OneLineParser(add_help=False)
    _amqp_option(common, argparse.SUPPRESS)

    enqueue = commands.add_parser(
        "enqueue",
        parents=[common],
        help="publish one job to seedance.jobs",
        description="Publish one job to seedance.jobs (and with --wait, print its events until its end).",
        epilog=WAIT_EXIT_CODES,
    )
    needed = enqueue.add_argument_group("required, unless --file holds them")
    needed.add_argument("--image", help="first frame: an http(s) URL or a local image file")
    needed.add_argument("--prompt", help="what the video shows")
    enqueue.add_argument("--file", type=Path, help="a JSON job message; flags below override its request fields")
    enqueue.add_argument("--job-id", help="job id (default: a random uuid)")
    enqueue.add_argument("--last-image", help="last frame: an http(s) URL or a local image file")
    enqueue.add_argument("--duration", type=int, help="seconds of video, 4-12 (default 5)")
    enqueue.add_argument("--resolution", choices=["480p", "720p", "1080p"], help="video resolution (default 720p)")
    enqueue.add_argument(
        "--ratio",
        choices=["16:9", "4:3", "1:1", "3:4", "9:16", "21:9", "adaptive"],
        help="aspect ratio (default adaptive: follows the image)",
    )
    enqueue.add_argument(
        "--tier", choices=["default", "flex"], help="service tier: default (online) or flex (offline, half price)"
    )
    enqueue.add_argument("--seed", type=int, help="random seed, -1 to 4294967295 (default: random)")
    enqueue.add_argument("--no-audio", action="store_true", help="generate a silent video")
    enqueue.add_argument("--watermark", action="store_true", help="add the provider's watermark")
    enqueue.add_argument("--camera-fixed", action="store_true", help="keep the camera still")
    enqueue.add_argument("--expires-after", type=int, help="execution_expires_after in seconds (3600-259200)")
    enqueue.add_argument("--metadata", help="a JSON object echoed back on every event")
    enqueue.add_argument("--wait", action="store_true", help="print the job's events until its terminal one")
    enqueue.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"with --wait, give up waiting after this many seconds (default {DEFAULT_TIMEOUT:.0f}; exit status 3)",
    )
    enqueue.add_argument(
        "--status-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --wait, how often to say on stderr that the job is still waiting (0: never; default 30)",
    )

    events = commands.add_parser(
        "events",
        parents=[common],
        help="print events from seedance.events as JSON lines",
        description="Print the events published to seedance.events from now on, one JSON object per line.",
    )
    events.add_argument("--job-id", help="only this job's events")
    events.add_argument("--status", action="append", choices=EVENT_STATUSES, help="only these statuses (repeatable)")
    events.add_argument("--count", type=int, help="stop after this many events")
    events.add_argument("--timeout", type=float, help="stop after this many seconds (default: never)")

    cancel = commands.add_parser(
        "cancel",
        parents=[common],
        help="cancel a job by its id",
        description="Cancel a job: not yet submitted, it ends cancelled at no cost; submitted, it ends cancelled "
        "(it may still be billed); ended, nothing changes. The cancel may come before the job.",
    )
    cancel.add_argument("job_id", metavar="JOB_ID", help="the job's id")
    cancel.add_argument("--reason", help="why, echoed in the job's cancelled event")
    return parser


def _image(value: str | None) -> str | None:
    if value is None or urlsplit(value).scheme in ("http", "https", "data"):
        return value
    path = Path(value)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read image {value}: {exc.strerror}") from None
    try:
        return to_data_uri(data)
    except ImageError as exc:
        raise UsageError(f"image {value}: {exc}") from None


def build_job(args: argparse.Namespace) -> JobMessage:
    """The job message the flags describe; UsageError when it is not a valid job."""
    message: dict[str, Any] = {}
    if args.file is not None:
        try:
            message = json.loads(args.file.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"{args.file} is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise UsageError(f"{args.file} must hold a JSON object")
    request = dict(message.get("request") or {})
    overrides = {
        "image": _image(args.image),
        "last_image": _image(args.last_image),
        "prompt": args.prompt,
        "duration": args.duration,
        "resolution": args.resolution,
        "ratio": args.ratio,
        "service_tier": args.tier,
        "seed": args.seed,
        "execution_expires_after": args.expires_after,
        "generate_audio": False if args.no_audio else None,
        "watermark": True if args.watermark else None,
        "camera_fixed": True if args.camera_fixed else None,
    }
    request.update({k: v for k, v in overrides.items() if v is not None})
    for needed in ("image", "prompt"):
        if not request.get(needed):
            raise UsageError(f"--{needed} is required (or a --file whose request has {needed!r})")
    message["request"] = request
    message["job_id"] = args.job_id or message.get("job_id") or str(uuid.uuid4())
    if args.metadata is not None:
        try:
            message["metadata"] = json.loads(args.metadata)
        except ValueError:
            raise UsageError("--metadata is not valid JSON (it must be a JSON object)") from None
        if not isinstance(message["metadata"], dict):
            raise UsageError("--metadata must be a JSON object, e.g. '{\"order\": 42}'")
    try:
        return JobMessage.model_validate(message)
    except ValidationError as exc:
        raise UsageError(f"invalid job: {validation_message(exc)}") from None


def _print(event: JobEvent) -> None:
    print(dump(event), flush=True)


async def enqueue(args: argparse.Namespace) -> int:
    job = build_job(args)
    async with await Client.connect(args.amqp_url, follow=args.wait) as client:
        try:
            handle = await client.submit_job(job)
        except NotRouted:
            print("seedance: no queue took the job: start seedance-worker once so it declares them", file=sys.stderr)
            return 1
        print(json.dumps({"enqueued": job.job_id, "tier": job.request.service_tier}), flush=True)
        if not args.wait:
            return 0
        return await _wait(handle, args.timeout, args.status_every)


async def _wait(job: Job, give_up_after: float, status_every: float) -> int:
    """Print the job's events until its terminal one (exit 0 on success, 1 otherwise, 3 after `give_up_after` s);
    meanwhile say every `status_every` seconds, on stderr, what the job is waiting in."""
    started = time.monotonic()
    last, last_at, progress = "enqueued", started, 0

    async def remind() -> None:
        while True:
            await asyncio.sleep(status_every)
            now = time.monotonic()
            shown = f" ({progress} % rendered)" if last == "progress" else ""
            print(
                f"seedance: {job.job_id} still waiting: last event {last}{shown} {_ago(now - last_at)} ago, "
                f"{_ago(now - started)} since it was enqueued",
                file=sys.stderr,
                flush=True,
            )

    reminder = asyncio.create_task(remind()) if status_every > 0 else None
    try:
        async for event in job.events(timeout=give_up_after):
            _print(event)
            last, last_at = event.status, time.monotonic()
            progress = event.progress_percent or progress
            if event.terminal:
                return 0 if event.status == "succeeded" else 1
    except TimeoutError:
        pass
    finally:
        if reminder is not None:
            reminder.cancel()
    print(f"seedance: no terminal event within {give_up_after:.0f} s", file=sys.stderr)
    return 3


def _ago(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


async def events(args: argparse.Namespace) -> int:
    async with await Client.connect(args.amqp_url) as client:
        print(
            f"seedance: following seedance.events ({', '.join(args.status or ['all statuses'])})",
            file=sys.stderr,
            flush=True,
        )
        seen = 0
        async for event in client.watch(args.status, timeout=args.timeout):
            if args.job_id and event.job_id != args.job_id:
                continue
            _print(event)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return 0


async def cancel(args: argparse.Namespace) -> int:
    async with await Client.connect(args.amqp_url) as client:
        try:
            await client.cancel(args.job_id, args.reason)
        except NotRouted:
            print("seedance: no queue took the cancel: start seedance-worker once so it declares them", file=sys.stderr)
            return 1
    print(json.dumps({"cancel": args.job_id}), flush=True)
    return 0


COMMANDS = {"enqueue": enqueue, "events": events, "cancel": cancel}


def _check_amqp_url(url: str) -> None:
    try:
        broker_urls(url)
    except BrokerUrlError as exc:
        raise UsageError(f"--amqp-url (or SEEDANCE_AMQP_URL) {exc}") from None


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("seedance: error: choose a command: enqueue, events or cancel (seedance --help)", file=sys.stderr)
        sys.exit(2)
    # This tool reports failures itself, in one line; the AMQP libraries would add their own.
    for library in ("aiormq", "aio_pika"):
        logging.getLogger(library).setLevel(logging.CRITICAL)
    command = COMMANDS[args.command]
    try:
        _check_amqp_url(args.amqp_url)
        code = asyncio.run(command(args))
    except (UsageError, InvalidJob) as exc:
        print(f"seedance: error: {exc}", file=sys.stderr)
        code = 2
    except ClientError as exc:
        print(f"seedance: {exc}", file=sys.stderr)
        code = 1
    except (ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
        print(f"seedance: {describe_failure(exc, vhost(args.amqp_url))} (at {redact(args.amqp_url)})", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()

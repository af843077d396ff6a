"""`seedance`: the producer's tool. `seedance enqueue` publishes a job (and with --wait follows it to its
end); `seedance events` prints events as they are published. Both speak only the public wire contract."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from contracts import validation_message
from contracts.brokers import BrokerUrlError, broker_urls, connect_first, describe_failure, redact, vhost
from contracts.commandline import OneLineParser
from contracts.images import ImageError, to_data_uri
from contracts.messages import EVENT_STATUSES, EVENTS_EXCHANGE, JOBS_EXCHANGE, TERMINAL_STATUSES, JobMessage

DEFAULT_AMQP = "amqp://guest:guest@localhost:5672/"


class UsageError(Exception):
    """A bad argument: reported in one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="seedance", description="Publish Seedance jobs and follow their events.")
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("SEEDANCE_AMQP_URL", DEFAULT_AMQP),
        help="RabbitMQ URL, or several URLs of one cluster separated by commas "
        "(default: $SEEDANCE_AMQP_URL or amqp://guest:guest@localhost:5672/)",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    enqueue = commands.add_parser("enqueue", help="publish one job to seedance.jobs")
    enqueue.add_argument("--file", type=Path, help="a JSON job message; flags below override its request fields")
    enqueue.add_argument("--job-id", help="job id (default: a random uuid)")
    enqueue.add_argument("--image", help="first frame: an http(s) URL or a local image file")
    enqueue.add_argument("--last-image", help="last frame: an http(s) URL or a local image file")
    enqueue.add_argument("--prompt", help="what the video shows")
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
    enqueue.add_argument("--timeout", type=float, default=3600.0, help="give up waiting after this many seconds")
    enqueue.add_argument(
        "--status-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --wait, how often to say on stderr that the job is still waiting (0: never; default 30)",
    )

    events = commands.add_parser("events", help="print events from seedance.events as JSON lines")
    events.add_argument("--job-id", help="only this job's events")
    events.add_argument("--status", action="append", choices=EVENT_STATUSES, help="only these statuses (repeatable)")
    events.add_argument("--count", type=int, help="stop after this many events")
    events.add_argument("--timeout", type=float, help="stop after this many seconds")
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


async def _follow(channel: AbstractChannel, statuses: list[str] | None) -> AbstractQueue:
    exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    for status in statuses or ["#"]:
        await queue.bind(exchange, routing_key=f"job.{status}")
    return queue


def _print(body: bytes) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(body)
    print(json.dumps(event, ensure_ascii=False), flush=True)
    return event


async def enqueue(args: argparse.Namespace) -> int:
    job = build_job(args)
    connection = await connect_first(broker_urls(args.amqp_url))
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await _follow(channel, None) if args.wait else None
        exchange = await channel.get_exchange(JOBS_EXCHANGE, ensure=False)
        message = aio_pika.Message(
            job.model_dump_json(exclude_none=True).encode(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            message_id=job.job_id,
            correlation_id=job.job_id,
            reply_to=queue.name if queue else None,
        )
        try:
            await exchange.publish(message, routing_key=f"job.{job.request.service_tier}")
        except aio_pika.exceptions.PublishError:
            print("seedance: no queue took the job: start seedance-worker once so it declares them", file=sys.stderr)
            return 1
        print(json.dumps({"enqueued": job.job_id, "tier": job.request.service_tier}), flush=True)
        if queue is None:
            return 0
        return await _wait(queue, job.job_id, args.timeout, args.status_every)


async def _wait(queue: AbstractQueue, job_id: str, give_up_after: float, status_every: float) -> int:
    """Print the job's events until its terminal one (exit 0 on success, 1 otherwise, 3 after `give_up_after` s);
    meanwhile say every `status_every` seconds, on stderr, what the job is waiting in."""
    arrived: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_event(incoming: AbstractIncomingMessage) -> None:
        arrived.put_nowait(incoming.body)

    await queue.consume(on_event, no_ack=True)
    started = time.monotonic()
    last, last_at, progress = "enqueued", started, 0
    while (left := started + give_up_after - time.monotonic()) > 0:
        try:
            body = await asyncio.wait_for(arrived.get(), min(left, status_every or left))
        except TimeoutError:
            now = time.monotonic()
            if now < started + give_up_after:
                shown = f" ({progress} % rendered)" if last == "progress" else ""
                print(
                    f"seedance: {job_id} still waiting: last event {last}{shown} {_ago(now - last_at)} ago, "
                    f"{_ago(now - started)} since it was enqueued",
                    file=sys.stderr,
                    flush=True,
                )
            continue
        event = json.loads(body)
        if event.get("job_id") != job_id:
            continue
        _print(body)
        last, last_at = str(event.get("status")), time.monotonic()
        progress = event.get("progress_percent") or progress
        if last in TERMINAL_STATUSES:
            return 0 if last == "succeeded" else 1
    print(f"seedance: no terminal event within {give_up_after:.0f} s", file=sys.stderr)
    return 3


def _ago(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


async def events(args: argparse.Namespace) -> int:
    connection = await connect_first(broker_urls(args.amqp_url))
    async with connection:
        channel = await connection.channel()
        queue = await _follow(channel, args.status)
        print(
            f"seedance: following {EVENTS_EXCHANGE} ({', '.join(args.status or ['all statuses'])})",
            file=sys.stderr,
            flush=True,
        )
        seen = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.timeout), queue.iterator() as messages:
                async for incoming in messages:
                    await incoming.ack()
                    if args.job_id and json.loads(incoming.body).get("job_id") != args.job_id:
                        continue
                    _print(incoming.body)
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        break
    return 0


def _check_amqp_url(url: str) -> None:
    try:
        broker_urls(url)
    except BrokerUrlError as exc:
        raise UsageError(f"--amqp-url (or SEEDANCE_AMQP_URL) {exc}") from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # This tool reports failures itself, in one line; the AMQP libraries would add their own.
    for library in ("aiormq", "aio_pika"):
        logging.getLogger(library).setLevel(logging.CRITICAL)
    command = enqueue if args.command == "enqueue" else events
    try:
        _check_amqp_url(args.amqp_url)
        code = asyncio.run(command(args))
    except UsageError as exc:
        print(f"seedance: error: {exc}", file=sys.stderr)
        code = 2
    except (ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
        print(f"seedance: {describe_failure(exc, vhost(args.amqp_url))} (at {redact(args.amqp_url)})", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()

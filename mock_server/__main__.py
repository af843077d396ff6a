"""`seedance-mock`: serve the mock API over HTTP."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

import uvicorn

from mock_server.app import SimulatedReset, create_app
from mock_server.state import MockConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the user sees what is wrong and `--help` is there for the rest.
        self.exit(2, f"{self.prog}: error: {message}\n")


class _DropSimulatedResets(logging.Filter):
    """uvicorn logs an app exception with its traceback; an injected reset is not an error of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SimulatedReset))


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not an integer") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"invalid port {value}: must be 1-65535")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="seedance-mock",
        description="Serve a stateful mock of the Seedance 1.5 Pro /v3/async API (submit, task-result) "
        "with quotas, fault injection and a journal under /_mock/*.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8080, help="port to bind (default 8080)")
    parser.add_argument("--api-key", default=None, help="the only accepted key (default: any bearer token)")
    parser.add_argument(
        "--time-scale",
        type=_positive,
        default=1.0,
        help="real seconds per simulated second: 0.01 makes a 60 s render take 0.6 s (default 1)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for ids, timings and fault rolls")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("uvicorn.error").addFilter(_DropSimulatedResets())
    app = create_app(MockConfig(api_key=args.api_key, time_scale=args.time_scale), seed=args.seed)
    print(f"seedance-mock listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()

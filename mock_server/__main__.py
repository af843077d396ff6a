"""`seedance-mock`: serve the mock API over HTTP."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from types import FrameType

import uvicorn

from contracts.commandline import OneLineParser
from mock_server.app import SimulatedReset, create_app
from mock_server.state import MockConfig


class DropSimulatedResets(logging.Filter):
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
    parser = OneLineParser(
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


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has shut down, so the process would die by it; a stop
        # that was asked for and carried out is a normal exit (status 0).
        self._captured_signals.clear()


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts so a taken port is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        sys.exit(f"seedance-mock: cannot listen on {host}:{port}: {exc.strerror or exc}")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("uvicorn.error").addFilter(DropSimulatedResets())
    sock = _listen(args.host, args.port)
    app = create_app(MockConfig(api_key=args.api_key, time_scale=args.time_scale), seed=args.seed)
    port = sock.getsockname()[1]
    print(f"seedance-mock listening on http://{args.host}:{port}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=2)
    _Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()

"""The ``gaspar`` command: ``gaspar serve`` and ``gaspar request``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from .client import request
from .consumer import Consumer, as_consumer
from .errors import RequestFailed, StartupError
from .producer import Producer
from .protocol import DEFAULT_MAX_MESSAGE_SIZE

log = logging.getLogger("gaspar.cli")


class OneLineFormatter(logging.Formatter):
    """Format each record on one line: tracebacks have their newlines escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


def configure_logging(level: str) -> None:
    """Log one line per event to standard error, with the pid of the process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        OneLineFormatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def load_target(spec: str) -> Consumer:
    """Resolve MODULE:ATTR to a Consumer (from a handler, an instance or a subclass)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTR, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return as_consumer(obj)  # type: ignore[arg-type]


def _serve(args: argparse.Namespace) -> int:
    try:
        consumer = load_target(args.target)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        log.error("cannot load %s: %s", args.target, exc)
        return 2
    producer = Producer(
        consumer,
        args.port,
        processes=args.workers,
        host=args.host,
        timeout=args.timeout,
        max_message_size=args.max_message_size,
        max_queue=args.max_queue,
        max_connections=args.max_connections,
        read_timeout=args.read_timeout,
        grace=args.grace,
    )
    try:
        producer.start()
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0


def _request(args: argparse.Namespace) -> int:
    message = sys.stdin.buffer.read() if args.message is None else args.message.encode()
    try:
        reply = request(args.address, message, timeout=args.timeout)
    except (RequestFailed, ValueError) as exc:
        print(f"gaspar: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(reply)
    sys.stdout.buffer.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(
        prog="gaspar", description="Serve CPU-heavy handlers from worker processes."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a handler over TCP")
    serve.add_argument("target", help="MODULE:ATTR naming a handler, Consumer or Consumer class")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=10123, help="port, 0 for any (default 10123)")
    serve.add_argument("--workers", type=int, default=None, help="worker processes (default: CPUs)")
    serve.add_argument("--timeout", type=float, default=None, help="seconds a request may run")
    serve.add_argument(
        "--max-message-size",
        type=int,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        help="largest request in bytes (default 16 MiB)",
    )
    serve.add_argument(
        "--max-queue", type=int, default=1000, help="requests waiting for a worker (default 1000)"
    )
    serve.add_argument(
        "--max-connections", type=int, default=1024, help="open connections (default 1024)"
    )
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send its request (default 30)",
    )
    serve.add_argument(
        "--grace", type=float, default=30.0, help="seconds in-flight requests get at stop"
    )
    serve.add_argument("--log-level", default="info", help="debug, info, warning, error")
    serve.set_defaults(func=_serve)

    req = sub.add_parser("request", help="send one request and print the reply")
    req.add_argument("address", help="HOST:PORT or [IPV6]:PORT")
    req.add_argument("message", nargs="?", help="the message (default: read standard input)")
    req.add_argument("--timeout", type=float, default=None, help="seconds to wait in all")
    req.set_defaults(func=_request)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        configure_logging(args.log_level)
    result: int = args.func(args)
    return result

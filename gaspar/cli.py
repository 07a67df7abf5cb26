"""The ``gaspar`` command: ``gaspar serve``, ``request``, ``bench`` and ``keygen``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .address import is_loopback_host
from .client import request
from .consumer import Consumer, as_consumer
from .errors import RequestFailed, StartupError
from .options import PRODUCER_OPTIONS, add_flags
from .producer import Producer

log = logging.getLogger("gaspar.cli")

# The exit code of a command given what it cannot use (argparse's own).
EXIT_USAGE = 2
# Logged once by `gaspar serve` bound to an address other hosts can reach.
EXPOSED_WARNING = (
    "--host %s is not a loopback address: the client port is unauthenticated and unencrypted; "
    "for clients on other hosts put a TLS front before it (docs/deploy/ in gaspar's source has "
    "an HAProxy example)"
)


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
        return EXIT_USAGE
    settings = {o.name: getattr(args, o.name) for o in PRODUCER_OPTIONS}
    try:
        producer = Producer(consumer, **settings)
    except ValueError as exc:  # the flags were checked already: only a bug gets here
        log.error("%s", exc)
        return EXIT_USAGE
    producer.target = args.target  # what a reload (SIGHUP) re-imports
    if not is_loopback_host(args.host):
        log.warning(EXPOSED_WARNING, args.host)
    try:
        producer.start()
    except StartupError:  # the producer has logged its cause
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


def _keygen(args: argparse.Namespace) -> int:
    from .keys import create_keypair  # zmq.auth: only this subcommand needs it

    try:
        public, secret = create_keypair(args.directory, args.name, force=args.force)
    except (ValueError, FileExistsError) as exc:
        print(f"gaspar keygen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"gaspar keygen: {exc}", file=sys.stderr)
        return 1
    print(f"public {public}\nsecret {secret}")
    return 0


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit code 2), not usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = OneLineErrors(
        prog="gaspar", description="Serve CPU-heavy handlers from worker processes."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve a handler over TCP",
        description="Serve a handler over TCP with a pool of forked worker processes.",
    )
    serve.add_argument("target", help="MODULE:ATTR naming a handler, Consumer or Consumer class")
    add_flags(serve)
    serve.set_defaults(func=_serve)

    req = sub.add_parser("request", help="send one request and print the reply")
    req.add_argument("address", help="HOST:PORT or [IPV6]:PORT")
    req.add_argument("message", nargs="?", help="the message (default: read standard input)")
    req.add_argument("--timeout", type=float, default=None, help="seconds to wait in all")
    req.set_defaults(func=_request)

    keygen = sub.add_parser(
        "keygen",
        help="write a CURVE key pair (zmq.auth certificates)",
        description="Write DIR/NAME.key (public certificate) and DIR/NAME.key_secret (secret "
        "certificate, mode 0600) in zmq.auth's format.",
    )
    keygen.add_argument("directory", metavar="DIR", help="where to write (created if missing)")
    keygen.add_argument("--name", required=True, help="the pair's file name, without suffix")
    keygen.add_argument(
        "--force", action="store_true", help="replace an existing pair of that name"
    )
    keygen.set_defaults(func=_keygen)

    from .bench import register as register_bench  # its own subcommand; light to import

    register_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        configure_logging(args.log_level)
    result: int = args.func(args)
    return result

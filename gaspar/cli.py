"""The ``gaspar`` command: ``gaspar serve``, ``gaspar request`` and ``gaspar bench``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .client import parse_address, request
from .clientcore import PROTOCOLS
from .consumer import Consumer, as_consumer
from .errors import RequestFailed, StartupError
from .options import PRODUCER_OPTIONS, add_flags
from .producer import Producer

log = logging.getLogger("gaspar.cli")

# The exit code of a command given what it cannot use (argparse's own).
EXIT_USAGE = 2

# gaspar.bench's clients and default timeout, kept here so that the module is
# imported only by `gaspar bench` (it costs every `gaspar serve` process ~2 MB).
BENCH_CLIENTS = ("raw", "aio")
BENCH_TIMEOUT = 10.0


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


def _bench(args: argparse.Namespace) -> int:
    payload = None
    if args.payload_file is not None:
        try:
            with open(args.payload_file, "rb") as f:
                payload = f.read()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            print(f"gaspar bench: cannot read {args.payload_file}: {reason}", file=sys.stderr)
            return 2
    if not args.quiet:
        if payload is None:
            each = f"{args.size:,} random bytes"
        else:
            each = f"the {len(payload):,} bytes of {args.payload_file}"
        print(
            f"gaspar bench: {args.address}, protocol {args.protocol} ({args.client} client),"
            f" {args.concurrency} requests in flight, each {each};"
            f" {args.warmup:g}s warmup, then {args.duration:g}s measured",
            file=sys.stderr,
            flush=True,
        )
    try:
        from . import bench  # only here: `gaspar serve` processes need not carry it

        result = bench.run(
            args.address,
            args.concurrency,
            args.duration,
            args.size,
            processes=args.processes,
            warmup=args.warmup,
            timeout=args.timeout,
            protocol=args.protocol,
            client=args.client,
            connections=args.connections,
            payload=payload,
            check_echo=args.check_echo,
            progress=not args.quiet,
        )
    except ValueError as exc:
        print(f"gaspar bench: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        print(f"gaspar bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gaspar bench: interrupted", file=sys.stderr)
        return 130
    if args.payload_file is not None:
        result["payload_file"] = args.payload_file
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(bench.format_report(result))
    errors = result["errors"]
    if not result["requests"] and result["error_total"] == errors["refused"] > 0:
        print("gaspar bench: the server refused every connection", file=sys.stderr)
        return 1
    return 0


def _number(
    kind: type[int] | type[float], minimum: float, inclusive: bool
) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` at least (or above) `minimum`."""
    bound = f"at least {minimum:g}" if inclusive else f"above {minimum:g}"

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return convert


def _address(text: str) -> str:
    """An argparse type: HOST:PORT or [IPV6]:PORT, checked."""
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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

    positive_int = _number(int, 1, inclusive=True)
    positive = _number(float, 0, inclusive=False)
    not_negative = _number(float, 0, inclusive=True)
    ben = sub.add_parser(
        "bench",
        help="load a server in a closed loop; report req/s, errors and latency",
        description=(
            "Keep --concurrency requests in flight against a gaspar server for --duration"
            " seconds (after --warmup unmeasured seconds), printing progress every second,"
            " then report requests/s, errors by kind and latency percentiles. The figures"
            " hold for this machine and the server's handler only."
        ),
    )
    ben.add_argument(
        "address", type=_address, metavar="HOST:PORT", help="the server: HOST:PORT or [IPV6]:PORT"
    )
    ben.add_argument(
        "--concurrency",
        type=positive_int,
        default=64,
        metavar="N",
        help="requests in flight (default 64)",
    )
    ben.add_argument(
        "--duration", type=positive, default=5.0, metavar="S", help="measured seconds (default 5)"
    )
    ben.add_argument(
        "--warmup",
        type=not_negative,
        default=1.0,
        metavar="S",
        help="unmeasured seconds first (default 1)",
    )
    payload = ben.add_mutually_exclusive_group()
    payload.add_argument(
        "--size",
        type=_number(int, 0, inclusive=True),
        default=16,
        metavar="B",
        help="random payload of B bytes, tagged per request (default 16)",
    )
    payload.add_argument(
        "--payload-file",
        metavar="F",
        help="send the bytes of file F, unchanged, in every request",
    )
    ben.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="v1",
        help="v1: a fresh connection per request (default); v2: persistent pipelined connections",
    )
    ben.add_argument(
        "--client",
        choices=BENCH_CLIENTS,
        default="raw",
        help="raw: the generator's own asyncio code (default); aio: gaspar.aio's client",
    )
    ben.add_argument(
        "--connections",
        type=positive_int,
        default=1,
        metavar="N",
        help="v2: persistent connections per generator process (default 1)",
    )
    ben.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        metavar="N",
        help="generator processes; add some if one runs near a full core (default 1)",
    )
    ben.add_argument(
        "--timeout",
        type=positive,
        default=BENCH_TIMEOUT,
        metavar="S",
        help=f"seconds per connect and per reply (default {BENCH_TIMEOUT:g})",
    )
    ben.add_argument(
        "--check-echo",
        action="store_true",
        help="count a reply that differs from its request as a mismatch (for echo handlers)",
    )
    ben.add_argument("--quiet", action="store_true", help="no progress on standard error")
    ben.add_argument(
        "--json", action="store_true", help="print the results as a JSON object on standard output"
    )
    ben.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        configure_logging(args.log_level)
    result: int = args.func(args)
    return result

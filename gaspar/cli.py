"""The ``gaspar`` command: ``serve``, ``worker``, ``request``, ``call``, ``stats``, ``bench``,
``keygen``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from .address import format_address, is_loopback_host, parse_address
from .client import request
from .clientcore import PROTOCOLS, classify
from .consumer import Consumer, as_consumer
from .errors import RequestFailed, StartupError
from .logs import HOST_ROLE, OneLineFormatter, configure_logging
from .options import OPTIONS, PRODUCER_OPTIONS, add_flags
from .producer import Producer

__all__ = ["OneLineFormatter", "build_parser", "configure_logging", "load_target", "main"]

log = logging.getLogger("gaspar.cli")

# The exit code of a command given what it cannot use (argparse's own).
EXIT_USAGE = 2
# Logged once by `gaspar serve` bound to an address other hosts can reach.
EXPOSED_WARNING = (
    "--host %s is not a loopback address: the client port is unauthenticated and unencrypted; "
    "for clients on other hosts put a TLS front before it (docs/deploy/ in gaspar's source has "
    "an HAProxy example)"
)
METRICS_EXPOSED_WARNING = (
    "--metrics-host %s is not a loopback address: /metrics is plain, unauthenticated HTTP; "
    "let only your Prometheus reach it"
)


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


def _load(target: str) -> Consumer | None:
    """The handler MODULE:ATTR names, or None once the reason it cannot be loaded is logged."""
    try:
        return load_target(target)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        log.error("cannot load %s: %s", target, exc)
        return None


def _serve(args: argparse.Namespace) -> int:
    consumer = _load(args.target)
    if consumer is None:
        return EXIT_USAGE
    settings = {o.name: getattr(args, o.name) for o in PRODUCER_OPTIONS}
    refusal = _worker_bind_refusal(args)
    if refusal:
        print(f"gaspar serve: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    try:
        producer = Producer(consumer, **settings)
    except ValueError as exc:  # the flags were checked already: only a bug gets here
        log.error("%s", exc)
        return EXIT_USAGE
    producer.target = args.target  # what a reload (SIGHUP) re-imports
    if not is_loopback_host(args.host):
        log.warning(EXPOSED_WARNING, args.host)
    if args.metrics_port is not None and not is_loopback_host(args.metrics_host):
        log.warning(METRICS_EXPOSED_WARNING, args.metrics_host)
    try:
        producer.start()
    except StartupError:  # the producer has logged its cause
        return 1
    return 0


def _failure_line(exc: BaseException, address: str) -> str:
    """A failed request as "KIND: DETAIL (server)": "timeout: request ran past ..."."""
    kind, _ = classify(exc)
    if kind == "other":  # a failure without a status of its own (UnknownTask, BadArguments)
        kind = type(exc).__name__
    text = str(exc)
    try:
        where = format_address(*parse_address(address))
    except ValueError:
        where = ""
    if where and text.startswith(where + ": "):
        text = f"{text[len(where) + 2 :]} ({where})"
    return f"{kind}: {text}"


def _worker_bind_refusal(args: argparse.Namespace) -> str:
    """Why `gaspar serve` refuses its worker-host flags, in their own words ("" if it does not)."""
    if args.worker_bind is None:
        if args.processes == 0:
            return "--workers 0 (no local workers) needs --worker-bind for worker hosts"
        if args.key is not None or args.allow is not None or args.insecure_workers:
            return "--key, --allow and --insecure-workers apply to --worker-bind only"
        return ""
    from .security import check_endpoint, load_server_keys  # ZeroMQ: only when asked for

    try:
        if check_endpoint(
            args.worker_bind,
            (args.key, args.allow),
            args.insecure_workers,
            ("--worker-bind", "--key", "--allow", "--insecure-workers"),
        ):
            load_server_keys(args.key, args.allow)
    except ValueError as exc:
        return str(exc)
    return ""


def _worker(args: argparse.Namespace) -> int:
    from .remote import host_keys, run_worker_host  # ZeroMQ: only this subcommand needs it

    consumer = _load(args.target)
    if consumer is None:
        return EXIT_USAGE
    try:
        host_keys(
            args.endpoint,
            args.key,
            args.server_key,
            args.insecure_workers,
            ("endpoint", "--key", "--server-key", "--insecure-workers"),
        )
    except ValueError as exc:
        print(f"gaspar worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_worker_host(
        consumer,
        args.endpoint,
        processes=args.processes,
        key=args.key,
        server_key=args.server_key,
        heartbeat=args.heartbeat,
        grace=args.grace,
        insecure_workers=args.insecure_workers,
        target=args.target,
        max_requests=args.max_requests,
        max_requests_jitter=args.max_requests_jitter,
        max_worker_memory=args.max_worker_memory,
        liveness_timeout=args.liveness_timeout,
    )


def _request(args: argparse.Namespace) -> int:
    message = sys.stdin.buffer.read() if args.message is None else args.message.encode()
    try:
        reply = request(args.address, message, timeout=args.timeout, protocol=args.protocol)
    except ValueError as exc:
        print(f"gaspar request: {exc}", file=sys.stderr)
        return 1
    except RequestFailed as exc:
        print(f"gaspar request: {_failure_line(exc, args.address)}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(reply)
    sys.stdout.buffer.flush()
    return 0


def _call_arguments(text: str | None) -> tuple[list[Any], dict[str, Any]]:
    """ARGS as JSON: an array is the positional arguments, an object the keywords."""
    if text is None:
        return [], {}
    value = json.loads(text)
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    return [value], {}


def _as_json(value: object) -> str:
    def bytes_as_text(obj: object) -> object:
        if isinstance(obj, bytes | bytearray):
            return bytes(obj).decode("utf-8", "backslashreplace")
        raise TypeError(f"{type(obj).__name__} is not JSON")

    return json.dumps(value, default=bytes_as_text, ensure_ascii=False)


def _call(args: argparse.Namespace) -> int:
    from .client import Client

    try:
        positional, keywords = _call_arguments(args.args)
    except ValueError as exc:
        print(f"gaspar call: ARGS is not JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Client(args.address, timeout=args.timeout, pool_size=0) as client:
            result = client.call(args.task, *positional, **keywords)
    except (TypeError, ValueError, ImportError) as exc:
        print(f"gaspar call: {exc}", file=sys.stderr)
        return 1
    except RequestFailed as exc:
        print(f"gaspar call: {_failure_line(exc, args.address)}", file=sys.stderr)
        return 1
    if isinstance(result, bytes):
        sys.stdout.buffer.write(result)
    else:
        sys.stdout.write(_as_json(result) + "\n")
    sys.stdout.flush()
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .client import stats

    try:
        numbers = stats(args.address, timeout=args.timeout)
    except ValueError as exc:
        print(f"gaspar stats: {exc}", file=sys.stderr)
        return 1
    except RequestFailed as exc:
        print(f"gaspar stats: {_failure_line(exc, args.address)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(numbers, indent=2, sort_keys=True))
    else:
        print(stats_table(numbers), end="")
    return 0


def stats_table(numbers: dict[str, Any], prefix: str = "") -> str:
    """Stats as a short table: one line a number, a map of numbers or a histogram."""
    lines = []
    for key, value in numbers.items():
        name = prefix + key
        if isinstance(value, dict) and "buckets" in value:
            lines.append(f"{name:<24} {_histogram_line(value)}\n")
        elif isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
            lines.append(stats_table(value, name + "."))
        elif isinstance(value, dict):
            shown = [f"{k} {v}" for k, v in value.items() if v] or ["none"]
            lines.append(f"{name:<24} {', '.join(shown)}\n")
        else:
            lines.append(f"{name:<24} {value}\n")
    return "".join(lines)


def _histogram_line(h: dict[str, Any]) -> str:
    count = h["count"]
    if not count:
        return "none"
    parts = [f"{count} observed, mean {_seconds(h['sum'] / count)}"]
    for q in (0.5, 0.99):
        for bound, cumulative in h["buckets"]:
            if cumulative >= q * count:
                upper = "above the last bucket" if bound == "+Inf" else f"<= {_seconds(bound)}"
                parts.append(f"p{round(q * 100)} {upper}")
                break
    return ", ".join(parts)


def _seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer at least 1, got {text!r}")
    return value


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit code 2), not usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = OneLineErrors(
        prog="gaspar", description="Serve CPU-heavy handlers from worker processes."
    )
    parser.add_argument("--version", action="version", version=f"gaspar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve a handler over TCP",
        description="Serve a handler over TCP with a pool of forked worker processes.",
    )
    serve.add_argument("target", help="MODULE:ATTR naming a handler, Consumer or Consumer class")
    add_flags(serve)
    serve.set_defaults(func=_serve)

    worker = sub.add_parser(
        "worker",
        help="run workers that join a producer on another host",
        description="Fork worker processes (from one supervisor) that join the pool of the "
        "producer whose --worker-bind is ENDPOINT, over CURVE.",
    )
    worker.add_argument("endpoint", metavar="ENDPOINT", help="the producer's tcp://HOST:PORT")
    worker.add_argument("target", help="MODULE:ATTR naming a handler, Consumer or Consumer class")
    worker.add_argument(
        "--processes",
        type=_positive_int,
        default=None,
        metavar="N",
        help="worker processes (default: the CPUs this process may use)",
    )
    worker.add_argument("--key", metavar="FILE", help="this host's secret certificate")
    worker.add_argument("--server-key", metavar="FILE", help="the producer's public certificate")
    worker.add_argument(
        "--insecure-workers",
        action="store_true",
        help="join without CURVE; only for a loopback ENDPOINT",
    )
    add_flags(
        worker,
        [
            o
            for o in OPTIONS
            if o.name
            in (
                "heartbeat",
                "grace",
                "log_level",
                "log_format",
                "max_requests",
                "max_requests_jitter",
                "max_worker_memory",
                "liveness_timeout",
            )
        ],
    )
    worker.set_defaults(func=_worker)

    req = sub.add_parser("request", help="send one request and print the reply")
    req.add_argument("address", help="HOST:PORT or [IPV6]:PORT")
    req.add_argument("message", nargs="?", help="the message (default: read standard input)")
    req.add_argument("--timeout", type=float, default=None, help="seconds to wait in all")
    req.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="v1",
        help="v1 (any gaspar server; a failure is a reset) or v2 (typed failures); default v1",
    )
    req.set_defaults(func=_request)

    call = sub.add_parser(
        "call",
        help="call a task of a gaspar.App and print its result",
        description="Call TASK of the gaspar.App served at ADDRESS (over v2; needs msgpack) and "
        "print its result as JSON (a bytes result as it is).",
    )
    call.add_argument("address", help="HOST:PORT or [IPV6]:PORT")
    call.add_argument("task", help="the task's name")
    call.add_argument(
        "args",
        nargs="?",
        metavar="ARGS",
        help="the arguments as JSON: an array of positional ones, an object of keywords, "
        "or one value",
    )
    call.add_argument("--timeout", type=float, default=None, help="seconds to wait in all")
    call.set_defaults(func=_call)

    st = sub.add_parser(
        "stats",
        help="print a server's numbers",
        description="Print a running server's numbers (Producer.stats()) through a v2 stats "
        "request: a quick look without Prometheus.",
    )
    st.add_argument("address", help="HOST:PORT or [IPV6]:PORT")
    st.add_argument("--json", action="store_true", help="print them as JSON")
    st.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    st.set_defaults(func=_stats)

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
        configure_logging(args.log_level, args.log_format)
    elif args.command == "worker":
        configure_logging(args.log_level, args.log_format, main_role=HOST_ROLE)
    result: int = args.func(args)
    return result

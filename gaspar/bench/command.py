"""The ``gaspar bench`` subcommand: its parser, added by :func:`register`, and its handler.

Cheap to import (``gaspar serve`` builds its parser with it): the load
generator is imported only when the subcommand runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

from ..address import parse_address
from ..clientcore import PROTOCOLS

__all__ = ["register"]


def number(
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


def address(text: str) -> str:
    """An argparse type: HOST:PORT or [IPV6]:PORT, checked."""
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def register(subparsers: Any) -> None:
    """Add the ``bench`` sub-parser to `subparsers` (from ``add_subparsers``) with its handler.

    The handler is ``args.func``; it returns the command's exit status: 0, 1
    (the server unreachable, a generator failed, every connection refused), 2
    (bad arguments) or 130 (interrupted).
    """
    from . import CLIENTS, DEFAULT_TIMEOUT

    positive_int = number(int, 1, inclusive=True)
    positive = number(float, 0, inclusive=False)
    not_negative = number(float, 0, inclusive=True)
    ben = subparsers.add_parser(
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
        "address", type=address, metavar="HOST:PORT", help="the server: HOST:PORT or [IPV6]:PORT"
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
        type=number(int, 0, inclusive=True),
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
        choices=CLIENTS,
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
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds per connect and per reply (default {DEFAULT_TIMEOUT:g})",
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
    ben.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run ``gaspar bench`` with parsed `args`; return its exit status."""
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
        from .report import format_report  # the load generator loads only here
        from .runner import run

        result = run(
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
        import json

        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
    errors = result["errors"]
    if not result["requests"] and result["error_total"] == errors["refused"] > 0:
        print("gaspar bench: the server refused every connection", file=sys.stderr)
        return 1
    return 0

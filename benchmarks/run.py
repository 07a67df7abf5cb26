"""Benchmark gaspar end to end: start an echo server, load it, print a Markdown table.

Usage, from anywhere::

    python benchmarks/run.py [--protocol v1 v2] [--client raw aio] [--concurrency 1 64] \\
        [--size 16] [--duration 5] [--repeat 3] [--processes 2] [--connections 1] \\
        [--warmup 1] [--workers 2]

The server is ``python -m gaspar serve benchmarks.echo:echo --port 0`` run from
the repository root.  A scenario is a (size, concurrency, client, protocol)
combination, loaded by :func:`gaspar.bench.run` (the load generator behind
``gaspar bench``, with echo checking on); every scenario is run ``--repeat``
times, the scenarios interleaved (a, b, a, b, ...) so that a drift of the
machine spreads over all of them, with v1 and v2 of the same client and
concurrency next to each other.  The table shows medians over the repeats, and
errors summed over them; after it, for each (size, client, concurrency) run
over both protocols, the ratio of v2's median requests/s to v1's.  The figures
depend on the machine and are never asserted anywhere.

Exits 1 when the server does not start, a load run fails, or the server does
not exit with status 0 after SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from gaspar import bench

ROOT = Path(__file__).resolve().parent.parent
START_DEADLINE = 30.0
STOP_DEADLINE = 40.0
LISTENING = re.compile(r"listening on (\S+):(\d+)\b")
PROBLEM_LEVELS = (" WARNING ", " ERROR ", " CRITICAL ")


class ServerLog(threading.Thread):
    """Reads the server's stderr to its end, so the pipe never fills.

    It notes the address from the "listening on HOST:PORT" line, keeps the last
    lines for diagnostics, and counts WARNING, ERROR and CRITICAL lines by
    message (the text after the logger's name, so that repeats group).
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(name="server-stderr", daemon=True)
        self.stream = stream
        self.tail: collections.deque[str] = collections.deque(maxlen=50)
        self.problems: collections.Counter[str] = collections.Counter()
        self.address: str | None = None
        self.listening = threading.Event()

    def run(self) -> None:
        for raw in self.stream:
            line = raw.rstrip("\n")
            self.tail.append(line)
            if any(level in line for level in PROBLEM_LEVELS):
                self.problems[line.split("] ", 1)[-1]] += 1
            if self.address is None:
                match = LISTENING.search(line)
                if match:
                    host, port = match.group(1), match.group(2)
                    self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                    self.listening.set()


class ServerStartError(RuntimeError):
    """The server did not come up; `tail` holds the last lines it logged."""

    def __init__(self, message: str, tail: Sequence[str]) -> None:
        super().__init__(message)
        self.tail = list(tail)


def start_server(workers: int) -> tuple[subprocess.Popen[str], ServerLog]:
    """Start the echo server; return it once it listens, or raise ServerStartError."""
    command = [
        sys.executable,
        "-m",
        "gaspar",
        "serve",
        "benchmarks.echo:echo",
        "--port",
        "0",
        "--workers",
        str(workers),
        "--log-level",
        "info",
    ]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    assert proc.stderr is not None
    log = ServerLog(proc.stderr)
    log.start()
    deadline = time.monotonic() + START_DEADLINE
    try:
        while not log.listening.wait(0.1):
            if proc.poll() is not None:
                log.join(5.0)
                message = f"the server exited with code {proc.returncode} before listening"
                raise ServerStartError(message, log.tail)
            if time.monotonic() > deadline:
                message = f"the server did not listen within {START_DEADLINE:g}s"
                raise ServerStartError(message, log.tail)
    except BaseException:
        stop_server(proc, log)
        raise
    return proc, log


def stop_server(proc: subprocess.Popen[str], log: ServerLog) -> int:
    """SIGTERM the server and wait for it, killing it after STOP_DEADLINE; return its code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            print(f"the server did not stop within {STOP_DEADLINE:g}s; killing it", file=sys.stderr)
            proc.kill()
            proc.wait()
    log.join(5.0)  # EOF comes once every process holding the pipe has gone
    return proc.returncode


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are not None, or None if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over one scenario's repeats; errors summed by kind."""
    errors: dict[str, int] = collections.Counter()
    for result in results:
        errors.update({k: v for k, v in result["errors"].items() if v})
    return {
        "rps": median([r["rps"] for r in results]),
        "p50": median([r["latency_ms"]["p50"] for r in results]),
        "p99": median([r["latency_ms"]["p99"] for r in results]),
        "errors": dict(errors),
        "cpu": median([r["cpu"]["share"] for r in results]),
        "busiest": median([r["cpu"]["busiest_process"] for r in results]),
        "processes": results[0]["processes"],
    }


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


Scenario = tuple[int, int, str, str]  # size, concurrency, client, protocol


def scenarios(
    sizes: Sequence[int],
    concurrencies: Sequence[int],
    clients: Sequence[str],
    protocols: Sequence[str],
) -> list[Scenario]:
    """Every combination, in the order they run: v1 and v2 of one case side by side."""
    return [
        (size, concurrency, client, protocol)
        for size in sizes
        for concurrency in concurrencies
        for client in clients
        for protocol in protocols
    ]


def markdown_table(rows: list[tuple[Scenario, dict[str, Any]]]) -> str:
    """Format (scenario, summary) rows as a Markdown table."""
    lines = [
        "| size (B) | concurrency | client | protocol | req/s | p50 (ms) | p99 (ms) | errors"
        " | loadgen CPU |",
        "|---:|---:|---|---|---:|---:|---:|---|---|",
    ]
    for (size, concurrency, client, protocol), s in rows:
        total = sum(s["errors"].values())
        errors = str(total)
        if total:
            errors += " (" + ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())) + ")"
        cpu = (
            f"{_num(s['cpu'], '.0%')} over {s['processes']} proc,"
            f" busiest {_num(s['busiest'], '.0%')}"
        )
        lines.append(
            f"| {size} | {concurrency} | {client} | {protocol} | {_num(s['rps'], ',.0f')}"
            f" | {_num(s['p50'], '.3f')} | {_num(s['p99'], '.3f')} | {errors} | {cpu} |"
        )
    return "\n".join(lines)


def ratios(summaries: dict[Scenario, dict[str, Any]]) -> list[tuple[int, int, str, float]]:
    """(size, concurrency, client, v2/v1 of median req/s) where both protocols ran."""
    out = []
    for (size, concurrency, client, protocol), s in summaries.items():
        if protocol != "v2":
            continue
        v1 = summaries.get((size, concurrency, client, "v1"))
        if v1 is not None and v1["rps"] and s["rps"] is not None:
            out.append((size, concurrency, client, s["rps"] / v1["rps"]))
    return out


def ratio_table(rows: list[tuple[int, int, str, float]]) -> str:
    """Format the v2/v1 ratios as a Markdown table."""
    lines = [
        "| size (B) | concurrency | client | v2/v1 req/s |",
        "|---:|---:|---|---:|",
    ]
    for size, concurrency, client, ratio in rows:
        lines.append(f"| {size} | {concurrency} | {client} | {ratio:.2f}x |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The script's argument parser."""
    parser = argparse.ArgumentParser(description="Benchmark a gaspar echo server.")
    parser.add_argument(
        "--protocol",
        nargs="+",
        choices=bench.PROTOCOLS,
        default=["v1", "v2"],
        help="v1: a connection per request; v2: persistent pipelined connections",
    )
    parser.add_argument(
        "--client",
        nargs="+",
        choices=bench.CLIENTS,
        default=["raw", "aio"],
        help="raw: the load generator's own code; aio: gaspar.aio",
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 64], help="requests in flight"
    )
    parser.add_argument("--size", type=int, nargs="+", default=[16], help="payload bytes")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--connections", type=int, default=1, help="v2: persistent connections per process"
    )
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.repeat < 1 or args.workers < 1:
        print("run.py: --repeat and --workers must be at least 1", file=sys.stderr)
        return 2
    if args.connections < 1:
        print("run.py: --connections must be at least 1", file=sys.stderr)
        return 2
    todo = scenarios(
        list(dict.fromkeys(args.size)),  # without duplicates, in the order given
        list(dict.fromkeys(args.concurrency)),
        list(dict.fromkeys(args.client)),
        list(dict.fromkeys(args.protocol)),
    )
    try:
        server, log = start_server(args.workers)
    except OSError as exc:
        print(f"run.py: cannot start the server: {exc}", file=sys.stderr)
        return 1
    except ServerStartError as exc:
        print(f"run.py: {exc}; its last lines:", file=sys.stderr)
        for line in exc.tail:
            print(f"  {line}", file=sys.stderr)
        return 1
    address = log.address
    assert address is not None
    print(f"server {address}, {args.workers} workers", file=sys.stderr)
    results: dict[Scenario, list[dict[str, Any]]] = {s: [] for s in todo}
    status = 0
    try:
        for round_ in range(args.repeat):
            for scenario in todo:
                size, concurrency, client, protocol = scenario
                result = bench.run(
                    address,
                    concurrency,
                    args.duration,
                    size,
                    processes=args.processes,
                    warmup=args.warmup,
                    protocol=protocol,
                    client=client,
                    connections=args.connections,
                    check_echo=True,  # the server is an echo
                )
                print(
                    f"[{round_ + 1}/{args.repeat}] {bench.format_summary(result)}",
                    file=sys.stderr,
                )
                results[scenario].append(result)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"run.py: load run failed: {exc}", file=sys.stderr)
        status = 1
    finally:
        code = stop_server(server, log)
    if code != 0:
        print(f"run.py: the server exited with code {code} after SIGTERM", file=sys.stderr)
        status = 1
    if log.problems:
        total = sum(log.problems.values())
        print(f"the server logged {total} warnings or errors:", file=sys.stderr)
        for message, count in log.problems.most_common(10):
            print(f"  {count} x {message}", file=sys.stderr)
    summaries = {s: summarize(results[s]) for s in todo if results[s]}
    if summaries:
        uvloop = all(r["uvloop"] for runs in results.values() for r in runs)
        print(
            f"gaspar echo, {args.workers} workers; Python {platform.python_version()},"
            f" {os.cpu_count()} CPUs; loadgen on {'uvloop' if uvloop else 'asyncio'};"
            f" median of {args.repeat} interleaved run(s) of {args.duration:g}s"
            f" (after {args.warmup:g}s warmup each); v2 over {args.connections}"
            f" connection(s) per loadgen process\n"
        )
        print(markdown_table(list(summaries.items())))
        print(
            "\nloadgen CPU: the load generator's CPU time over the measured window divided by"
            " its wall time, summed over its processes (100% = one core busy); a busiest"
            " process near 100% means the generator, not the server, was the bottleneck."
        )
        rows = ratios(summaries)
        if rows:
            print("\nv2/v1: median req/s over protocol v2 divided by that over v1\n")
            print(ratio_table(rows))
    return status


if __name__ == "__main__":
    sys.exit(main())

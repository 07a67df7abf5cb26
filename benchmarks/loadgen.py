"""A load generator for gaspar's wire protocol v1 (closed loop, one connection per request).

Usage as a script::

    python benchmarks/loadgen.py HOST:PORT --concurrency 64 --duration 5 --size 16 \\
        [--processes N] [--warmup 1] [--timeout 10] [--json]

and as a module: :func:`run` returns the results as a dict.

Exactly ``concurrency`` requests are in flight at any time.  They are split
over ``processes`` OS processes (started with multiprocessing's ``spawn``
context, so that nothing of the caller is forked), each running one asyncio
loop (uvloop when importable) with its share of client coroutines.  Each
coroutine loops: connect, write ``pack(payload)``, read to EOF, check that the
reply equals the payload (the server is expected to echo), record the latency
with :func:`time.perf_counter`.  Every payload of 12 bytes or more carries a
unique (coroutine, sequence) tag, so a reply delivered to the wrong connection
counts as a mismatch.

Timing: the processes start together on a "go" from the parent.  The first
``warmup`` seconds are not measured; a request counts when it completes inside
the measured window of ``duration`` seconds that follows.  No new request
starts after the window; requests still in flight get ``DRAIN_GRACE`` seconds
and are then abandoned, so a run is bounded in time, and every connect and
every reply wait has its own timeout as well.

Results: requests/s (requests completed OK inside the window / duration),
latency percentiles (nearest rank, over the samples of every process), error
counts by kind (reset, refused, timeout, mismatch, other), and the
generator's own CPU time (user + sys, from ``resource.getrusage`` in each
generator process, over the measured window) relative to the window's wall
time.  ``cpu.busiest_process`` close to 1.0 (a full core) means the generator,
not the server, is the bottleneck; add ``--processes`` or CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import math
import multiprocessing
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from gaspar.client import parse_address
from gaspar.protocol import pack

__all__ = ["DEFAULT_TIMEOUT", "ERROR_KINDS", "format_summary", "main", "run"]

ERROR_KINDS = ("reset", "refused", "timeout", "mismatch", "other")
DEFAULT_TIMEOUT = 10.0
# Seconds that requests in flight when the window closes get before they are abandoned.
DRAIN_GRACE = 1.0
# Seconds a coroutine pauses after a failed request, so a dead server is not hammered.
ERROR_BACKOFF = 0.01
# Seconds the generator processes get to start and report ready.
START_TIMEOUT = 60.0
# Seconds, beyond the run itself, that the parent waits for the processes' results.
RESULT_SLACK = 30.0
# A reply may not exceed this many bytes beyond the request's size.
REPLY_SLACK = 64 * 1024

_TAG = struct.Struct("!IQ")  # coroutine id, sequence number


@dataclass(frozen=True)
class _Plan:
    """What one generator process does; sent to it by pickling."""

    host: str
    port: int
    family: int
    first_id: int
    coroutines: int
    size: int
    warmup: float
    duration: float
    timeout: float


class _ReplyTooLarge(Exception):
    """The server sent more bytes than an echo of the request could be."""


class _Tally:
    """Counts of one generator process; its event loop is the only writer."""

    __slots__ = ("details", "errors", "latencies", "warmup_errors")

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.details: dict[str, int] = {}
        self.warmup_errors = 0


class _Exchange(asyncio.Protocol):
    """One v1 exchange: write the framed request on connect, collect the reply to EOF."""

    def __init__(self, request: bytes, limit: int, done: asyncio.Future[bytes]) -> None:
        self.request = request
        self.limit = limit
        self.done = done
        self.chunks: list[bytes] = []
        self.received = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.limit:
            self._fail(_ReplyTooLarge(f"more than {self.limit} bytes"))
            assert self.transport is not None
            self.transport.abort()
            return
        self.chunks.append(data)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(b"".join(self.chunks))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionAbortedError("closed before the end of the reply"))

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


def _expire(done: asyncio.Future[bytes]) -> None:
    if not done.done():
        done.set_exception(TimeoutError("no complete reply in time"))


async def _exchange(plan: _Plan, request: bytes, limit: int) -> bytes:
    """Send one framed request on a fresh connection; return the reply read to EOF."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await asyncio.wait_for(
        loop.create_connection(
            lambda: _Exchange(request, limit, done), plan.host, plan.port, family=plan.family
        ),
        plan.timeout,
    )
    timer = loop.call_later(plan.timeout, _expire, done)
    try:
        return await done
    finally:
        timer.cancel()
        if not transport.is_closing():
            transport.abort()


def _classify(exc: BaseException) -> tuple[str, str | None]:
    """Map a failed exchange to an error kind and, for odd ones, a detail for the report."""
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset", None
    if isinstance(exc, ConnectionRefusedError):
        return "refused", None
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout", None
    if isinstance(exc, _ReplyTooLarge):
        return "mismatch", "reply too large"
    if isinstance(exc, OSError) and exc.errno:
        return "other", errno.errorcode.get(exc.errno, f"errno {exc.errno}")
    return "other", f"{type(exc).__name__}: {exc}"[:120]


def _payloads(size: int, ident: int) -> Iterator[bytes]:
    """Random payloads of `size` bytes, each tagged with (ident, sequence) when it fits."""
    buf = bytearray(os.urandom(size))
    seq = 0
    while True:
        seq += 1
        if size >= _TAG.size:
            _TAG.pack_into(buf, 0, ident, seq)
        yield bytes(buf)


async def _client(plan: _Plan, ident: int, tally: _Tally, t_warm: float, t_end: float) -> None:
    """Issue requests back to back until the measured window closes."""
    perf = time.perf_counter
    payloads = _payloads(plan.size, ident)
    limit = plan.size + REPLY_SLACK
    while True:
        start = perf()
        if start >= t_end:
            return
        payload = next(payloads)
        kind: str | None = None
        detail: str | None = None
        try:
            reply = await _exchange(plan, pack(payload), limit)
        except Exception as exc:
            kind, detail = _classify(exc)
        else:
            if reply != payload:
                kind = "mismatch"
                detail = "empty reply" if not reply else "wrong reply"
        finished = perf()
        if t_warm <= finished < t_end:
            if kind is None:
                tally.latencies.append(finished - start)
            else:
                tally.errors[kind] += 1
                if detail is not None:
                    key = f"{kind}: {detail}"
                    tally.details[key] = tally.details.get(key, 0) + 1
        elif kind is not None and finished < t_warm:
            tally.warmup_errors += 1
        if kind is not None:
            await asyncio.sleep(ERROR_BACKOFF)


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _generate(plan: _Plan) -> dict[str, Any]:
    """Run one process's share of the load; return its raw results."""
    loop = asyncio.get_running_loop()
    perf = time.perf_counter
    t_warm = perf() + plan.warmup
    t_end = t_warm + plan.duration
    tally = _Tally()
    tasks = [
        loop.create_task(_client(plan, plan.first_id + i, tally, t_warm, t_end))
        for i in range(plan.coroutines)
    ]
    try:
        await asyncio.sleep(max(0.0, t_warm - perf()))
        wall0, cpu0 = perf(), _cpu_seconds()
        await asyncio.sleep(max(0.0, t_end - perf()))
        wall1, cpu1 = perf(), _cpu_seconds()
        # Let requests in flight finish (uncounted) so the server is left idle, within bounds.
        await asyncio.wait(tasks, timeout=DRAIN_GRACE)
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome  # a bug in this module, not a failed request
    return {
        "latencies": tally.latencies,
        "errors": tally.errors,
        "details": tally.details,
        "warmup_errors": tally.warmup_errors,
        "cpu_seconds": cpu1 - cpu0,
        "wall_seconds": wall1 - wall0,
    }


def _new_loop() -> tuple[asyncio.AbstractEventLoop, bool]:
    """A new event loop, uvloop's when importable; and whether it is uvloop's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop(), False
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop, True


def _child_main(conn: Connection, plan: _Plan) -> None:
    """Body of a generator process: report ready, wait for "go", run, send the results."""
    try:
        loop, uses_uvloop = _new_loop()
        try:
            conn.send(("ready", None))
            if conn.recv() != "go":
                return
            result = loop.run_until_complete(_generate(plan))
        finally:
            loop.close()
        result["uvloop"] = uses_uvloop
        conn.send(("result", result))
    except BaseException as exc:
        with contextlib.suppress(OSError):  # the parent has gone
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        conn.close()


def _split(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` near-equal positive shares."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _resolve(host: str, port: int) -> tuple[int, str]:
    """Resolve `host` once, so that no request pays for a DNS look-up."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return family, str(sockaddr[0])


def _gather(conns: Sequence[Connection], tag: str, timeout: float) -> list[Any]:
    """Receive one `tag` message from every connection within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    replies: dict[int, Any] = {}
    pending = {conn: i for i, conn in enumerate(conns)}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(
                f"{len(pending)} load generator process(es) sent no {tag} within {timeout:.0f}s"
            )
        for ready in wait(list(pending), left):
            conn = cast(Connection, ready)
            index = pending.pop(conn)
            try:
                kind, body = conn.recv()
            except EOFError:
                raise RuntimeError(f"load generator process {index} exited early") from None
            if kind == "error":
                raise RuntimeError(f"load generator process {index} failed: {body}")
            if kind != tag:
                raise RuntimeError(f"load generator process {index} sent {kind!r}, not {tag!r}")
            replies[index] = body
    return [replies[i] for i in range(len(conns))]


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q`-th percentile of sorted samples, or None without samples."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 4)


def _aggregate(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the processes' raw results into the report's counters and percentiles."""
    latencies = sorted(x for part in parts for x in part["latencies"])
    errors = dict.fromkeys(ERROR_KINDS, 0)
    details: dict[str, int] = {}
    for part in parts:
        for kind, count in part["errors"].items():
            errors[kind] += count
        for key, count in part["details"].items():
            details[key] = details.get(key, 0) + count
    shares = [p["cpu_seconds"] / p["wall_seconds"] for p in parts if p["wall_seconds"] > 0]
    return {
        "latencies": latencies,
        "errors": errors,
        "details": details,
        "warmup_errors": sum(p["warmup_errors"] for p in parts),
        "cpu": {
            "seconds": round(sum(p["cpu_seconds"] for p in parts), 4),
            # Cores' worth of CPU the generator used: 1.0 is one core busy all the time.
            "share": round(sum(shares), 4),
            "busiest_process": round(max(shares, default=0.0), 4),
        },
        "uvloop": all(p["uvloop"] for p in parts),
    }


def run(
    address: str | tuple[str, int],
    concurrency: int,
    duration: float,
    size: int,
    processes: int = 1,
    warmup: float = 1.0,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Load a v1 echo server at `address`; return the measured results.

    `concurrency` requests of `size` bytes are kept in flight by `processes`
    generator processes (at most one per request in flight) for `warmup` +
    `duration` seconds; only the last `duration` seconds are measured.
    `timeout` bounds each connect and each wait for a reply.  Raises
    ValueError for bad arguments, OSError when the host cannot be resolved,
    RuntimeError when a generator process fails.
    """
    if concurrency < 1 or processes < 1:
        raise ValueError("concurrency and processes must be at least 1")
    if duration <= 0 or warmup < 0 or timeout <= 0 or size < 0:
        raise ValueError("duration and timeout must be positive; warmup and size not negative")
    host, port = parse_address(address)
    family, ip = _resolve(host, port)
    shares = _split(concurrency, min(processes, concurrency))
    ctx = multiprocessing.get_context("spawn")
    children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        first_id = 0
        for index, coroutines in enumerate(shares):
            plan = _Plan(ip, port, family, first_id, coroutines, size, warmup, duration, timeout)
            first_id += coroutines
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_child_main, args=(theirs, plan), name=f"loadgen-{index}", daemon=True
            )
            proc.start()
            theirs.close()
            children.append((proc, ours))
        conns = [conn for _, conn in children]
        _gather(conns, "ready", START_TIMEOUT)
        for conn in conns:
            conn.send("go")
        parts = _gather(conns, "result", warmup + duration + DRAIN_GRACE + RESULT_SLACK)
    finally:
        for _, conn in children:
            conn.close()
        for child, _ in children:
            child.join(5.0)
            if child.is_alive():
                child.kill()
                child.join()
    merged = _aggregate(parts)
    latencies = merged.pop("latencies")
    requests = len(latencies)
    return {
        "address": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "concurrency": concurrency,
        "processes": len(shares),
        "size": size,
        "warmup": warmup,
        "duration": duration,
        "requests": requests,
        "rps": round(requests / duration, 2),
        "latency_ms": {
            "p50": _ms(_percentile(latencies, 50)),
            "p90": _ms(_percentile(latencies, 90)),
            "p99": _ms(_percentile(latencies, 99)),
            "mean": _ms(sum(latencies) / requests if requests else None),
            "max": _ms(latencies[-1] if latencies else None),
        },
        "error_total": sum(merged["errors"].values()),
        **merged,
    }


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_summary(result: dict[str, Any]) -> str:
    """One line for a human: throughput, latency, errors and the generator's CPU."""
    lat = result["latency_ms"]
    errors = result["errors"]
    error_text = ", ".join(f"{kind} {n}" for kind, n in errors.items() if n) or "none"
    cpu = result["cpu"]
    return (
        f"{result['address']} c={result['concurrency']} procs={result['processes']}"
        f" size={result['size']}B {result['duration']:g}s:"
        f" {result['rps']:.0f} req/s, p50 {_fmt_ms(lat['p50'])} ms,"
        f" p90 {_fmt_ms(lat['p90'])} ms, p99 {_fmt_ms(lat['p99'])} ms,"
        f" errors {result['error_total']} ({error_text}),"
        f" loadgen CPU {cpu['share']:.0%} of a core (busiest process {cpu['busiest_process']:.0%})"
    )


def build_parser() -> argparse.ArgumentParser:
    """The script's argument parser."""
    parser = argparse.ArgumentParser(
        description="Load a gaspar v1 echo server: one connection per request, closed loop."
    )
    parser.add_argument("address", help="HOST:PORT or [IPV6]:PORT")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--size", type=int, default=16, help="payload bytes")
    parser.add_argument("--processes", type=int, default=1, help="generator processes")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per connect or reply"
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON object (the summary goes to stderr)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        result = run(
            args.address,
            args.concurrency,
            args.duration,
            args.size,
            processes=args.processes,
            warmup=args.warmup,
            timeout=args.timeout,
        )
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(format_summary(result), file=sys.stderr)
        print(json.dumps(result, indent=2))
    else:
        print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

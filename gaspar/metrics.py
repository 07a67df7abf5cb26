"""Metrics: plain counters on the request path, Prometheus text at scrape time.

The producer counts what it sees (requests, bytes, connections, worker starts
and exits) in plain ints and lists; the request path never calls
prometheus-client.  At a scrape, :class:`Collector` reads those numbers
(through :meth:`gaspar.Producer.stats`, the same numbers Python callers get)
and turns them into metric families; the endpoint (:func:`serve_metrics`) is
a small HTTP handler on the producer's own event loop, not
prometheus-client's threaded server.  Workers report only what only they
know: each reply carries its handler's run time, and a local worker's
resident memory is read from ``/proc/PID/statm`` at scrape time.

prometheus-client is the optional extra ``metrics``, imported only when the
endpoint starts (:func:`require` says so in one line when it is missing).
docs/observability.md lists every metric.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .address import format_address
from .errors import StartupError

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "BOUNDS",
    "EXIT_CAUSES",
    "Collector",
    "Histogram",
    "WORKER_STATES",
    "MetricsServer",
    "clock",
    "exit_cause",
    "require",
    "resident_bytes",
    "serve_metrics",
]

log = logging.getLogger("gaspar.metrics")

#: The clock of every duration measured (seconds, monotonic, sub-microsecond).
clock = time.perf_counter
#: Upper bounds (seconds) of every histogram's buckets; +Inf follows.
BOUNDS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: The states a worker in service is counted in.
WORKER_STATES = ("idle", "busy", "leaving")
#: Why a local worker exited, as counted (see :func:`exit_cause`).
EXIT_CAUSES = ("normal", "signal", "crash", "setup_failure", "timeout")
MISSING_EXTRA = (
    "metrics_port needs prometheus-client, the 'metrics' extra: pip install '.[metrics]'"
    " from gaspar's checkout, or pip install prometheus-client"
)
# The endpoint's own bounds: a request head, the time to send it, connections at once.
MAX_HEAD = 8192
HEAD_TIMEOUT = 10.0
MAX_SCRAPERS = 16
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Histogram:
    """Counts of observed durations by bucket (:data:`BOUNDS`), and their sum.

    Plain ints in a list, so that an observation is a bisect and two adds
    (the dispatcher inlines :meth:`observe` on the request path);
    Prometheus's cumulative form is made at scrape time (:meth:`snapshot`).
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> dict[str, Any]:
        """``count``, ``sum`` and cumulative ``buckets`` as [bound, count] (last bound "+Inf")."""
        counts, total = list(self.counts), self.sum  # one C call: safe from another thread
        buckets: list[list[Any]] = []
        running = 0
        for bound, n in zip((*BOUNDS, "+Inf"), counts, strict=True):
            running += n
            buckets.append([bound, running])
        return {"count": running, "sum": total, "buckets": buckets}


def exit_cause(code: int, timed_out: bool) -> str:
    """Why a worker exited, from its exit code (minus a signal's number)."""
    from .exitcodes import EXIT_BOOT_ERROR

    if timed_out:
        return "timeout"
    if code == 0:
        return "normal"
    if code < 0:
        return "signal"
    if code == EXIT_BOOT_ERROR:
        return "setup_failure"
    return "crash"


def resident_bytes(pid: int) -> int | None:
    """Resident memory of process `pid` from /proc/PID/statm, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def require() -> None:
    """StartupError (one line naming the extra) unless prometheus-client can be imported."""
    # Found, not imported: the supervisor and the workers are forked after this.
    from importlib.util import find_spec

    try:
        found = find_spec("prometheus_client") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise StartupError(MISSING_EXTRA)


class Collector:
    """A prometheus-client collector over a stats() snapshot, read at each scrape."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def describe(self) -> list[Any]:
        return []  # unchecked registration: families are known only at collect time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self.stats()
        requests = CounterMetricFamily(
            "gaspar_requests",
            "Requests that ended, by protocol and outcome",
            labels=["protocol", "outcome"],
        )
        for protocol, outcomes in s["requests_by_protocol"].items():
            for outcome, n in outcomes.items():
                requests.add_metric([protocol, outcome], n)
        yield requests
        yield GaugeMetricFamily(
            "gaspar_requests_in_flight", "Requests running in a worker", value=s["in_flight"]
        )
        yield GaugeMetricFamily(
            "gaspar_queue_depth", "Requests waiting for a free worker", value=s["queued"]
        )
        for key, name, doc in (
            ("latency", "gaspar_request_duration_seconds", "From request read to its end"),
            ("handler_time", "gaspar_handler_duration_seconds", "Handler run time in a worker"),
            ("queue_wait", "gaspar_queue_wait_seconds", "From request read to a worker's start"),
        ):
            h = s[key]
            yield HistogramMetricFamily(
                name,
                doc,
                buckets=[(_bound(b), n) for b, n in h["buckets"]],
                sum_value=h["sum"],
            )
        workers = GaugeMetricFamily("gaspar_workers", "Workers by state", labels=["state"])
        for state, n in s["workers_by_state"].items():
            workers.add_metric([state], n)
        yield workers
        yield CounterMetricFamily(
            "gaspar_worker_starts", "Local workers started", value=s["worker_starts"]
        )
        exits = CounterMetricFamily(
            "gaspar_worker_exits", "Local workers that exited, by cause", labels=["cause"]
        )
        for cause, n in s["worker_exits"].items():
            exits.add_metric([cause], n)
        yield exits
        memory = s["worker_memory"]
        family = GaugeMetricFamily(
            "gaspar_worker_resident_bytes",
            "Resident memory of the local workers: their sum, and the largest",
            labels=["of"],
        )
        family.add_metric(["sum"], memory["sum"])
        family.add_metric(["max"], memory["max"])
        yield family
        yield GaugeMetricFamily(
            "gaspar_remote_hosts",
            "Remote worker hosts connected",
            value=s.get("remote_hosts", 0),
        )
        yield GaugeMetricFamily(
            "gaspar_connections", "Open client connections", value=s["connections"]
        )
        yield CounterMetricFamily(
            "gaspar_received_bytes", "Bytes read from clients", value=s["bytes_in"]
        )
        yield CounterMetricFamily(
            "gaspar_sent_bytes", "Bytes written to clients", value=s["bytes_out"]
        )


def _bound(bound: float | str) -> str:
    return bound if isinstance(bound, str) else repr(float(bound))


class MetricsServer:
    """The /metrics endpoint: a small HTTP/1.1 handler on the caller's event loop."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(stats))  # type: ignore[arg-type]
        # The producer process's own CPU, memory and descriptors, read at scrape.
        ProcessCollector(namespace="gaspar_producer", registry=self.registry)
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind and serve; return the bound (host, port)."""
        import asyncio

        try:
            self._server = await asyncio.start_server(
                self._handle, host, port, reuse_address=True, limit=MAX_HEAD
            )
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {format_address(host, port)}: {exc}"
            ) from exc
        name = self._server.sockets[0].getsockname()
        self.address = (name[0], name[1])
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._open):
            task.cancel()
        for task in list(self._open):
            with contextlib.suppress(BaseException):
                await task

    def render(self) -> bytes:
        """The metrics as Prometheus text."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        task = asyncio.current_task()
        assert task is not None
        if len(self._open) >= MAX_SCRAPERS:
            writer.transport.abort()
            return
        self._open.add(task)
        try:
            status, body, ctype = await self._answer(reader)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
            writer.close()
        except (
            OSError,
            ValueError,
            asyncio.TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            writer.transport.abort()
        except Exception:
            log.exception("metrics endpoint failed")
            writer.transport.abort()
        finally:
            self._open.discard(task)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes, str]:
        import asyncio

        # A request head, whole, within its bounds (StreamReader's limit: MAX_HEAD).
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        words = head.split(b"\r\n", 1)[0].split()
        text = "text/plain; charset=utf-8"
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            return "400 Bad Request", b"bad request\n", text
        method, target = words[0], words[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return "404 Not Found", b"not found: try /metrics\n", text
        if method != b"GET":
            return "405 Method Not Allowed", b"GET /metrics\n", text
        from prometheus_client import CONTENT_TYPE_LATEST

        return "200 OK", self.render(), CONTENT_TYPE_LATEST


async def serve_metrics(stats: Callable[[], dict[str, Any]], host: str, port: int) -> MetricsServer:
    """Start the /metrics endpoint on the running loop."""
    server = MetricsServer(stats)
    address = await server.start(host, port)
    log.info("metrics on http://%s/metrics", format_address(*address))
    return server

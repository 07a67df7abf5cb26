"""``gaspar bench``: a closed-loop load generator for gaspar's wire protocols v1 and v2.

From the command line (the parser is in :mod:`gaspar.cli`)::

    gaspar bench HOST:PORT [--concurrency 64] [--duration 5] [--size 16 | --payload-file F]
        [--protocol v1|v2] [--client raw|aio] [--connections 1] [--processes N]
        [--warmup 1] [--timeout 10] [--check-echo] [--quiet] [--json]

and as a module: :func:`run` returns the results as a dict, which
:func:`format_report` (several lines) and :func:`format_summary` (one line)
turn into text.

Exactly ``concurrency`` requests are in flight at any time.  They are split
over ``processes`` OS processes (started with multiprocessing's ``spawn``
context, so that nothing of the caller is forked), each running one asyncio
loop (uvloop when importable).  Closed loop: each reply triggers the next
request.  Payloads are either ``size`` random bytes, each carrying a unique
(client, sequence) tag when 12 bytes or more, or one fixed ``payload`` (a
file's bytes, say) sent unchanged in every request.

Replies: with ``check_echo`` the server is expected to echo, and a reply that
differs from its request counts as a mismatch (thanks to the tags, so does a
reply delivered to the wrong request).  Without it (the command's default:
users bench their own handlers) any successful reply counts: a v1 reply read
to EOF without a reset, a v2 reply with status OK.  Four ways to send, by
``protocol`` and ``client``:

- raw v1: each client coroutine loops: connect, write ``pack(payload)``, read
  to EOF, check the reply.  One fresh connection per request.
- raw v2: each process opens ``connections`` persistent connections (at most
  one per request in flight), writes the preamble, and keeps its share of the
  requests in flight on them, split evenly, from one asyncio Protocol per
  connection (no coroutine per request).  A request's v2 id is its slot on
  the connection; each reply (they come in completion order, matched by id)
  is checked (status OK and, with ``check_echo``, body equal to the payload)
  and at once replaced by the next request on that id; the replies of one
  read are answered with one write.  The server's preamble is checked by
  :class:`gaspar.protocol.ReplyReaderV2` before any reply is read.
- aio v1: each client coroutine loops on
  ``await gaspar.aio.request(address, payload, timeout=timeout)``.
- aio v2: the client coroutines of a process share one
  ``gaspar.aio.AsyncClient(address, connections=connections, timeout=timeout)``
  and loop on ``await client.request(payload)``.

The aio clients measure what gaspar's own asyncio client costs on top of the
raw protocol.

Timing: before anything starts, one connection probes the server (for v2, it
also checks the server's preamble), so an unreachable server fails at once.
The processes start together on a "go" from the parent.  The first
``warmup`` seconds are not measured; a request counts when it completes inside
the measured window of ``duration`` seconds that follows, and its latency runs
from its send (v2) or its connect (v1) to its reply.  No new request starts
after the window; requests still in flight get ``DRAIN_GRACE`` seconds and are
then abandoned, so a run is bounded in time.  Every connect and every reply
wait has its own timeout as well: on a raw v2 connection, a request without a
reply after ``timeout`` seconds fails every request on that connection, which
is then replaced.  With ``progress``, each process sends its running totals
to the parent every second of the window, and the parent prints one line per
second to standard error.

Results: requests/s (requests completed OK inside the window / duration),
latency percentiles (nearest rank, over the samples of every process), error
counts by kind (reset, refused, timeout, mismatch, the v2 statuses by their
lowercased :class:`gaspar.protocol.Status` name, other), and the generator's
own CPU time (user + sys, from ``resource.getrusage`` in each generator
process, over the measured window) relative to the window's wall time.
``cpu.busiest_process`` close to 1.0 (a full core) means the generator, not
the server, is the bottleneck; add ``--processes`` or CPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import math
import multiprocessing
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO, cast

from .aio import AsyncClient
from .aio import request as aio_request
from .client import DEFAULT_MAX_REPLY_SIZE, parse_address
from .clientcore import EXCEPTIONS, PROTOCOLS
from .errors import (
    RequestFailed,
)
from .protocol import (
    MAGIC_V2,
    LimitExceeded,
    ProtocolError,
    ReplyReaderV2,
    Status,
    pack,
    pack_request_v2,
)

__all__ = [
    "CLIENTS",
    "DEFAULT_TIMEOUT",
    "ERROR_KINDS",
    "PROTOCOLS",
    "format_progress",
    "format_report",
    "format_summary",
    "run",
]

CLIENTS = ("raw", "aio")
# v2 statuses other than OK, by lowercased name; TIMEOUT shares "timeout" with the client's own.
_STATUS_KINDS: dict[Status, str] = {
    status: status.name.lower() for status in Status if status is not Status.OK
}
ERROR_KINDS = (
    "reset",
    "refused",
    "timeout",
    "mismatch",
    *(kind for kind in _STATUS_KINDS.values() if kind != "timeout"),
    "other",
)
DEFAULT_TIMEOUT = 10.0
# Seconds that requests in flight when the window closes get before they are abandoned.
DRAIN_GRACE = 1.0
# Seconds a client pauses after a failed request, so a dead server is not hammered.
ERROR_BACKOFF = 0.01
# Seconds between two checks of the raw v2 connections for requests past their timeout.
WATCH_INTERVAL = 0.1
# Seconds the generator processes get to start and report ready.
START_TIMEOUT = 60.0
# Seconds, beyond the run itself, that the parent waits for the processes' results.
RESULT_SLACK = 30.0
# With echo checking, a reply may not exceed this many bytes beyond the request's size.
REPLY_SLACK = 64 * 1024
# Seconds between two progress reports of a generator process.
PROGRESS_INTERVAL = 1.0

_TAG = struct.Struct("!IQ")  # client id, sequence number


Exchange = Callable[[bytes], Awaitable[bytes]]


@dataclass(frozen=True)
class _Plan:
    """What one generator process does; sent to it by pickling."""

    host: str
    port: int
    family: int
    first_id: int
    coroutines: int  # requests in flight
    size: int
    warmup: float
    duration: float
    timeout: float
    protocol: str = "v1"
    client: str = "raw"
    connections: int = 1  # v2: persistent connections of this process
    payload: bytes | None = None  # sent unchanged in every request, instead of random bytes
    check_echo: bool = False  # a reply must equal its request
    progress: bool = False  # send ("progress", (elapsed, ok, errors)) every second

    @property
    def reply_limit(self) -> int:
        """The largest reply accepted: an echo's size when checking, else the client's limit."""
        return self.size + REPLY_SLACK if self.check_echo else DEFAULT_MAX_REPLY_SIZE

    def too_large(self) -> str:
        """The error kind of a reply above `reply_limit`: it cannot be an echo."""
        return "mismatch" if self.check_echo else "too_large"


class _ReplyTooLarge(Exception):
    """The server sent more bytes than the plan's reply limit."""


class _Tally:
    """Counts of one generator process; its event loop is the only writer."""

    __slots__ = ("details", "errors", "latencies", "t_end", "t_warm", "warmup_errors")

    def __init__(self, t_warm: float, t_end: float) -> None:
        self.t_warm = t_warm
        self.t_end = t_end
        self.latencies: list[float] = []
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.details: dict[str, int] = {}
        self.warmup_errors = 0

    def counts(self) -> tuple[int, int]:
        """Requests that succeeded, and that failed, inside the window so far."""
        return len(self.latencies), sum(self.errors.values())

    def failed(self, kind: str, detail: str | None, finished: float, count: int = 1) -> None:
        """Count `count` requests that failed at `finished`, if inside the window."""
        if self.t_warm <= finished < self.t_end:
            self.errors[kind] += count
            if detail is not None:
                key = f"{kind}: {detail}"
                self.details[key] = self.details.get(key, 0) + count
        elif finished < self.t_warm:
            self.warmup_errors += count


# -- v1, raw -----------------------------------------------------------------------


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


def _classify(exc: BaseException, too_large: str = "too_large") -> tuple[str, str | None]:
    """Map a failed exchange to an error kind and, for odd ones, a detail for the report.

    `too_large` is the kind of a reply above the plan's limit (see :meth:`_Plan.too_large`).
    """
    if isinstance(exc, RequestFailed):  # from gaspar.aio
        for status, failure in EXCEPTIONS.items():
            if isinstance(exc, failure):
                return _STATUS_KINDS[status], None
        if exc.__cause__ is not None:  # ConnectionFailed, or a v1 reset
            return _classify(exc.__cause__, too_large)
        return "other", f"{type(exc).__name__}: {exc}"[:120]
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset", None
    if isinstance(exc, ConnectionRefusedError):
        return "refused", None
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout", None
    if isinstance(exc, _ReplyTooLarge | LimitExceeded):
        return too_large, "reply too large"
    if isinstance(exc, OSError) and exc.errno:
        return "other", errno.errorcode.get(exc.errno, f"errno {exc.errno}")
    return "other", f"{type(exc).__name__}: {exc}"[:120]


def _payloads(plan: _Plan, ident: int) -> Iterator[bytes]:
    """The payloads of client `ident`: the plan's fixed payload, or tagged random bytes."""
    if plan.payload is not None:
        return itertools.repeat(plan.payload)
    return _random_payloads(plan.size, ident)


def _random_payloads(size: int, ident: int) -> Iterator[bytes]:
    """Random payloads of `size` bytes, each tagged with (ident, sequence) when it fits."""
    buf = bytearray(os.urandom(size))
    seq = 0
    while True:
        seq += 1
        if size >= _TAG.size:
            _TAG.pack_into(buf, 0, ident, seq)
        yield bytes(buf)


# -- one coroutine per request in flight: raw v1, aio v1, aio v2 ------------------------


async def _client(plan: _Plan, ident: int, exchange: Exchange, tally: _Tally) -> None:
    """Issue requests back to back until the measured window closes."""
    perf = time.perf_counter
    payloads = _payloads(plan, ident)
    check_echo = plan.check_echo
    too_large = plan.too_large()
    t_end = tally.t_end
    while True:
        start = perf()
        if start >= t_end:
            return
        payload = next(payloads)
        kind: str | None = None
        detail: str | None = None
        try:
            reply = await exchange(payload)
        except Exception as exc:
            kind, detail = _classify(exc, too_large)
        else:
            if check_echo and reply != payload:
                kind = "mismatch"
                detail = "empty reply" if not reply else "wrong reply"
        finished = perf()
        if kind is None:
            if tally.t_warm <= finished < t_end:
                tally.latencies.append(finished - start)
        else:
            tally.failed(kind, detail, finished)
            await asyncio.sleep(ERROR_BACKOFF)


class _CoroutineLoad:
    """`plan.coroutines` client coroutines, each with one request in flight."""

    def __init__(self, plan: _Plan, tally: _Tally) -> None:
        self.plan = plan
        self.tally = tally
        self.tasks: list[asyncio.Task[None]] = []
        self.shared: AsyncClient | None = None

    def start(self) -> None:
        plan = self.plan
        exchange: Exchange
        if plan.client == "aio" and plan.protocol == "v2":
            self.shared = AsyncClient(
                (plan.host, plan.port), connections=plan.connections, timeout=plan.timeout
            )
            exchange = self.shared.request
        elif plan.client == "aio":
            address = (plan.host, plan.port)

            async def exchange(payload: bytes) -> bytes:
                return await aio_request(address, payload, timeout=plan.timeout)

        else:
            limit = plan.reply_limit

            async def exchange(payload: bytes) -> bytes:
                return await _exchange(plan, pack(payload), limit)

        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(_client(plan, plan.first_id + i, exchange, self.tally))
            for i in range(plan.coroutines)
        ]

    async def drain(self, grace: float) -> None:
        await asyncio.wait(self.tasks, timeout=grace)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        outcomes = await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.shared is not None:
            await self.shared.close()
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                raise outcome  # a bug in this module, not a failed request


# -- raw v2: pipelined requests on persistent connections --------------------------------


class _Slot:
    """One request in flight on a v2 connection; its index there is its request id."""

    __slots__ = ("busy", "payload", "payloads", "start")

    def __init__(self, plan: _Plan, ident: int) -> None:
        self.payloads = _payloads(plan, ident)
        self.payload = b""
        self.start = 0.0
        self.busy = False


class _Pipeline(asyncio.Protocol):
    """One persistent v2 connection keeping its slots' requests in flight."""

    def __init__(self, load: _PipelinedLoad, index: int) -> None:
        self.load = load
        self.index = index
        self.slots = load.slots[index]
        self.reader = ReplyReaderV2(load.plan.reply_limit)
        self.transport: asyncio.Transport | None = None
        self.in_flight = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.load.live[self.index] = self
        frames = [self._frame(rid) for rid in range(len(self.slots))] if self.load.sending else []
        start = time.perf_counter()
        for slot in self.slots:
            slot.start = start
        self.transport.write(b"".join([MAGIC_V2, *frames]))

    def _frame(self, rid: int) -> bytes:
        slot = self.slots[rid]
        payload = next(slot.payloads)
        slot.payload = payload
        slot.busy = True
        self.in_flight += 1
        return pack_request_v2(rid, payload)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.reader.feed(data)
        except LimitExceeded:
            self.fail(self.load.plan.too_large(), "reply too large")
            return
        except ProtocolError as exc:
            self.fail("other", str(exc))
            return
        now = time.perf_counter()
        tally = self.load.tally
        measured = tally.t_warm <= now < tally.t_end
        more = now < tally.t_end
        slots = self.slots
        check_echo = self.load.plan.check_echo
        frames: list[bytes] = []
        sent: list[_Slot] = []
        for rid, status, body in replies:
            slot = slots[rid] if rid < len(slots) else None
            if slot is None or not slot.busy:
                kind = "mismatch" if check_echo else "other"
                tally.failed(kind, "reply to an id not in flight", now)
                continue
            slot.busy = False
            self.in_flight -= 1
            if status is Status.OK and (not check_echo or body == slot.payload):
                if measured:
                    tally.latencies.append(now - slot.start)
                if more:
                    frames.append(self._frame(rid))
                    sent.append(slot)
                continue
            if status is not Status.OK:
                detail = "status TIMEOUT from the server" if status is Status.TIMEOUT else None
                tally.failed(_STATUS_KINDS[status], detail, now)
            else:
                tally.failed("mismatch", "empty reply" if not body else "wrong reply", now)
            if more:
                asyncio.get_running_loop().call_later(ERROR_BACKOFF, self._resend, rid)
        if frames:
            assert self.transport is not None
            start = time.perf_counter()
            for slot in sent:
                slot.start = start
            self.transport.write(b"".join(frames))

    def _resend(self, rid: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or not self.load.sending:
            return
        frame = self._frame(rid)
        self.slots[rid].start = time.perf_counter()
        transport.write(frame)

    def eof_received(self) -> bool:
        return False  # connection_lost(None) follows

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._forget("other", "the server closed the connection")
        else:
            self._forget(*_classify(exc, self.load.plan.too_large()))
        if self.load.live[self.index] is self:
            self.load.live[self.index] = None
        self.transport = None
        self.load.reconnect(self.index)
        if not self.lost.done():
            self.lost.set_result(None)

    def oldest(self) -> float | None:
        """When the oldest request still in flight was sent, or None."""
        starts = [slot.start for slot in self.slots if slot.busy]
        return min(starts) if starts else None

    def fail(self, kind: str, detail: str | None) -> None:
        """Count the requests in flight as failed with `kind`; drop the connection."""
        self._forget(kind, detail)
        if self.transport is not None:
            self.transport.abort()

    def _forget(self, kind: str, detail: str | None) -> None:
        if not self.in_flight:
            return
        for slot in self.slots:
            slot.busy = False
        self.load.tally.failed(kind, detail, time.perf_counter(), self.in_flight)
        self.in_flight = 0


class _PipelinedLoad:
    """`plan.connections` raw v2 connections sharing `plan.coroutines` requests in flight."""

    def __init__(self, plan: _Plan, tally: _Tally) -> None:
        self.plan = plan
        self.tally = tally
        shares = _split(plan.coroutines, max(1, min(plan.connections, plan.coroutines)))
        ident = plan.first_id
        self.slots: list[list[_Slot]] = []
        for share in shares:
            self.slots.append([_Slot(plan, ident + i) for i in range(share)])
            ident += share
        self.live: list[_Pipeline | None] = [None] * len(shares)
        self.pipelines: list[_Pipeline] = []
        self.connecting: set[asyncio.Task[None]] = set()
        self.closing = False
        self.watchdog: asyncio.TimerHandle | None = None

    @property
    def sending(self) -> bool:
        """Whether new requests may start: not after the measured window."""
        return not self.closing and time.perf_counter() < self.tally.t_end

    def start(self) -> None:
        for index in range(len(self.slots)):
            self._connect_later(index, 0.0)
        self._watch()

    def reconnect(self, index: int) -> None:
        if self.sending:
            self._connect_later(index, ERROR_BACKOFF)

    def _connect_later(self, index: int, delay: float) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(index, delay))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _connect(self, index: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if not self.sending:
            return
        plan = self.plan
        loop = asyncio.get_running_loop()
        try:
            _, pipeline = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Pipeline(self, index), plan.host, plan.port, family=plan.family
                ),
                plan.timeout,
            )
        except Exception as exc:
            kind, detail = _classify(exc, plan.too_large())
            self.tally.failed(kind, detail, time.perf_counter(), len(self.slots[index]))
            self.reconnect(index)
            return
        self.pipelines.append(pipeline)

    def _watch(self) -> None:
        """Fail the connections whose oldest request is past its timeout."""
        expired = time.perf_counter() - self.plan.timeout
        for pipeline in self.live:
            if pipeline is not None:
                oldest = pipeline.oldest()
                if oldest is not None and oldest < expired:
                    pipeline.fail("timeout", None)
        self.watchdog = asyncio.get_running_loop().call_later(WATCH_INTERVAL, self._watch)

    async def drain(self, grace: float) -> None:
        deadline = time.perf_counter() + grace
        while time.perf_counter() < deadline and any(
            p is not None and p.in_flight for p in self.live
        ):
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        self.closing = True
        if self.watchdog is not None:
            self.watchdog.cancel()
        for task in list(self.connecting):
            task.cancel()
        await asyncio.gather(*self.connecting, return_exceptions=True)
        for pipeline in self.live:
            if pipeline is not None and pipeline.transport is not None:
                pipeline.transport.abort()
        lost = [p.lost for p in self.pipelines if not p.lost.done()]
        if lost:
            await asyncio.wait(lost, timeout=1.0)


# -- a generator process ------------------------------------------------------------------


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Report = Callable[[float, int, int], None]


async def _generate(plan: _Plan, report: Report | None = None) -> dict[str, Any]:
    """Run one process's share of the load; return its raw results.

    `report(elapsed, ok, errors)`, when given, gets the running totals every
    PROGRESS_INTERVAL seconds of the measured window and at its end.
    """
    perf = time.perf_counter
    t_warm = perf() + plan.warmup
    t_end = t_warm + plan.duration
    tally = _Tally(t_warm, t_end)
    load: _CoroutineLoad | _PipelinedLoad
    if plan.protocol == "v2" and plan.client == "raw":
        load = _PipelinedLoad(plan, tally)
    else:
        load = _CoroutineLoad(plan, tally)
    load.start()
    try:
        await asyncio.sleep(max(0.0, t_warm - perf()))
        wall0, cpu0 = perf(), _cpu_seconds()
        wall1, cpu1 = wall0, cpu0
        elapsed = 0.0
        while elapsed < plan.duration:
            elapsed = min(elapsed + PROGRESS_INTERVAL, plan.duration)
            # A loop's timers may fire a little early (uvloop's have 1 ms steps): sleep on.
            while (left := t_warm + elapsed - perf()) > 0:
                await asyncio.sleep(left)
            if elapsed >= plan.duration:
                wall1, cpu1 = perf(), _cpu_seconds()
            if report is not None:
                report(elapsed, *tally.counts())
        # Let requests in flight finish (uncounted) so the server is left idle, within bounds.
        await load.drain(DRAIN_GRACE)
    finally:
        await load.close()
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
    """Body of a generator process: report ready, wait for "go", run, send the results.

    With `plan.progress`, it also sends ("progress", (elapsed, ok, errors)) every
    PROGRESS_INTERVAL seconds of the measured window, before its result.
    """

    def report(elapsed: float, ok: int, errors: int) -> None:
        conn.send(("progress", (elapsed, ok, errors)))

    # Ctrl-C is the parent's to handle: it stops (kills) this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        loop, uses_uvloop = _new_loop()
        try:
            conn.send(("ready", None))
            if conn.recv() != "go":
                return
            result = loop.run_until_complete(_generate(plan, report if plan.progress else None))
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
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectionError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])


def _probe(family: int, ip: str, port: int, protocol: str, timeout: float) -> None:
    """Connect once (for v2, also check the server's preamble); raise ConnectionError if not."""
    where = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect((ip, port))
            if protocol == "v2":
                sock.sendall(MAGIC_V2)
                answer = b""
                while len(answer) < len(MAGIC_V2):
                    chunk = sock.recv(len(MAGIC_V2) - len(answer))
                    if not chunk:
                        break
                    answer += chunk
                if answer != MAGIC_V2:
                    raise ConnectionError("it does not answer the protocol v2 preamble")
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConnectionError(f"cannot reach the server at {where}: {reason}") from exc


def _gather(
    conns: Sequence[Connection],
    tag: str,
    timeout: float,
    on_progress: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Receive one `tag` message from every connection within `timeout` seconds.

    "progress" messages that come first go to `on_progress(index, body)`.
    """
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
            index = pending[conn]
            try:
                kind, body = conn.recv()
            except EOFError:
                raise RuntimeError(f"load generator process {index} exited early") from None
            if kind == "progress":
                if on_progress is not None:
                    on_progress(index, body)
                continue
            if kind == "error":
                raise RuntimeError(f"load generator process {index} failed: {body}")
            if kind != tag:
                raise RuntimeError(f"load generator process {index} sent {kind!r}, not {tag!r}")
            del pending[conn]
            replies[index] = body
    return [replies[i] for i in range(len(conns))]


def format_progress(elapsed: float, rate: float, ok: int, errors: int) -> str:
    """One progress line: seconds into the window, req/s over the last second, totals."""
    return f"{elapsed:5.1f}s  {rate:,.0f} req/s  ok {ok:,}  errors {errors:,}"


class _Progress:
    """Prints a progress line once every generator process has reported the same tick."""

    def __init__(self, processes: int, stream: TextIO) -> None:
        self.stream = stream
        self.ticks: list[list[tuple[float, int, int]]] = [[] for _ in range(processes)]
        self.printed = 0
        self.last_elapsed = 0.0
        self.last_ok = 0

    def __call__(self, index: int, body: Any) -> None:
        elapsed, ok, errors = body
        self.ticks[index].append((float(elapsed), int(ok), int(errors)))
        while all(len(ticks) > self.printed for ticks in self.ticks):
            rows = [ticks[self.printed] for ticks in self.ticks]
            elapsed = max(row[0] for row in rows)
            ok = sum(row[1] for row in rows)
            errors = sum(row[2] for row in rows)
            span = elapsed - self.last_elapsed
            rate = (ok - self.last_ok) / span if span > 0 else 0.0
            self.stream.write(format_progress(elapsed, rate, ok, errors) + "\n")
            self.stream.flush()
            self.last_elapsed, self.last_ok = elapsed, ok
            self.printed += 1


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
    size: int = 16,
    processes: int = 1,
    warmup: float = 1.0,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    protocol: str = "v1",
    client: str = "raw",
    connections: int = 1,
    payload: bytes | None = None,
    check_echo: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Load the server at `address` in a closed loop; return the measured results.

    `concurrency` requests are kept in flight by `processes` generator
    processes (at most one per request in flight) for `warmup` + `duration`
    seconds; only the last `duration` seconds are measured.  Each request
    carries `payload` unchanged when given, else `size` random bytes (tagged
    per request when 12 bytes or more).  `protocol` is "v1" (a fresh
    connection per request) or "v2" (`connections` persistent connections per
    process, at most one per request in flight); `client` is "raw" (this
    module's own asyncio code) or "aio" (:mod:`gaspar.aio`).  `timeout`
    bounds each connect and each wait for a reply.  With `check_echo`, a
    reply must equal its request or it counts as a "mismatch"; without, any
    successful reply counts.  With `progress`, a line of running totals goes
    to standard error every second of the measured window.

    Raises ValueError for bad arguments, ConnectionError (an OSError) before
    any load starts when the server cannot be resolved or reached (one
    connection probes it; for v2 it also checks the server's preamble), and
    RuntimeError when a generator process fails.
    """
    if payload is not None:
        size = len(payload)
    if concurrency < 1 or processes < 1 or connections < 1:
        raise ValueError("concurrency, processes and connections must be at least 1")
    if duration <= 0 or warmup < 0 or timeout <= 0 or size < 0:
        raise ValueError("duration and timeout must be positive; warmup and size not negative")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {', '.join(CLIENTS)}, not {client!r}")
    host, port = parse_address(address)
    family, ip = _resolve(host, port)
    _probe(family, ip, port, protocol, timeout)
    shares = _split(concurrency, min(processes, concurrency))
    on_progress = _Progress(len(shares), sys.stderr) if progress else None
    ctx = multiprocessing.get_context("spawn")
    children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        first_id = 0
        for index, coroutines in enumerate(shares):
            plan = _Plan(
                ip,
                port,
                family,
                first_id,
                coroutines,
                size,
                warmup,
                duration,
                timeout,
                protocol=protocol,
                client=client,
                connections=min(connections, coroutines),
                payload=payload,
                check_echo=check_echo,
                progress=progress,
            )
            first_id += coroutines
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_child_main, args=(theirs, plan), name=f"gaspar-bench-{index}", daemon=True
            )
            proc.start()
            theirs.close()
            children.append((proc, ours))
        conns = [conn for _, conn in children]
        _gather(conns, "ready", START_TIMEOUT)
        for conn in conns:
            conn.send("go")
        parts = _gather(
            conns, "result", warmup + duration + DRAIN_GRACE + RESULT_SLACK, on_progress
        )
    except BaseException:  # a process failed, or Ctrl-C: stop the others at once
        for child, _ in children:
            if child.is_alive():
                child.kill()
        raise
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
        "protocol": protocol,
        "client": client,
        "concurrency": concurrency,
        "processes": len(shares),
        # v2: persistent connections over all processes; v1 opens one per request.
        "connections": sum(min(connections, s) for s in shares) if protocol == "v2" else None,
        "size": size,
        "payload": "random" if payload is None else "fixed",
        "check_echo": check_echo,
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


def _error_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n:,}" for kind, n in errors.items() if n) or "none"


def format_summary(result: dict[str, Any]) -> str:
    """One line for a human: throughput, latency, errors and the generator's CPU."""
    lat = result["latency_ms"]
    errors = result["errors"]
    error_text = ", ".join(f"{kind} {n}" for kind, n in errors.items() if n) or "none"
    cpu = result["cpu"]
    conns = f" conns={result['connections']}" if result.get("connections") else ""
    return (
        f"{result['address']} {result.get('protocol', 'v1')} {result.get('client', 'raw')}"
        f" c={result['concurrency']} procs={result['processes']}{conns}"
        f" size={result['size']}B {result['duration']:g}s:"
        f" {result['rps']:.0f} req/s, p50 {_fmt_ms(lat['p50'])} ms,"
        f" p90 {_fmt_ms(lat['p90'])} ms, p99 {_fmt_ms(lat['p99'])} ms,"
        f" errors {result['error_total']} ({error_text}),"
        f" loadgen CPU {cpu['share']:.0%} of a core (busiest process {cpu['busiest_process']:.0%})"
    )


# A generator process using this share of a core or more may be the bottleneck.
_BUSY = 0.9


def format_report(result: dict[str, Any]) -> str:
    """The final summary for a human, on several lines: the run, req/s, latency, errors, CPU."""
    lat = result["latency_ms"]
    conns = result.get("connections")
    processes = result["processes"]
    payload = "fixed" if result.get("payload") == "fixed" else "random"
    lines = [
        f"gaspar bench {result['address']}: protocol {result['protocol']},"
        f" {result['client']} client, concurrency {result['concurrency']},"
        f" {processes} process{'es' if processes > 1 else ''}"
        + (f", {conns} connection{'s' if conns > 1 else ''}" if conns else ""),
        f"  {result['size']:,}-byte {payload} payloads,"
        f" echo check {'on' if result.get('check_echo') else 'off'},"
        f" {result['warmup']:g}s warmup + {result['duration']:g}s measured",
        f"requests/s  {result['rps']:,.0f}  ({result['requests']:,} ok)",
        "latency     "
        + (
            "  ".join(f"{q} {_fmt_ms(lat[q])} ms" for q in ("p50", "p90", "p99", "max"))
            if result["requests"]
            else "- (no request succeeded)"
        ),
    ]
    errors = f"errors      {_error_text(result['errors'])}"
    if result.get("warmup_errors"):
        errors += f"  (and {result['warmup_errors']:,} during the warmup, not counted)"
    lines.append(errors)
    details = sorted(result.get("details", {}).items(), key=lambda item: -item[1])
    lines.extend(f"              {key} ({count:,})" for key, count in details[:5])
    cpu = result["cpu"]
    usage = f"generator   CPU {cpu['share']:.0%} of a core"
    if processes > 1:
        usage += f" over {processes} processes (busiest {cpu['busiest_process']:.0%})"
    if cpu["busiest_process"] >= _BUSY:
        usage += "; near a full core, the generator may be the limit: add --processes"
    lines.append(usage)
    return "\n".join(lines)

"""The asyncio TCP front end: reads requests, writes replies, for v1 and v2.

Every connection starts as a :class:`V1Connection`, the common case, which
looks at the first four bytes once: :data:`gaspar.protocol.MAGIC_V2` hands the
transport over to a :class:`V2Connection` (``transport.set_protocol``), so v1
pays nothing for v2 and each class keeps one protocol's rules.  v1 is one
request, its reply, a close (a reset on failure); v2 is driven by the sans-I/O
:class:`gaspar.protocol.SessionV2`, which holds its rules.  No handler code
runs here: a complete request goes to the dispatcher, and the connection
writes whatever outcome comes back.

Bounds that the server keeps, whatever the client does:

- every write ends within ``write_timeout`` of the client's last progress in
  reading, or in an abort (a reset), which works on a closing transport too;
- a socket closes abortively (SO_LINGER 0, inherited from the listening
  socket) until the server closes it with every reply in the kernel, so a
  producer that dies mid-request resets its clients instead of sending a FIN
  that a v1 client would read as an empty reply (and a v2 client as a clean
  close);
- a v2 connection stops reading while its replies wait to be written
  (transport back-pressure, and the session's own backlog bound);
- at ``max_connections``, idle v2 connections are closed oldest first to
  admit new ones; busy ones keep their slots;
- client errors and refusals are logged throttled, with the client's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import socket
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from .address import format_address
from .dispatcher import Dispatcher, Job
from .logs import ACCESS_FIELDS
from .netutil import LINGER_RESET, reset, set_linger
from .protocol import (
    MAGIC_V2,
    MAGIC_V2_CONTROL,
    Cancel,
    Event,
    LimitExceeded,
    Limits,
    ProtocolError,
    Refused,
    Request,
    RequestReader,
    SessionV2,
    StatsRequest,
    Status,
    Timed,
)

log = logging.getLogger("gaspar.server")
access_log = logging.getLogger("gaspar.access")
ACCESS_LINE = " ".join(f"{name}=%s" for name in ACCESS_FIELDS)

# v1 states; a v2 connection is OPEN or CLOSING, and CLOSED once lost.
READING, WAITING, WRITING, CLOSED = range(4)
OPEN, CLOSING = READING, WRITING
# The outcome counters' keys, computed once rather than per reply.  A request
# that its client cancelled counts once, as "cancelled" (its later reply, if it
# was running, is discarded uncounted).
KEYS: dict[Status, str] = {s: s.name.lower() for s in Status}
# The preambles that open a v2 connection (a v1 length never starts with 0xFF).
PREAMBLES = (MAGIC_V2, MAGIC_V2_CONTROL)
QUEUE_FULL_MESSAGE = b"server queue full"
DEADLINE_MESSAGE = b"deadline passed before the request ran"
CANCELLED_QUEUED_MESSAGE = b"cancelled before it ran"
CANCELLED_RUNNING_MESSAGE = b"cancelled while running: its reply will be discarded"
# How old (seconds) the numbers of a stats reply may be: within it, a stats
# request costs a copy of the last reply, so that a client cannot make the
# loop count and encode them for every eight bytes it sends.
STATS_MAX_AGE = 0.1
# SO_LINGER off: a close is a FIN after the data already written.
_NO_LINGER = struct.pack("ii", 0, 0)


class Throttled:
    """Log a repeated event at most once per `interval`, with its count since the last line."""

    __slots__ = ("count", "interval", "level", "message", "next_at")

    def __init__(self, level: int, message: str, interval: float = 1.0) -> None:
        self.level = level
        self.message = message
        self.interval = interval
        self.count = 0
        self.next_at = 0.0

    def __call__(self, *args: object, extra: dict[str, object] | None = None) -> None:
        self.count += 1
        now = time.monotonic()
        if now >= self.next_at:
            log.log(
                self.level,
                self.message + " (%d since the last report)",
                *args,
                self.count,
                extra=extra,
            )
            self.count = 0
            self.next_at = now + self.interval


def _shown(value: object) -> object:
    """An access log field as the text line shows it: seconds to the microsecond, "-" if none."""
    if value is None:
        return "-"
    return f"{value:.6f}" if isinstance(value, float) else value


class Peer:
    """A connection's client address, formatted only if a log line prints it."""

    __slots__ = ("transport",)

    def __init__(self, transport: asyncio.BaseTransport | None) -> None:
        self.transport = transport

    def __str__(self) -> str:
        try:
            peer = self.transport.get_extra_info("peername") if self.transport else None
        except OSError:
            peer = None
        if not peer:
            return "an unknown client"
        return format_address(peer[0], peer[1])


class Server:
    """Accepts connections and ties each to the dispatcher."""

    def __init__(self, dispatcher: Dispatcher, limits: Limits) -> None:
        self.loop = asyncio.get_running_loop()
        self.dispatcher = dispatcher
        self.limits = limits
        self.connections: set[V1Connection | V2Connection] = set()
        # v2 connections with nothing in flight, longest idle first (an ordered set).
        self.idle: dict[V2Connection, None] = {}
        self._server: asyncio.AbstractServer | None = None
        self._listen_fd = -1
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = 1.0
        self._all_closed: asyncio.Future[None] | None = None
        self.draining = False
        # How requests ended, by protocol and lower-case status name: each counts once.
        self.v1: dict[str, int] = {key: 0 for key in KEYS.values()}
        self.v2: dict[str, int] = {key: 0 for key in KEYS.values()}
        self.bytes_in = 0  # read from clients
        self.bytes_out = 0  # handed to their transports
        # One line per answered request on the logger gaspar.access (off: a flag check).
        self.access_log = False
        # What a stats request is answered with (the producer's stats()).
        self.stats: Callable[[], dict[str, Any]] = dict
        self._stats_reply = b""
        self._stats_at = 0.0
        # v2 connections with replies waiting to be written, all in one go.
        self._unflushed: list[V2Connection] = []
        dispatcher.on_replies = self.flush
        self.queue_full = Throttled(logging.WARNING, "queue full (max_queue=%d): refusing requests")
        self.too_many = Throttled(
            logging.WARNING, "too many connections (max_connections=%d): resetting new ones"
        )
        self.out_of_fds = Throttled(
            logging.ERROR,
            "cannot accept connections: out of file descriptors (ulimit -n %d, "
            "%d connections open, max_connections=%d)",
        )
        # Protocol errors, refusals and slow clients: one line a second at most.
        self.client_error = Throttled(logging.INFO, "client %s: %s")

    async def listen(
        self, host: str, port: int, backlog: int = 1024, sock: socket.socket | None = None
    ) -> tuple[str, int]:
        """Bind and start accepting; return the bound (host, port).

        Given `sock`, a listening socket that this process was handed (systemd's
        socket activation), accept on it instead of binding: host and port are
        not used, and the socket is set up as a bound one would be.
        """
        loop, limits = self.loop, self.limits
        self._sweep_every = max(
            0.01, min(1.0, limits.read_timeout, limits.write_timeout, limits.idle_timeout) / 4
        )
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        if sock is None:
            self._server = await loop.create_server(
                lambda: V1Connection(self), host, port, backlog=backlog, reuse_address=True
            )
        else:
            self._server = await loop.create_server(
                lambda: V1Connection(self), sock=sock, backlog=backlog
            )
        for sock in self._server.sockets:
            # Accepted sockets inherit SO_LINGER 0: a v1 socket resets unless
            # its whole reply was written (see V1Connection), even if we die.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            if hasattr(socket, "TCP_DEFER_ACCEPT"):
                # Wake us for a connection only once its first bytes are in: the
                # accept and the read of a v1 request then cost one loop wake-up.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        self._listen_fd = self._server.sockets[0].fileno()
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    @property
    def requests(self) -> dict[str, int]:
        """How requests ended, by lower-case status name, whatever their protocol."""
        v1, v2 = dict(self.v1), dict(self.v2)  # C calls: safe from another thread
        return {key: v1[key] + v2[key] for key in v1}

    def stats_reply(self) -> bytes:
        """The body of a stats reply: :attr:`stats` as JSON, at most STATS_MAX_AGE old."""
        now = self.loop.time()
        if not self._stats_reply or now - self._stats_at >= STATS_MAX_AGE:
            self._stats_reply = json.dumps(self.stats(), separators=(",", ":")).encode()
            self._stats_at = now
        return self._stats_reply

    def log_access(
        self,
        transport: asyncio.BaseTransport | None,
        protocol: str,
        rid: int,
        size_in: int,
        size_out: int,
        status: Status,
        job: Job | None,
    ) -> None:
        """One access log line: a request ended (or was refused) with `status`."""
        wait = run = worker = None
        if job is not None:
            if job.started:
                wait = round(job.started - job.submitted, 6)
            if job.micros >= 0:
                run = job.micros / 1e6
            if job.worker is not None:
                worker = job.worker.pid
        fields = {
            "client": str(Peer(transport)),
            "protocol": protocol,
            "request_id": rid,
            "bytes_in": size_in if size_in >= 0 else None,
            "bytes_out": size_out,
            "status": KEYS[status],
            "queue_wait": wait,
            "run_time": run,
            "worker": worker,
        }
        shown = (_shown(fields[name]) for name in ACCESS_FIELDS)
        access_log.info(ACCESS_LINE, *shown, extra={"_inline": True, **fields})

    def admit(self, conn: V1Connection) -> bool:
        """Take `conn` if there is room, closing the longest-idle v2 connection if need be."""
        limit = self.limits.max_connections
        if self.draining:
            return False
        if len(self.connections) >= limit:
            if not self.idle:
                self.too_many(limit)
                return False
            oldest = next(iter(self.idle))
            log.debug("max_connections reached: closing the longest-idle v2 connection")
            oldest.close_idle()
        self.connections.add(conn)
        return True

    def _sweep(self) -> None:
        """Drop connections past their deadline; runs every quarter of the shortest timeout."""
        now = self.loop.time()
        for conn in [c for c in self.connections if 0.0 < c.deadline <= now]:
            conn.timed_out()
        self._check_fds()
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def _check_fds(self) -> None:
        """Log (throttled) when the process cannot take one more file descriptor.

        The event loops do not tell us when accept() fails for want of one
        (uvloop says nothing, asyncio pauses accepting): a dup() shows it.
        """
        if self._listen_fd < 0 or self.draining:
            return
        try:
            os.close(os.dup(self._listen_fd))
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                if len(self.connections) < self.limits.max_connections:
                    self.out_of_fds(limit, len(self.connections), self.limits.max_connections)

    def want_flush(self, conn: V2Connection) -> None:
        """`conn` has replies to write: after the dispatcher's pass, or on the loop's next."""
        if not self._unflushed and not self.dispatcher.reading:
            self.loop.call_soon(self.flush)
        self._unflushed.append(conn)

    def flush(self) -> None:
        """Write the replies that v2 connections have gathered."""
        while self._unflushed:
            unflushed, self._unflushed = self._unflushed, []
            for conn in unflushed:
                try:
                    conn.flush()
                except Exception:  # one broken transport must not keep the others' replies
                    log.exception("writing replies failed; dropping the connection")
                    conn.fail()

    def close(self) -> None:
        """Stop the sweep (the loop is about to close)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def stop_accepting(self) -> None:
        """Close the listening socket; take no new requests on open connections."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.drain()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until every connection has closed; False if some were still open."""
        if not self.connections:
            return True
        self._all_closed = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._all_closed, timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def abort_all(self) -> None:
        """Reset every connection still open, closing or not."""
        for conn in list(self.connections):
            conn.fail()

    def forget(self, conn: V1Connection | V2Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)


class _Deadline:
    """What both connection kinds share: a deadline that the server's sweep checks."""

    # deadline: loop time at which timer_kind expires; 0: none
    __slots__ = ("deadline", "server", "timer_kind", "transport")

    server: Server
    transport: asyncio.Transport | None
    deadline: float
    timer_kind: str

    def _set_timer(self, kind: str, delay: float) -> None:
        # A deadline, checked by the server's sweep: cheaper than a timer each.
        self.timer_kind = kind
        self.deadline = self.server.loop.time() + delay

    def _cancel_timer(self) -> None:
        self.deadline = 0.0
        self.timer_kind = ""

    def client_error(self, message: object, rid: int | None = None) -> None:
        """Log a client's fault, throttled, with its address (and the request's id)."""
        peer = Peer(self.transport)
        extra: dict[str, object] = {"client": peer}
        if rid is not None:
            extra["request_id"] = rid
        self.server.client_error(peer, message, extra=extra)


class V1Connection(_Deadline, asyncio.Protocol):
    """One v1 connection: one request, its reply, a close; or the first bytes of a v2 one."""

    __slots__ = ("head", "job", "reader", "size", "state")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.state = READING
        self.reader = RequestReader(server.limits.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.job: Job | None = None
        self.head = b""  # first bytes, while fewer than four have come
        self.size = -1  # the payload's size, kept for the access log only
        self.deadline = 0.0
        self.timer_kind = ""

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        if not self.server.admit(self):
            self.state = CLOSED
            reset(transport)
            return
        self._set_timer("read", self.server.limits.read_timeout)

    def data_received(self, data: bytes) -> None:
        if self.state != READING:
            if self.state == WAITING:
                self.client_error("bytes after a complete v1 request; dropping the connection")
                self.fail()
            return
        reader = self.reader
        if not reader.started:  # the first bytes: v1 or v2?
            if self.head or len(data) < 4:
                data = self.head + data
                if len(data) < 4:
                    self.head = data
                    return
                self.head = b""
            if data[0] == 0xFF and data[:4] in PREAMBLES:
                self._become_v2(data)
                return
        server = self.server
        server.bytes_in += len(data)
        try:
            payload = reader.feed(data)
        except LimitExceeded as exc:
            self.client_error(f"refused: {exc}")
            server.v1["too_large"] += 1
            if server.access_log:
                server.log_access(self.transport, "v1", 0, exc.size, 0, Status.TOO_LARGE, None)
            self.fail()
            return
        except ProtocolError as exc:
            self.client_error(f"protocol error: {exc}")
            self.fail()
            return
        if payload is not None:
            self._request(payload)
        elif reader.buffer() is not None:
            # A large payload now has a buffer of its size: read the rest into it.
            assert self.transport is not None
            self.transport.set_protocol(BodyReader(self))

    def body_received(self, nbytes: int) -> None:
        """`nbytes` more of a large payload were read into the reader's buffer."""
        self.server.bytes_in += nbytes
        payload = self.reader.advance(nbytes)
        if payload is not None:
            assert self.transport is not None
            self.transport.set_protocol(self)  # later bytes or an EOF are ours to judge
            self._request(payload)

    def eof_received(self) -> bool:
        if self.state in (WAITING, WRITING):
            return True  # a half-close after a complete request: the reply can still go
        if self.state == READING and (self.reader.started or self.head):
            self.client_error("closed mid-request")
        self.fail()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._cancel_job()
        self.state = CLOSED
        self.server.forget(self)

    def resume_writing(self) -> None:
        # Only asked for once the reply is written (see _outcome): it is all in
        # the kernel now, so a close may send a FIN after it.
        transport = self.transport
        if (
            self.state == WRITING
            and transport is not None
            and not transport.get_write_buffer_size()
        ):
            self._close_after_reply(transport)

    # -- control -----------------------------------------------------------------

    def fail(self) -> None:
        """End this connection with a reset, whatever it was doing."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._cancel_timer()
        self._cancel_job()
        assert self.transport is not None
        reset(self.transport)

    def drain(self) -> None:
        """The server is stopping: a request still arriving is dropped; one received finishes."""
        if self.state == READING:
            self.fail()

    def timed_out(self) -> None:
        kind = self.timer_kind
        self._cancel_timer()
        self.client_error(f"too slow ({kind} timeout); dropping the connection")
        self.fail()

    # -- the request -------------------------------------------------------------

    def _request(self, payload: bytes | bytearray) -> None:
        self._cancel_timer()
        self.state = WAITING
        server = self.server
        if server.access_log:
            self.size = len(payload)
        self.job = server.dispatcher.submit(payload, self._outcome)
        if self.job is None:
            server.queue_full(server.dispatcher.max_queue)
            server.v1["overloaded"] += 1
            if server.access_log:
                server.log_access(self.transport, "v1", 0, self.size, 0, Status.OVERLOADED, None)
            self.fail()

    def _outcome(self, status: Status, data: bytes | memoryview) -> None:
        job, self.job = self.job, None
        server = self.server
        server.v1[KEYS[status]] += 1
        if server.access_log:
            sent = len(data) if status is Status.OK and self.state == WAITING else 0
            server.log_access(self.transport, "v1", 0, self.size, sent, status, job)
        if self.state != WAITING:
            return
        if status is not Status.OK:
            self.fail()
            return
        transport = self.transport
        assert transport is not None
        self.state = WRITING
        server.bytes_out += len(data)
        transport.write(data)
        if not transport.get_write_buffer_size():
            self._close_after_reply(transport)
            return
        # The rest of the reply waits in the transport: hear when it has all
        # gone to the kernel (resume_writing at an empty buffer), and give the
        # client write_timeout to take it.  Nothing more is read meanwhile.
        transport.pause_reading()
        transport.set_write_buffer_limits(high=0)
        self._set_timer("write", self.server.limits.write_timeout)

    def _close_after_reply(self, transport: asyncio.Transport) -> None:
        # The whole reply is in the kernel: from here a close is a FIN after it.
        set_linger(transport, _NO_LINGER)
        self._cancel_timer()
        self.state = CLOSED
        transport.close()

    def _become_v2(self, data: bytes) -> None:
        """The preamble: a V2Connection takes this transport over, once."""
        transport = self.transport
        assert transport is not None
        self._cancel_timer()
        self.state = CLOSED  # this object is done; the new one is in its place
        server = self.server
        server.connections.discard(self)
        conn = V2Connection(server, transport)
        server.connections.add(conn)
        transport.set_protocol(conn)
        conn.data_received(data)

    def _cancel_job(self) -> None:
        if self.job is not None:
            self.server.dispatcher.cancel(self.job)
            self.job = None


class V2Connection(_Deadline, asyncio.Protocol):
    """One v2 connection: the asyncio side of a :class:`gaspar.protocol.SessionV2`."""

    __slots__ = (
        "flushing",
        "jobs",
        "paused",
        "session",
        "sizes",
        "state",
        "timers",
        "write_paused",
    )

    def __init__(self, server: Server, transport: asyncio.Transport) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = transport
        self.session = SessionV2(server.limits.max_message_size, server.limits.max_pipeline)
        # Requests in flight, by id: the session's own table, whose values are
        # our jobs (None for an id whose reply is being queued).
        self.jobs: dict[int, Job | None] = self.session.in_flight
        # Deadlines of the queued requests that carry one, by id (loop timers).
        self.timers: dict[int, asyncio.TimerHandle] = {}
        # Payload sizes of the requests in flight, by id: kept for the access log only.
        self.sizes: dict[int, int] = {}
        self.state = OPEN
        self.paused = False  # we stopped reading (back-pressure, backlog, or stopping)
        self.flushing = False  # the server will call flush()
        self.write_paused = False  # the transport asked us to stop writing
        self.deadline = 0.0
        self.timer_kind = ""

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # made by V1Connection, which hands the transport over

    def data_received(self, data: bytes) -> None:
        if self.state != OPEN or self.session.stopped:
            return
        self.server.bytes_in += len(data)
        try:
            events = self.session.receive_data(data)
        except ProtocolError as exc:
            self.client_error(f"protocol error: {exc}; resetting the connection")
            self.fail()
            return
        self._handle(events)
        self._after_read()

    def eof_received(self) -> bool:
        self.session.receive_eof()
        self._maybe_close()
        return True  # keep the transport: replies still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._cancel_jobs()
        self.state = CLOSED
        self.server.idle.pop(self, None)
        self.server.forget(self)

    def pause_writing(self) -> None:
        # The client is not taking its replies: stop taking its requests, and
        # give it write_timeout to make progress.
        self.write_paused = True
        if self.state == OPEN:
            self._pause()
            self._timers()

    def resume_writing(self) -> None:
        self.write_paused = False
        transport = self.transport
        if self.state == OPEN:
            self._timers()
            self._maybe_resume()
        elif self.state == CLOSING and transport and not transport.get_write_buffer_size():
            # Every reply is in the kernel: the close may be a FIN after them.
            set_linger(transport, _NO_LINGER)

    # -- control -----------------------------------------------------------------

    def fail(self) -> None:
        """End this connection with a reset, whatever it was doing (closing included)."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._cancel_timer()
        self._cancel_jobs()
        self.server.idle.pop(self, None)
        assert self.transport is not None
        reset(self.transport)

    def drain(self) -> None:
        """The server is stopping: answer what is in flight, refuse what is parsed, then close."""
        if self.state != OPEN:
            return
        self.session.stop()
        self._pause()
        self._maybe_close()

    def close_idle(self) -> None:
        """Close with a FIN: idle too long, or its slot is wanted (nothing is in flight)."""
        if self.state != OPEN:
            return
        self.session.stop()
        self._close()

    def timed_out(self) -> None:
        kind = self.timer_kind
        self._cancel_timer()
        if kind == "idle":
            log.debug("idle v2 connection closed")
            self.close_idle()
            return
        self.client_error(f"too slow ({kind} timeout); dropping the connection")
        self.fail()

    def flush(self) -> None:
        """Write the replies gathered since the last write, then read on if we may."""
        self.flushing = False
        session = self.session
        size = session.unsent  # the bytes of what data_to_send() hands over
        out = session.data_to_send()
        transport = self.transport
        if transport is None or self.state == CLOSED:
            return
        # A transport already closing (a reset not yet reported) takes no more.
        if out and not transport.is_closing():
            self.server.bytes_out += size
            transport.writelines(out)
        if self.state == OPEN:
            self._maybe_resume()

    # -- requests and replies ----------------------------------------------------

    def _handle(self, events: list[Event]) -> None:
        server = self.server
        dispatcher, jobs = server.dispatcher, self.jobs
        for event in events:
            if not isinstance(event, Request):
                self._control(event)
                continue
            rid = event.id
            if server.access_log:
                self.sizes[rid] = len(event.payload)
            job = dispatcher.submit(event.payload, partial(self._outcome, rid))
            if job is None:
                server.queue_full(dispatcher.max_queue)
                self._reply(rid, Status.OVERLOADED, QUEUE_FULL_MESSAGE)
            else:
                jobs[rid] = job
        if self.session.unsent:
            self._want_flush()  # our preamble, refusals

    def _control(self, event: Timed | Cancel | Refused | StatsRequest) -> None:
        """The events other than a plain request: refusals, deadlines, cancels, stats."""
        if isinstance(event, StatsRequest):
            self.session.reply(event.id, Status.OK, self.server.stats_reply())
            self._want_flush()
        elif isinstance(event, Refused):
            server = self.server
            server.v2[KEYS[event.status]] += 1
            self.client_error(f"refused request {event.id}: {event.message}", event.id)
            if server.access_log:
                server.log_access(self.transport, "v2", event.id, -1, 0, event.status, None)
        elif isinstance(event, Timed):
            self._timed(event)
        else:
            self._cancel(event.id)

    def _timed(self, event: Timed) -> None:
        """A request with a deadline: queued past it, it fails with TIMEOUT, never run.

        A loop timer per such request (call_at), not the server's sweep: the
        sweep runs every quarter second, which would let a 1 s deadline start
        a job a quarter late.  Only a request that found no idle worker gets a
        timer, and its reply cancels it.
        """
        server, rid = self.server, event.id
        if server.access_log:
            self.sizes[rid] = len(event.payload)
        if event.deadline_ms == 0:
            self._reply(rid, Status.TIMEOUT, DEADLINE_MESSAGE)
            return
        dispatcher = server.dispatcher
        job = dispatcher.submit(event.payload, partial(self._timed_outcome, rid))
        if job is None:
            server.queue_full(dispatcher.max_queue)
            self._reply(rid, Status.OVERLOADED, QUEUE_FULL_MESSAGE)
            return
        self.jobs[rid] = job
        if job.worker is None:
            job.deadline = job.submitted + event.deadline_ms / 1000
            loop = server.loop
            at = loop.time() + event.deadline_ms / 1000
            self.timers[rid] = loop.call_at(at, self._expire, rid, job)

    def _timed_outcome(self, rid: int, status: Status, data: bytes | memoryview) -> None:
        timer = self.timers.pop(rid, None)
        if timer is not None:
            timer.cancel()
        self._outcome(rid, status, data)

    def _expire(self, rid: int, job: Job) -> None:
        """A request's deadline passed: fail it with TIMEOUT if no worker has it yet."""
        self.timers.pop(rid, None)
        if self.state != OPEN or self.jobs.get(rid) is not job or job.worker is not None:
            return  # answered, cancelled, or started: a started job runs on
        del self.jobs[rid]
        self.server.dispatcher.cancel(job)
        self._reply(rid, Status.TIMEOUT, DEADLINE_MESSAGE, job)
        self._ended()

    def _cancel(self, rid: int) -> None:
        """The client cancelled `rid`: drop it if queued, discard its reply if running.

        Either way the acknowledgment (CANCELLED) is its one reply, sent now:
        from the client's receiving it, the id is free.
        """
        job = self.jobs.pop(rid, None)
        if job is None:
            return  # refused in the same read: its reply is queued already
        timer = self.timers.pop(rid, None)
        if timer is not None:
            timer.cancel()
        running = job.worker is not None
        self.server.dispatcher.cancel(job)
        message = CANCELLED_RUNNING_MESSAGE if running else CANCELLED_QUEUED_MESSAGE
        self._reply(rid, Status.CANCELLED, message, job)
        self._ended()

    def _outcome(self, rid: int, status: Status, data: bytes | memoryview) -> None:
        job = self.jobs.pop(rid, None)
        if self.state != OPEN:
            if self.server.access_log:
                self._access(rid, status, 0, job)
            return
        self._reply(rid, status, data, job)
        self._ended()

    def _ended(self) -> None:
        """A request was answered: close if that was the last, or set the idle timer."""
        if self.session.finished:
            self._maybe_close()
        elif not self.jobs:
            self._timers()

    def _reply(
        self, rid: int, status: Status, body: bytes | memoryview, job: Job | None = None
    ) -> None:
        # Replies that end together (a worker's batch, or refusals) leave in
        # one write: a system call per reply costs more than the wait.
        server = self.server
        server.v2[KEYS[status]] += 1
        if server.access_log:
            self._access(rid, status, len(body), job)
        self.session.reply(rid, status, body)
        self._want_flush()

    def _access(self, rid: int, status: Status, size_out: int, job: Job | None) -> None:
        size_in = self.sizes.pop(rid, -1)
        self.server.log_access(self.transport, "v2", rid, size_in, size_out, status, job)

    def _want_flush(self) -> None:
        if not self.flushing:
            self.flushing = True
            self.server.want_flush(self)

    # -- reading, pausing, closing -----------------------------------------------

    def _after_read(self) -> None:
        session = self.session
        if session.backlogged:
            self._pause()  # parsing waits for the replies to go out: so does reading
        if session.finished:
            self._maybe_close()
        else:
            self._timers(progress=True)

    def _pause(self) -> None:
        if not self.paused and self.state == OPEN:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        """Read on once replies are written and the transport takes more."""
        session = self.session
        if self.write_paused or session.backlogged or session.stopped:
            return
        if session.held:  # frames already read wait behind the backlog: parse them now
            try:
                events = session.receive_data(b"")
            except ProtocolError as exc:
                self.client_error(f"protocol error: {exc}; resetting the connection")
                self.fail()
                return
            self._handle(events)
            self._after_read()
            if session.backlogged or self.state != OPEN:
                return
        if self.paused and not session.eof:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def _maybe_close(self) -> None:
        if self.state == OPEN and self.session.finished:
            self._close()

    def _close(self) -> None:
        """Write what is queued and close: a FIN once every reply is in the kernel.

        Until then the socket stays abortive (SO_LINGER 0, as every accepted
        socket starts): if we die first, the client sees a reset, never an
        end of stream that would pass for a clean close.  Bounded by
        write_timeout.
        """
        self.server.idle.pop(self, None)
        transport = self.transport
        assert transport is not None
        size = self.session.unsent
        out = self.session.data_to_send()
        if out and not transport.is_closing():
            self.server.bytes_out += size
            transport.writelines(out)
        self.state = CLOSING
        self._cancel_timer()
        if transport.get_write_buffer_size():
            # Hear (resume_writing) when the last byte has gone to the kernel.
            transport.set_write_buffer_limits(high=0)
            self._set_timer("write", self.server.limits.write_timeout)
        else:
            set_linger(transport, _NO_LINGER)
        transport.close()

    def _timers(self, progress: bool = False) -> None:
        """Which deadline applies: write, frame, none (jobs in flight) or idle."""
        limits = self.server.limits
        kind = self.timer_kind
        if self.write_paused:
            if kind != "write":
                self._set_timer("write", limits.write_timeout)
        elif self.session.in_frame and not self.session.held:
            if kind != "frame" or progress:
                self._set_timer("frame", limits.read_timeout)
        elif self.jobs or self.session.held:
            if kind:
                self._cancel_timer()
        elif kind != "idle":
            self._set_timer("idle", limits.idle_timeout)
            self.server.idle[self] = None
            return
        else:
            return
        if kind == "idle":
            self.server.idle.pop(self, None)

    def _cancel_jobs(self) -> None:
        if self.timers:
            for timer in self.timers.values():
                timer.cancel()
            self.timers.clear()
        if self.jobs:
            dispatcher = self.server.dispatcher
            jobs = list(self.jobs.values())
            self.jobs.clear()
            for job in jobs:
                if job is not None:
                    dispatcher.cancel(job)


class BodyReader(asyncio.BufferedProtocol):
    """Stands in for a V1Connection while the rest of a large payload is read.

    The transport reads straight into the payload's buffer, with no copy per
    chunk and no join at the end; everything else goes to the connection.
    """

    __slots__ = ("conn",)

    def __init__(self, conn: V1Connection) -> None:
        self.conn = conn

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self.conn.reader.buffer()
        assert buf is not None
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.body_received(nbytes)

    def eof_received(self) -> bool:
        return self.conn.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()

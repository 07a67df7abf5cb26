"""The asyncio TCP front end: reads requests, writes replies, for v1 and v2.

Each connection is parsed by :class:`gaspar.protocol.ServerReader`, which
decides from the first four bytes whether it speaks v1 (one request, the reply,
close; a reset on failure) or v2 (a preamble, then many framed requests with
ids, answered in completion order with a status each).  No handler code runs
here: a complete request goes to the dispatcher, and the connection writes
whatever outcome comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from functools import partial
from typing import cast

from .dispatcher import Dispatcher, Job
from .netutil import reset
from .protocol import (
    MAGIC_V2,
    REPLY_V2,
    SPLIT_WRITE,
    LimitExceeded,
    Limits,
    ProtocolError,
    Refused,
    Request,
    ServerReader,
    Status,
    pack_reply_v2,
)

log = logging.getLogger("gaspar.server")

READING, WAITING, WRITING, CLOSED = range(4)


class Throttled:
    """Log a repeated event at most once per `interval`, with its count since the last line."""

    __slots__ = ("count", "interval", "level", "message", "next_at")

    def __init__(self, level: int, message: str, interval: float = 1.0) -> None:
        self.level = level
        self.message = message
        self.interval = interval
        self.count = 0
        self.next_at = 0.0

    def __call__(self, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now >= self.next_at:
            log.log(self.level, self.message + " (%d since the last report)", *args, self.count)
            self.count = 0
            self.next_at = now + self.interval


class Server:
    """Accepts connections and ties each to the dispatcher."""

    def __init__(self, dispatcher: Dispatcher, limits: Limits) -> None:
        self.loop = asyncio.get_running_loop()
        self.dispatcher = dispatcher
        self.limits = limits
        self.connections: set[Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = 1.0
        self._all_closed: asyncio.Future[None] | None = None
        self.draining = False
        # How requests ended, by lower-case status name: every request counts once.
        self.requests: dict[str, int] = {status.name.lower(): 0 for status in Status}
        # v2 connections with replies waiting to be written, all in one go.
        self._unflushed: list[Connection] = []
        dispatcher.on_replies = self.flush
        self.queue_full = Throttled(logging.WARNING, "queue full (max_queue=%d): refusing requests")
        self.too_many = Throttled(
            logging.WARNING, "too many connections (max_connections=%d): resetting new ones"
        )

    async def listen(self, host: str, port: int, backlog: int = 1024) -> tuple[str, int]:
        """Bind and start accepting; return the bound (host, port)."""
        loop, limits = self.loop, self.limits
        self._sweep_every = max(
            0.01, min(1.0, limits.read_timeout, limits.write_timeout, limits.idle_timeout) / 4
        )
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        self._server = await loop.create_server(
            lambda: Connection(self), host, port, backlog=backlog, reuse_address=True
        )
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            # Wake us for a connection only once its first bytes are in: the
            # accept and the read of a v1 request then cost one loop wake-up.
            for sock in self._server.sockets:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    def _sweep(self) -> None:
        """Drop connections past their deadline; runs every quarter of the shortest timeout."""
        now = self.loop.time()
        for conn in [c for c in self.connections if 0.0 < c.deadline <= now]:
            conn._timed_out()
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def want_flush(self, conn: Connection) -> None:
        """`conn` has replies to write: after the dispatcher's pass, or on the loop's next."""
        if not self._unflushed and not self.dispatcher.reading:
            self.loop.call_soon(self.flush)
        self._unflushed.append(conn)

    def flush(self) -> None:
        """Write the replies that v2 connections have gathered."""
        if self._unflushed:
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
        """Reset every connection still open."""
        for conn in list(self.connections):
            conn.fail()

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)


class Connection(asyncio.Protocol):
    """One client connection, v1 or v2 as its first bytes decide."""

    __slots__ = (
        "closing",
        "greeted",
        "job",
        "jobs",
        "outbox",
        "reader",
        "server",
        "state",
        "deadline",
        "timer_kind",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.state = READING
        self.reader = ServerReader(server.limits.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.job: Job | None = None  # v1: the one request
        self.jobs: dict[int, Job] = {}  # v2: requests in flight, by id
        self.closing = False  # v2: answer what is in flight, then close
        self.greeted = False  # v2: our preamble is sent
        self.outbox: list[bytes | memoryview] = []  # v2: replies for the next write
        self.deadline = 0.0  # loop time at which timer_kind expires; 0: none
        self.timer_kind = ""

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        server = self.server
        if server.draining or len(server.connections) >= server.limits.max_connections:
            if not server.draining:
                server.too_many(server.limits.max_connections)
            self.state = CLOSED
            reset(transport)
            return
        server.connections.add(self)
        self._set_timer("read", server.limits.read_timeout)

    def data_received(self, data: bytes) -> None:
        if self.state != READING:
            if self.state == WAITING:
                log.info("bytes after a complete v1 request; dropping the connection")
                self.fail()
            return
        reader = self.reader
        try:
            events = reader.feed(data)
        except LimitExceeded as exc:
            log.info("refused: %s", exc)
            if reader.version != 2:
                self.server.requests["too_large"] += 1
            self.fail()
            return
        except ProtocolError as exc:
            log.info("protocol error: %s", exc)
            self.fail()
            return
        if reader.version == 2:
            self._v2_received(events)
        elif events:
            self._v1_received(events)
        elif reader.buffer() is not None:
            # A large v1 payload now has a buffer of its size: read the rest into it.
            assert self.transport is not None
            self.transport.set_protocol(BodyReader(self))

    def body_received(self, nbytes: int) -> None:
        """`nbytes` more of a large v1 payload were read into the reader's buffer."""
        events = self.reader.advance(nbytes)
        if events:
            assert self.transport is not None
            self.transport.set_protocol(self)  # later bytes or an EOF are ours to judge
            self._v1_received(events)

    def eof_received(self) -> bool:
        if self.reader.version == 2:
            self.closing = True
            self._v2_maybe_close()
            return True
        if self.state == WAITING:
            return True  # a half-close after a complete v1 request: the reply can still go
        if self.state == READING and self.reader.in_frame:
            log.info("client closed mid-request")
        self.fail()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._cancel_jobs()
        self.state = CLOSED
        self.server.forget(self)

    def pause_writing(self) -> None:
        # The client is not taking its replies: stop taking its requests.
        if self.transport is not None and self.state != CLOSED:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.state == READING and not self.closing:
            self.transport.resume_reading()

    # -- control -----------------------------------------------------------------

    def fail(self) -> None:
        """End this connection with a reset."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._cancel_timer()
        self._cancel_jobs()
        assert self.transport is not None
        reset(self.transport)

    def drain(self) -> None:
        """The server is stopping: finish what this connection has started, take nothing new."""
        if self.state == CLOSED:
            return
        if self.reader.version == 2:
            self.closing = True
            assert self.transport is not None
            self.transport.pause_reading()
            self._v2_maybe_close()
        elif self.state == READING:
            self.fail()

    # -- v1 ----------------------------------------------------------------------

    def _v1_received(self, events: list[Request | Refused]) -> None:
        (request,) = events
        assert isinstance(request, Request)
        self._v1_request(request.payload)

    def _v1_request(self, payload: bytes | bytearray) -> None:
        self._cancel_timer()
        self.state = WAITING
        self.job = self.server.dispatcher.submit(payload, self._v1_outcome)
        if self.job is None:
            self.server.queue_full(self.server.dispatcher.max_queue)
            self.server.requests["overloaded"] += 1
            self.fail()

    def _v1_outcome(self, status: Status, data: bytes | memoryview) -> None:
        self.job = None
        self.server.requests[status.name.lower()] += 1
        if self.state != WAITING:
            return
        if status is not Status.OK:
            self.fail()
            return
        transport = self.transport
        assert transport is not None
        self.state = WRITING
        transport.write(data)
        transport.close()
        if transport.get_write_buffer_size():
            self._set_timer("write", self.server.limits.write_timeout)

    # -- v2 ----------------------------------------------------------------------

    def _v2_received(self, events: list[Request | Refused]) -> None:
        assert self.transport is not None
        if not self.greeted:
            self.greeted = True
            self.transport.write(MAGIC_V2)
            self._cancel_timer()  # the v1 whole-request deadline no longer applies
        server, dispatcher = self.server, self.server.dispatcher
        for event in events:
            if self.state == CLOSED:
                return
            rid = event.id
            if isinstance(event, Refused):
                self._v2_reply(rid, event.status, event.message.encode())
            elif rid in self.jobs:
                self._v2_reply(rid, Status.BAD_REQUEST, b"request id already in flight")
            elif self.closing or server.draining:
                self._v2_reply(rid, Status.SHUTTING_DOWN, b"server stopping")
            elif len(self.jobs) >= server.limits.max_pipeline:
                self._v2_reply(rid, Status.OVERLOADED, b"too many requests in flight")
            else:
                job = dispatcher.submit(event.payload, partial(self._v2_outcome, rid))
                if job is None:
                    server.queue_full(dispatcher.max_queue)
                    self._v2_reply(rid, Status.OVERLOADED, b"server queue full")
                else:
                    self.jobs[rid] = job
        self._v2_timers(progress=bool(events))

    def _v2_outcome(self, rid: int, status: Status, data: bytes | memoryview) -> None:
        self.jobs.pop(rid, None)
        if self.state == CLOSED:
            return
        self._v2_reply(rid, status, data)
        if self.closing:
            self._v2_maybe_close()
        else:
            self._v2_timers()

    def _v2_reply(self, rid: int, status: Status, body: bytes | memoryview) -> None:
        # Replies that end together (a worker's batch, or refusals) leave in
        # one write: a system call per reply costs more than the wait.
        self.server.requests[status.name.lower()] += 1
        outbox = self.outbox
        if not outbox:
            self.server.want_flush(self)
        if len(body) >= SPLIT_WRITE:
            outbox.append(REPLY_V2.pack(rid, status, len(body)))
            outbox.append(body)
        else:
            outbox.append(pack_reply_v2(rid, status, body))

    def flush(self) -> None:
        """Write the v2 replies gathered since the last write."""
        outbox, self.outbox = self.outbox, []
        transport = self.transport
        if transport is None or self.state == CLOSED:
            return
        # A transport already closing (a reset not yet reported) takes no more.
        if outbox and not transport.is_closing():
            transport.writelines(outbox)

    def _v2_maybe_close(self) -> None:
        if self.jobs or self.state == CLOSED:
            return
        assert self.transport is not None
        self.flush()
        self.state = WRITING
        self._cancel_timer()
        self.transport.close()
        if self.transport.get_write_buffer_size():
            self._set_timer("write", self.server.limits.write_timeout)

    def _v2_timers(self, progress: bool = False) -> None:
        """A frame must arrive whole within read_timeout; an idle connection times out."""
        limits = self.server.limits
        if self.reader.in_frame:
            if self.timer_kind != "frame" or progress:
                self._set_timer("frame", limits.read_timeout)
        elif self.jobs:
            self._cancel_timer()
        elif self.timer_kind != "idle":
            self._set_timer("idle", limits.idle_timeout)

    # -- helpers -----------------------------------------------------------------

    def _set_timer(self, kind: str, delay: float) -> None:
        # A deadline, checked by the server's sweep: cheaper than a timer each.
        self.timer_kind = kind
        self.deadline = self.server.loop.time() + delay

    def _cancel_timer(self) -> None:
        self.deadline = 0.0
        self.timer_kind = ""

    def _timed_out(self) -> None:
        kind = self.timer_kind
        self._cancel_timer()
        if kind == "idle":
            log.debug("idle v2 connection closed")
            assert self.transport is not None
            self.state = CLOSED
            self.transport.close()
            return
        log.info("client too slow (%s timeout); dropping the connection", kind)
        self.fail()

    def _cancel_jobs(self) -> None:
        dispatcher = self.server.dispatcher
        if self.job is not None:
            dispatcher.cancel(self.job)
            self.job = None
        if self.jobs:
            jobs, self.jobs = self.jobs, {}
            for job in jobs.values():
                dispatcher.cancel(job)


class BodyReader(asyncio.BufferedProtocol):
    """Stands in for a Connection while the rest of a large v1 payload is read.

    The transport reads straight into the payload's buffer, with no copy per
    chunk and no join at the end; everything else goes to the connection.
    """

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
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

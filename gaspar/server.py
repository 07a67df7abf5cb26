"""The asyncio TCP front end: reads v1 requests, writes replies.

Each connection is a small state machine (reading, waiting, writing) driven
by :class:`gaspar.protocol.RequestReader`.  No handler code runs here: a
complete request goes to the dispatcher and the connection waits for its
outcome.  A failed request ends with a reset (RST), so a v1 client reading to
EOF sees an error instead of an empty reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from typing import cast

from .dispatcher import Dispatcher, Job, Outcome
from .protocol import LimitExceeded, ProtocolError, RequestReader

log = logging.getLogger("gaspar.server")

_LINGER_RESET = struct.pack("ii", 1, 0)

READING, WAITING, WRITING, CLOSED = range(4)


def reset(transport: asyncio.Transport) -> None:
    """Close abortively: SO_LINGER 0 turns the close into a TCP RST."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


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


class Limits:
    """Per-connection bounds that the server enforces."""

    __slots__ = ("max_connections", "max_message_size", "read_timeout", "write_timeout")

    def __init__(
        self,
        max_message_size: int,
        max_connections: int,
        read_timeout: float,
        write_timeout: float,
    ) -> None:
        self.max_message_size = max_message_size
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout


class Server:
    """Accepts connections and ties each to the dispatcher."""

    def __init__(self, dispatcher: Dispatcher, limits: Limits) -> None:
        self.dispatcher = dispatcher
        self.limits = limits
        self.connections: set[V1Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._all_closed: asyncio.Future[None] | None = None
        self.draining = False
        self.queue_full = Throttled(logging.WARNING, "queue full (max_queue=%d): refusing requests")
        self.too_many = Throttled(
            logging.WARNING, "too many connections (max_connections=%d): resetting new ones"
        )

    async def listen(self, host: str, port: int, backlog: int = 1024) -> tuple[str, int]:
        """Bind and start accepting; return the bound (host, port)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: V1Connection(self), host, port, backlog=backlog, reuse_address=True
        )
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    def stop_accepting(self) -> None:
        """Close the listening socket and drop connections with no complete request."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.state == READING:
                conn.fail()

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

    def forget(self, conn: V1Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)


class V1Connection(asyncio.Protocol):
    """One v1 connection: one request in, one reply (or a reset) out."""

    __slots__ = ("job", "reader", "server", "state", "timer", "transport")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.state = READING
        self.reader = RequestReader(server.limits.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.job: Job | None = None
        self.timer: asyncio.TimerHandle | None = None

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
        self.timer = asyncio.get_running_loop().call_later(
            server.limits.read_timeout, self._timed_out
        )

    def data_received(self, data: bytes) -> None:
        if self.state != READING:
            if self.state == WAITING:
                log.info("bytes after a complete v1 request; dropping the connection")
                self.fail()
            return
        try:
            payload = self.reader.feed(data)
        except LimitExceeded as exc:
            log.info("refused: %s", exc)
            self.fail()
            return
        except ProtocolError as exc:
            log.info("protocol error: %s", exc)
            self.fail()
            return
        if payload is None:
            return
        self._cancel_timer()
        self.state = WAITING
        self.job = self.server.dispatcher.submit(payload, self._on_outcome)
        if self.job is None:
            self.server.queue_full(self.server.dispatcher.max_queue)
            self.fail()

    def eof_received(self) -> bool:
        if self.state == WAITING:
            return True  # a half-close after a complete request: keep the reply path open
        if self.state == READING and self.reader.started:
            log.info("client closed mid-request")
        self.fail()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self.job is not None:
            self.server.dispatcher.cancel(self.job)
            self.job = None
        self.state = CLOSED
        self.server.forget(self)

    def fail(self) -> None:
        """End this connection with a reset."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._cancel_timer()
        if self.job is not None:
            self.server.dispatcher.cancel(self.job)
            self.job = None
        assert self.transport is not None
        reset(self.transport)

    def _on_outcome(self, outcome: Outcome, data: bytes) -> None:
        self.job = None
        if self.state != WAITING:
            return
        if outcome is not Outcome.OK:
            self.fail()
            return
        transport = self.transport
        assert transport is not None
        self.state = WRITING
        transport.write(data)
        transport.close()
        if transport.get_write_buffer_size():
            self.timer = asyncio.get_running_loop().call_later(
                self.server.limits.write_timeout, self._timed_out
            )

    def _timed_out(self) -> None:
        self.timer = None
        log.info("client too slow; dropping the connection")
        self.fail()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

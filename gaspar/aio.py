"""The asyncio client: a thin driver over :mod:`gaspar.clientcore`.

- :func:`request` sends one request over a fresh connection (v1 by default,
  like :func:`gaspar.client.request`).
- :class:`AsyncClient` multiplexes many concurrent requests over a few
  persistent v2 connections: requests are pipelined, replies are matched by
  id and may come back in any order.

Each request carries its timeout as a deadline, so that the server fails it
with TIMEOUT, unrun, if no worker has taken it by then.  Cancelling the task
that awaits a request, or its timeout, ends that request: a one-shot
connection is closed; on a shared connection a cancel frame tells the server
to drop it (or to discard its reply if it runs), and its id stays reserved
until the server's one reply for it arrives and is dropped, so it can never be
delivered to another caller.  docs/protocol.md, "Control frames", has the rules.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from types import TracebackType
from typing import Any, cast

from . import netutil
from .address import format_address, parse_address
from .callcodec import decode_result, encode_call
from .clientcore import (
    DEFAULT_MAX_REPLY_SIZE,
    ClientSession,
    Message,
    V1Exchange,
    as_request_failed,
    check_protocol,
    failure,
)
from .errors import ConnectionFailed, RequestFailed, RequestTimeout
from .protocol import ProtocolError, Status, to_bytes

__all__ = ["AsyncClient", "request"]


def pending_error(transport: asyncio.BaseTransport) -> int:
    """The socket's pending error (SO_ERROR) at the end of a stream; 0 if none or unknown."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    except OSError:
        return 0


async def request(
    address: str | tuple[str, int],
    message: Message,
    timeout: float | None = None,
    *,
    protocol: str = "v1",
    max_reply_size: int | None = DEFAULT_MAX_REPLY_SIZE,
) -> bytes:
    """Send one request over a fresh connection and return the reply.

    `timeout` bounds the whole call.  Failures raise :class:`gaspar.RequestFailed`
    or a subclass, as :func:`gaspar.client.request` does.
    """
    check_protocol(protocol)
    if protocol == "v2":
        async with AsyncClient(address, max_reply_size=max_reply_size) as client:
            return await client.request(message, timeout)
    host, port = parse_address(address)
    exchange = V1Exchange(message, max_reply_size)
    try:
        return await asyncio.wait_for(_v1(host, port, exchange), timeout)
    except Exception as exc:
        failed = as_request_failed(exc, format_address(host, port))
        if failed is None or failed is exc:
            raise
        raise failed from exc


class V1Protocol(asyncio.Protocol):
    """Drives one :class:`V1Exchange`: writes it on connect, feeds it to the end.

    Also the load generator's raw v1 path (gaspar.bench.raw_v1), with a timer of its own.
    """

    def __init__(self, exchange: V1Exchange, done: asyncio.Future[bytes]) -> None:
        self.exchange = exchange
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.exchange.data)

    def data_received(self, data: bytes) -> None:
        try:
            self.exchange.feed(data)
        except Exception as exc:
            self._fail(exc)
            assert self.transport is not None
            self.transport.abort()

    def eof_received(self) -> bool:
        if not self.done.done():
            assert self.transport is not None
            try:
                self.done.set_result(self.exchange.end(pending_error(self.transport)))
            except OSError as exc:
                self.done.set_exception(exc)
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("closed before the end of the reply"))

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def _v1(host: str, port: int, exchange: V1Exchange, **connect: Any) -> bytes:
    """Run `exchange` on a fresh connection; the transport is aborted when it ends."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_connection(
        lambda: V1Protocol(exchange, done), host, port, **connect
    )
    try:
        return await done
    finally:
        transport.abort()  # nothing left to send; on cancellation, don't wait


Waiter = asyncio.Future[tuple[Status, bytes]]


class _Connection(asyncio.Protocol):
    """One persistent v2 connection carrying many requests at once."""

    def __init__(self, where: str, max_reply_size: int | None, control: bool) -> None:
        self.where = where
        self.session: ClientSession[Waiter] = ClientSession(max_reply_size, control=control)
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        # Set once the server's preamble has come (or the connection ended first).
        self.greeting: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.session.preamble)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.session.receive(data)
        except ProtocolError as exc:
            self._break(cast(RequestFailed, as_request_failed(exc, self.where)))
            return
        if not self.greeting.done() and self.session.greeted:
            self.greeting.set_result(None)
        for fut, status, body in replies:
            if not fut.done():
                fut.set_result((status, body))

    def eof_received(self) -> bool:
        self._break(ConnectionFailed(f"{self.where}: the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionFailed(f"{self.where}: connection lost" + (f": {exc}" if exc else ""))
        if exc is not None:
            error.__cause__ = exc
        self.fail_all(error)
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def send(self, payload: bytes, deadline: float | None) -> tuple[Status, bytes]:
        """Send one request, with `deadline` (loop time) as its deadline, and await its reply."""
        if self.lost is not None:
            raise ConnectionFailed(f"{self.where}: connection lost") from self.lost
        await self._writable.wait()
        if self.lost is not None or self.transport is None:
            raise ConnectionFailed(f"{self.where}: connection lost") from self.lost
        loop = asyncio.get_running_loop()
        fut: Waiter = loop.create_future()
        left = None if deadline is None else deadline - loop.time()
        try:
            rid, frames = self.session.send(fut, payload, left)
        except ProtocolError as exc:  # every id taken by requests never answered
            raise ConnectionFailed(f"{self.where}: {exc}") from exc
        if len(frames) == 1:
            self.transport.write(frames[0])
        else:
            self.transport.writelines(frames)
        try:
            return await fut
        finally:
            if not fut.done() or fut.cancelled():
                frame = self.session.cancel(rid)  # b"" on a plain connection
                if frame and not self.transport.is_closing():
                    self.transport.write(frame)

    @property
    def load(self) -> int:
        return len(self.session)

    def close(self, reset: bool = False) -> None:
        if self.transport is not None:
            if reset:
                netutil.reset(self.transport)
            else:
                self.transport.close()

    def _break(self, error: RequestFailed) -> None:
        self.fail_all(error)
        if self.transport is not None:
            self.transport.abort()

    def fail_all(self, error: RequestFailed) -> None:
        """Fail every request waiting on this connection with `error`."""
        if self.lost is None:
            self.lost = error
        if not self.greeting.done():
            self.greeting.set_exception(error)
            self.greeting.exception()  # retrieved: nobody may be waiting for it
        for fut in self.session.close():
            if not fut.done():
                fut.set_exception(error)


class AsyncClient:
    """An asyncio v2 client: pipelined requests over `connections` persistent connections.

    Use it as ``async with AsyncClient("host:port") as client``.  At most
    `max_in_flight` requests per connection are sent at once (the server's
    default pipeline limit is 128); a request goes to a connection with room,
    and waits here, not in the server, when none has.  A broken connection
    fails the requests it carried with ConnectionFailed and is replaced on the
    next request.

    With `deadlines` (the default) a request carries its timeout as its
    deadline, and one whose caller gives up (timeout, task cancelled) is
    cancelled on the server; a connection then waits for the server's preamble
    before its first request.  A server without control frames is detected
    there (a reset before its preamble: nothing ran) and spoken to in plain v2
    from then on.  ``deadlines=False`` speaks plain v2 from the start.
    """

    def __init__(
        self,
        address: str | tuple[str, int],
        *,
        connections: int = 1,
        max_in_flight: int = 128,
        timeout: float | None = None,
        max_reply_size: int | None = DEFAULT_MAX_REPLY_SIZE,
        deadlines: bool = True,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.host, self.port = parse_address(address)
        self.where = format_address(self.host, self.port)
        self.timeout = timeout
        self.max_reply_size = max_reply_size
        self.deadlines = deadlines  # False once the server is known not to take them
        self._slots: list[_Connection | None] = [None] * connections
        self._connecting: list[asyncio.Future[_Connection] | None] = [None] * connections
        # One limit per connection: `max_in_flight` each, as documented.
        self._room = [asyncio.Semaphore(max_in_flight) for _ in range(connections)]
        self._turn = itertools.cycle(range(connections))
        self._closed = False

    async def request(self, message: Message, timeout: float | None = None) -> bytes:
        """Send one request and return its reply; `timeout` overrides the client's."""
        data = to_bytes(message)
        limit = self.timeout if timeout is None else timeout
        deadline = None if limit is None else asyncio.get_running_loop().time() + limit
        try:
            status, body = await asyncio.wait_for(self._send(data, deadline), limit)
        except asyncio.TimeoutError as exc:
            raise RequestTimeout(f"{self.where}: no reply within {limit}s") from exc
        if status is not Status.OK:
            raise failure(status, body, self.where)
        return body

    async def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call a task of a :class:`gaspar.App` (needs msgpack); the client's timeout applies."""
        return decode_result(await self.request(encode_call(name, args, kwargs)), name)

    async def close(self) -> None:
        """Close every connection, opened or being opened; waiting requests fail.

        A connection with requests in flight is reset rather than closed, so that
        the server drops the ones still queued instead of running them for nobody.
        """
        self._closed = True
        for pending in self._connecting:
            if pending is not None:
                pending.cancel()  # _opened closes a connection that was made all the same
        for conn in self._slots:
            if conn is not None:
                self._discard(conn)
        self._slots = [None] * len(self._slots)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _discard(self, conn: _Connection) -> None:
        busy = conn.load > 0
        conn.fail_all(ConnectionFailed(f"{self.where}: client closed"))
        conn.close(reset=busy)

    def _pick(self) -> int:
        """The next connection in turn with room for a request, else the next in turn."""
        for _ in self._room:
            index = next(self._turn)
            if not self._room[index].locked():
                return index
        return next(self._turn)

    async def _send(self, data: bytes, deadline: float | None) -> tuple[Status, bytes]:
        index = self._pick()
        async with self._room[index]:
            conn = await self._connection(index)
            return await conn.send(data, deadline)

    async def _connection(self, index: int) -> _Connection:
        if self._closed:
            raise ConnectionFailed(f"{self.where}: client closed")
        conn = self._slots[index]
        if conn is not None and conn.lost is None:
            return conn
        pending = self._connecting[index]
        if pending is None:
            pending = asyncio.ensure_future(self._open())
            self._connecting[index] = pending
            pending.add_done_callback(lambda _: self._opened(index, pending))
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            if self._closed and pending.cancelled():
                raise ConnectionFailed(f"{self.where}: client closed") from None
            raise

    def _opened(self, index: int, pending: asyncio.Future[_Connection]) -> None:
        self._connecting[index] = None
        if pending.cancelled() or pending.exception() is not None:
            return
        conn = pending.result()
        if self._closed:
            self._discard(conn)  # close() ran while it was being opened
        else:
            self._slots[index] = conn

    async def _open(self) -> _Connection:
        if self.deadlines:
            conn = await self._connect(control=True)
            try:
                await self._greeted(conn)
                return conn
            except ConnectionFailed:
                if not conn.session.may_fall_back:
                    raise
            # A server without control frames reset at our preamble, having
            # read nothing: plain v2 from now on, if it answers that.
            conn = await self._connect(control=False)
            await self._greeted(conn)
            self.deadlines = False
            return conn
        return await self._connect(control=False)

    @staticmethod
    async def _greeted(conn: _Connection) -> None:
        """Wait for the server's preamble on `conn`; reset it if that fails or is cancelled."""
        try:
            await conn.greeting
        except BaseException:
            conn.close(reset=True)
            raise

    async def _connect(self, control: bool) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self.where, self.max_reply_size, control), self.host, self.port
            )
        except OSError as exc:
            raise ConnectionFailed(f"{self.where}: cannot connect: {exc}") from exc
        return conn  # asyncio and uvloop both set TCP_NODELAY

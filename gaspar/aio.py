"""The asyncio client.

- :func:`request` sends one request over a fresh connection (v1 by default,
  like :func:`gaspar.client.request`).
- :class:`AsyncClient` multiplexes many concurrent requests over a few
  persistent v2 connections: requests are pipelined, replies are matched by
  id and may come back in any order.

Cancelling the task that awaits a request ends that request: a one-shot
connection is closed; on a shared connection the request's id stays reserved
until the server's late reply arrives and is dropped, so it can never be
delivered to another caller.
"""

from __future__ import annotations

import asyncio
import itertools
from types import TracebackType
from typing import Any, cast

from . import netutil
from .client import DEFAULT_MAX_REPLY_SIZE, Message, parse_address
from .clientcore import RequestIds, as_request_failed, check_protocol, failure
from .errors import ConnectionFailed, MessageTooLarge, RequestFailed, RequestTimeout
from .protocol import (
    MAGIC_V2,
    REQUEST_V2,
    SPLIT_WRITE,
    LimitExceeded,
    ProtocolError,
    ReplyReader,
    ReplyReaderV2,
    Status,
    pack,
    to_bytes,
)

__all__ = ["AsyncClient", "request"]


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
    where = f"{host}:{port}"
    data = pack(message)
    try:
        return await asyncio.wait_for(_v1_exchange(host, port, data, max_reply_size), timeout)
    except Exception as exc:
        failed = as_request_failed(exc, where)
        if failed is None:
            raise
        raise failed from exc


async def _v1_exchange(host: str, port: int, data: bytes, max_reply_size: int | None) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        replies = ReplyReader(max_reply_size)
        while chunk := await reader.read(256 * 1024):
            replies.feed(chunk)
        return replies.finish()
    finally:
        writer.transport.abort()  # nothing left to send; on cancellation, don't wait


class _Connection(asyncio.Protocol):
    """One persistent v2 connection carrying many requests at once."""

    def __init__(self, where: str, max_reply_size: int | None) -> None:
        self.where = where
        self.reader = ReplyReaderV2(max_reply_size)
        self.ids: RequestIds[asyncio.Future[tuple[Status, bytes]]] = RequestIds()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(MAGIC_V2)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.reader.feed(data)
        except LimitExceeded as exc:
            self._break(MessageTooLarge(f"{self.where}: reply too large: {exc}"))
            return
        except ProtocolError as exc:
            self._break(ConnectionFailed(f"{self.where}: {exc}"))
            return
        for reply in replies:
            fut = self.ids.resolve(reply.id)
            if fut is not None and not fut.done():
                fut.set_result((reply.status, reply.body))

    def eof_received(self) -> bool:
        self._break(ConnectionFailed(f"{self.where}: the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionFailed(f"{self.where}: connection lost" + (f": {exc}" if exc else ""))
        if exc is not None:
            error.__cause__ = exc
        self._fail_all(error)
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def send(self, payload: bytes) -> tuple[Status, bytes]:
        if self.lost is not None:
            raise ConnectionFailed(f"{self.where}: connection lost") from self.lost
        await self._writable.wait()
        if self.lost is not None or self.transport is None:
            raise ConnectionFailed(f"{self.where}: connection lost") from self.lost
        fut: asyncio.Future[tuple[Status, bytes]] = asyncio.get_running_loop().create_future()
        rid = self.ids.open(fut)
        header = REQUEST_V2.pack(rid, len(payload))
        if len(payload) >= SPLIT_WRITE:
            self.transport.writelines([header, payload])
        else:
            self.transport.write(header + payload)
        try:
            return await fut
        finally:
            if not fut.done() or fut.cancelled():
                self.ids.abandon(rid)

    @property
    def load(self) -> int:
        return len(self.ids)

    def close(self, reset: bool = False) -> None:
        if self.transport is not None:
            if reset:
                netutil.reset(self.transport)
            else:
                self.transport.close()

    def _break(self, error: RequestFailed) -> None:
        self._fail_all(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail_all(self, error: RequestFailed) -> None:
        if self.lost is None:
            self.lost = error
        for fut in self.ids.drain():
            if not fut.done():
                fut.set_exception(error)


class AsyncClient:
    """An asyncio v2 client: pipelined requests over `connections` persistent connections.

    Use it as ``async with AsyncClient("host:port") as client``.  At most
    `max_in_flight` requests per connection are sent at once (the server's
    default pipeline limit is 128); more wait here, not in the server.  A broken
    connection fails the requests it carried with ConnectionFailed and is
    replaced on the next request.
    """

    def __init__(
        self,
        address: str | tuple[str, int],
        *,
        connections: int = 1,
        max_in_flight: int = 128,
        timeout: float | None = None,
        max_reply_size: int | None = DEFAULT_MAX_REPLY_SIZE,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.host, self.port = parse_address(address)
        self.where = f"{self.host}:{self.port}"
        self.timeout = timeout
        self.max_reply_size = max_reply_size
        self._slots: list[_Connection | None] = [None] * connections
        self._connecting: list[asyncio.Future[_Connection] | None] = [None] * connections
        self._turn = itertools.cycle(range(connections))
        self._closed = False
        self._in_flight = asyncio.Semaphore(max_in_flight * connections)

    async def request(self, message: Message, timeout: float | None = None) -> bytes:
        """Send one request and return its reply; `timeout` overrides the client's."""
        data = to_bytes(message)
        limit = self.timeout if timeout is None else timeout
        try:
            status, body = await asyncio.wait_for(self._send(data), limit)
        except asyncio.TimeoutError as exc:
            raise RequestTimeout(f"{self.where}: no reply within {limit}s") from exc
        if status is not Status.OK:
            raise failure(status, body, self.where)
        return body

    async def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call a task of a :class:`gaspar.App` (needs msgpack); the client's timeout applies."""
        from .app import decode_result, encode_call

        return decode_result(await self.request(encode_call(name, args, kwargs)), name)

    async def close(self) -> None:
        """Close every connection; requests still waiting fail with ConnectionFailed.

        A connection with requests in flight is reset rather than closed, so that
        the server drops the ones still queued instead of running them for nobody.
        """
        self._closed = True
        for conn in self._slots:
            if conn is not None:
                busy = conn.load > 0
                conn._fail_all(ConnectionFailed(f"{self.where}: client closed"))
                conn.close(reset=busy)
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

    async def _send(self, data: bytes) -> tuple[Status, bytes]:
        async with self._in_flight:
            conn = await self._connection()
            return await conn.send(data)

    async def _connection(self) -> _Connection:
        if self._closed:
            raise ConnectionFailed(f"{self.where}: client closed")
        index = next(self._turn)
        conn = self._slots[index]
        if conn is not None and conn.lost is None:
            return conn
        pending = self._connecting[index]
        if pending is None:
            pending = asyncio.ensure_future(self._open())
            self._connecting[index] = pending
            pending.add_done_callback(lambda _: self._opened(index, pending))
        return await asyncio.shield(pending)

    def _opened(self, index: int, pending: asyncio.Future[_Connection]) -> None:
        self._connecting[index] = None
        if not pending.cancelled() and pending.exception() is None:
            self._slots[index] = pending.result()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self.where, self.max_reply_size), self.host, self.port
            )
        except OSError as exc:
            raise ConnectionFailed(f"{self.where}: cannot connect: {exc}") from exc
        return conn  # asyncio and uvloop both set TCP_NODELAY

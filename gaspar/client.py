"""The blocking client: a thin driver over :mod:`gaspar.clientcore`, on plain ``socket``.

Because it uses nothing but ``socket``, ``select``, ``threading`` and
``time``, eventlet's or gevent's monkey-patching turns it green: many
greenlets can wait on gaspar at once.

- :func:`request` sends one request over a fresh connection, v1 by default, so
  it also works against servers that speak only the original protocol.
- :class:`Client` keeps a small pool of persistent v2 connections: no TCP
  connect per request, and failures arrive as typed exceptions.  Each request
  carries its timeout as a deadline, and a request that times out is
  cancelled (docs/protocol.md, "Control frames").
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

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
from .protocol import ProtocolError, Status, pack, to_bytes

__all__ = ["DEFAULT_MAX_REPLY_SIZE", "Client", "pack", "parse_address", "request", "stats"]

_RECV_SIZE = 256 * 1024
# A connection keeps at most this many cancelled requests whose replies have
# not come back; past that (a server that does not answer) it is closed.
_MAX_CANCELLED = 4


class _FallBack(Exception):
    """A connection opened with the control preamble ended before the server's preamble."""


class _Deadline:
    """The time left of one call, applied to each socket operation in turn."""

    __slots__ = ("at", "timeout", "where")

    def __init__(self, timeout: float | None, where: str) -> None:
        self.timeout = timeout
        self.where = where
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (negative once past), or None without a timeout."""
        return None if self.at is None else self.at - time.monotonic()

    def left(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise RequestTimeout(f"{self.where}: no reply within {self.timeout}s")
        return left


def _connect(host: str, port: int, deadline: _Deadline) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=deadline.left())
    except TimeoutError as exc:
        raise RequestTimeout(f"{deadline.where}: connecting timed out") from exc
    except OSError as exc:
        raise ConnectionFailed(f"{deadline.where}: cannot connect: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


T = TypeVar("T")


def _translate(where: str, call: Callable[[], T], reset: type[RequestFailed] = RequestFailed) -> T:
    """Run `call`, turning socket and framing errors into RequestFailed subclasses."""
    try:
        return call()
    except Exception as exc:
        failed = as_request_failed(exc, where, reset)
        if failed is None or failed is exc:
            raise
        raise failed from exc


def request(
    address: str | tuple[str, int],
    message: Message,
    timeout: float | None = None,
    *,
    protocol: str = "v1",
    max_reply_size: int | None = DEFAULT_MAX_REPLY_SIZE,
) -> bytes:
    """Send one request over a fresh connection and return the reply.

    `timeout` bounds the whole call (connect, send and receive).  Every failure
    raises :class:`gaspar.RequestFailed` or a subclass, with the cause chained.
    Over v1 a server-side failure is a reset, which says only RequestFailed;
    ``protocol="v2"`` gets the typed reason (HandlerError, WorkerLost, ...).
    """
    check_protocol(protocol)
    if protocol == "v2":
        with Client(address, pool_size=0, max_reply_size=max_reply_size) as client:
            return client.request(message, timeout)
    host, port = parse_address(address)
    where = format_address(host, port)
    v1 = V1Exchange(message, max_reply_size)
    deadline = _Deadline(timeout, where)
    sock = _connect(host, port, deadline)

    def exchange() -> bytes:
        with sock:
            sock.settimeout(deadline.left())
            sock.sendall(v1.data)
            while True:
                sock.settimeout(deadline.left())
                chunk = sock.recv(_RECV_SIZE)
                if not chunk:
                    return v1.end(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
                v1.feed(chunk)

    return _translate(where, exchange)


# The largest stats reply a client accepts.
MAX_STATS_REPLY = 1 << 20


def stats(address: str | tuple[str, int], timeout: float | None = 10.0) -> dict[str, Any]:
    """The server's numbers (what :meth:`gaspar.Producer.stats` returns), by a v2 stats request.

    The request goes on a control connection, only once the server has
    answered its preamble (docs/protocol.md, "Stats request"), so a server
    without control frames never sees it.  Failures raise
    :class:`gaspar.ConnectionFailed` (or another RequestFailed) naming the cause.
    """
    host, port = parse_address(address)
    where = format_address(host, port)
    deadline = _Deadline(timeout, where)
    sock = _connect(host, port, deadline)
    session: ClientSession[bool] = ClientSession(MAX_STATS_REPLY, control=True)

    def receive(gone: str) -> list[tuple[bool, Status, bytes]]:
        sock.settimeout(deadline.left())
        try:
            chunk = sock.recv(_RECV_SIZE)
        except ConnectionResetError as exc:
            raise ConnectionFailed(f"{where}: the server reset the connection {gone}") from exc
        if not chunk:
            raise ConnectionFailed(f"{where}: the server closed the connection {gone}")
        return session.receive(chunk)

    def exchange() -> tuple[Status, bytes]:
        with sock:
            sock.settimeout(deadline.left())
            sock.sendall(session.preamble)
            while not session.greeted:
                if receive("before its preamble (no control frames; or full, or stopping)"):
                    raise ProtocolError("a reply before any request")
            _, frame = session.stats_request(True)
            sock.settimeout(deadline.left())
            sock.sendall(frame)
            while True:
                for _, status, body in receive("at the stats request (a server without them)"):
                    return status, body

    status, body = _translate(where, exchange, ConnectionFailed)
    if status is not Status.OK:
        raise failure(status, body, where)
    try:
        result = json.loads(body)
    except ValueError as exc:
        raise ConnectionFailed(f"{where}: the stats reply is not JSON: {exc}") from exc
    if not isinstance(result, dict):
        raise ConnectionFailed(f"{where}: the stats reply is not a JSON object")
    return result


class _Connection:
    """One persistent v2 connection, used by one caller at a time."""

    __slots__ = ("reusable", "session", "sock")

    def __init__(self, sock: socket.socket, max_reply_size: int | None, control: bool) -> None:
        self.sock = sock
        self.session: ClientSession[bool] = ClientSession(max_reply_size, control=control)
        self.reusable = False  # after a failed call: its cancel went out whole

    def usable(self) -> bool:
        """False if the server has closed or reset it while it sat in the pool.

        Replies to cancelled requests may arrive meanwhile: they are read and
        dropped here.  Anything else readable is an end of stream or a reset.
        """
        sock = self.sock
        while True:
            try:
                readable, _, _ = select.select([sock], [], [], 0)
            except (OSError, ValueError):
                return False
            if not readable:
                return True
            try:
                sock.settimeout(0)
                chunk = sock.recv(_RECV_SIZE)
                if not chunk or self.session.receive(chunk):
                    return False  # closed, or a reply nobody asked for
            except BlockingIOError:
                return True
            except (OSError, ProtocolError):
                return False

    def exchange(self, data: bytes, deadline: _Deadline) -> tuple[Status, bytes]:
        session = self.session
        self.reusable = False
        rid, frames = session.send(True, data, deadline.remaining())
        sent = False
        try:
            for frame in frames:
                self.sock.settimeout(deadline.left())
                self.sock.sendall(frame)
            sent = True
            while True:
                self.sock.settimeout(deadline.left())
                chunk = self.sock.recv(_RECV_SIZE)
                if not chunk:
                    if session.may_fall_back:
                        raise _FallBack
                    raise ConnectionFailed(f"{deadline.where}: the server closed the connection")
                for _, status, body in session.receive(chunk):
                    return status, body  # one request at a time: any other id is a ProtocolError
        except (TimeoutError, RequestTimeout):
            if sent:
                self.reusable = self._cancel(rid)
            raise
        except OSError as exc:
            if session.may_fall_back:
                raise _FallBack from exc
            raise

    def _cancel(self, rid: int) -> bool:
        """Tell the server to drop `rid`, without waiting: True if the frame went out whole.

        Then the connection stays usable: the server's one reply for `rid`
        (CANCELLED, or its own) is dropped when it comes.
        """
        frame = self.session.cancel(rid)
        if not frame or len(self.session) > _MAX_CANCELLED:
            return False
        try:
            self.sock.settimeout(0)
            return self.sock.send(frame) == len(frame)
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


class Client:
    """A blocking v2 client: persistent connections, typed errors, thread- and green-safe.

    Each call takes an idle pooled connection, or opens one; at most
    `pool_size` idle connections are kept.  A request carries its timeout as a
    deadline (with `deadlines`, the default): the server fails it with TIMEOUT
    if no worker has taken it by then.  A call that times out cancels its
    request, and its connection goes back to the pool if the cancel could be
    written at once (the late reply is then dropped, as ids stay taken until
    answered); a connection whose call failed in any other way is closed.
    ``deadlines=False`` speaks plain v2: no deadlines, no cancels.  A server
    without control frames is detected on the first connection (a reset
    before its preamble: nothing ran) and spoken to in plain v2 from then on.
    """

    def __init__(
        self,
        address: str | tuple[str, int],
        *,
        timeout: float | None = None,
        pool_size: int = 8,
        max_reply_size: int | None = DEFAULT_MAX_REPLY_SIZE,
        deadlines: bool = True,
    ) -> None:
        self.host, self.port = parse_address(address)
        self.where = format_address(self.host, self.port)
        self.timeout = timeout
        self.deadlines = deadlines  # False once the server is known not to take them
        self.pool_size = pool_size
        self.max_reply_size = max_reply_size
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def request(self, message: Message, timeout: float | None = None) -> bytes:
        """Send one request and return its reply; `timeout` overrides the client's."""
        data = to_bytes(message)
        deadline = _Deadline(self.timeout if timeout is None else timeout, self.where)
        conn = self._checkout(deadline)
        try:
            try:
                status, body = self._exchange(conn, data, deadline)
            except _FallBack:
                # A server without control frames reset at our preamble: nothing
                # ran.  Once more in plain v2; if that is answered, stay plain.
                conn.close()
                conn = self._open(deadline, control=False)
                status, body = self._exchange(conn, data, deadline)
                self.deadlines = False
        except BaseException:
            if conn.reusable:
                self._checkin(conn)
            else:
                conn.close()
            raise
        self._checkin(conn)
        if status is not Status.OK:
            raise failure(status, body, self.where)
        return body

    def _exchange(
        self, conn: _Connection, data: bytes, deadline: _Deadline
    ) -> tuple[Status, bytes]:
        return _translate(self.where, lambda: conn.exchange(data, deadline), ConnectionFailed)

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call a task of a :class:`gaspar.App` (needs msgpack); the client's timeout applies."""
        return decode_result(self.request(encode_call(name, args, kwargs)), name)

    def close(self) -> None:
        """Close the pooled connections; calls after this open none."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _checkout(self, deadline: _Deadline) -> _Connection:
        while True:
            with self._lock:
                if self._closed:
                    raise ConnectionFailed(f"{self.where}: client closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                break
            if conn.usable():
                return conn
            conn.close()
        return self._open(deadline, self.deadlines)

    def _open(self, deadline: _Deadline, control: bool) -> _Connection:
        sock = _connect(self.host, self.port, deadline)
        conn = _Connection(sock, self.max_reply_size, control)
        try:
            sock.sendall(conn.session.preamble)
        except OSError as exc:
            sock.close()
            raise ConnectionFailed(f"{self.where}: connection failed: {exc}") from exc
        return conn

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.pool_size:
                self._idle.append(conn)
                return
        conn.close()

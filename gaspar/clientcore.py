"""What every gaspar client shares: everything but reading and writing.

The blocking client (:mod:`gaspar.client`), the asyncio client
(:mod:`gaspar.aio`) and the load generator (:mod:`gaspar.bench`) are drivers
over this module, the way pyzmq keeps ``zmq.asyncio`` thin over one core.  It
has no sockets: a driver writes the bytes it is given, feeds back the bytes it
reads, and reports how the stream ended.

- :class:`V1Exchange`: one v1 request and its reply (bytes out, bytes in, the
  reply once the stream ends, or the failure a pending reset means).
- :class:`ClientSession`: the client side of one v2 connection: request ids,
  frames out (with a deadline, and cancels, on a control connection), replies
  in, late replies dropped.
- :func:`failure`, :func:`as_request_failed`: statuses and socket or framing
  errors as typed exceptions; messages name the server as
  :func:`gaspar.address.format_address` prints it (``[::1]:port``).
- :func:`classify`: a failure as a short kind for counting (``gaspar bench``),
  derived from the same mapping.
"""

from __future__ import annotations

import errno
import math
import os
import sys
from typing import Generic, TypeVar

from .errors import (
    BadRequest,
    ConnectionFailed,
    HandlerError,
    MessageTooLarge,
    Overloaded,
    RequestFailed,
    RequestTimeout,
    ShuttingDown,
    WorkerLost,
)
from .protocol import (
    MAGIC_V2,
    MAGIC_V2_CONTROL,
    MAX_DEADLINE_MS,
    MAX_REQUEST_ID,
    REQUEST_V2,
    SPLIT_WRITE,
    LimitExceeded,
    ProtocolError,
    ReplyReader,
    ReplyReaderV2,
    Status,
    pack,
    pack_cancel_v2,
    pack_stats_v2,
    timed_header_v2,
)

__all__ = [
    "DEFAULT_MAX_REPLY_SIZE",
    "EXCEPTIONS",
    "PROTOCOLS",
    "REPLY_TOO_LARGE",
    "STATUS_KINDS",
    "TRANSPORT_KINDS",
    "ClientSession",
    "Message",
    "RequestIds",
    "V1Exchange",
    "as_request_failed",
    "check_protocol",
    "classify",
    "deadline_ms",
    "failure",
]

PROTOCOLS = ("v1", "v2")
#: The largest reply a client accepts unless told otherwise.
DEFAULT_MAX_REPLY_SIZE = 64 * 1024 * 1024

Message = bytes | bytearray | memoryview | str

# The exception a client raises for each v2 status but OK.
EXCEPTIONS: dict[Status, type[RequestFailed]] = {
    Status.HANDLER_ERROR: HandlerError,
    Status.TIMEOUT: RequestTimeout,
    Status.WORKER_LOST: WorkerLost,
    Status.OVERLOADED: Overloaded,
    Status.TOO_LARGE: MessageTooLarge,
    Status.BAD_REQUEST: BadRequest,
    Status.SHUTTING_DOWN: ShuttingDown,
}
#: The kind of each status's failure: its lower-case name (as in ``Producer.stats()``).
STATUS_KINDS: dict[Status, str] = {status: status.name.lower() for status in EXCEPTIONS}
#: Kinds of failures that carry no status: the connection was reset or refused.
TRANSPORT_KINDS = ("reset", "refused")
#: The detail :func:`classify` gives a reply above the client's limit (kind ``too_large``).
REPLY_TOO_LARGE = "reply too large"


def deadline_ms(timeout: float | None) -> int | None:
    """A timeout in seconds as the deadline a request carries: whole ms, rounded up.

    None for no timeout, or one above :data:`gaspar.protocol.MAX_DEADLINE_MS`
    (about 4.66 hours), which is sent as no deadline; 0 once it has passed.
    """
    if timeout is None:
        return None
    ms = math.ceil(timeout * 1000) if timeout > 0 else 0
    return ms if ms <= MAX_DEADLINE_MS else None


def check_protocol(protocol: str) -> None:
    """Reject a protocol name other than "v1" or "v2"."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be 'v1' or 'v2', not {protocol!r}")


def failure(status: Status, body: bytes, where: str) -> RequestFailed:
    """The exception for a v2 reply whose status is not OK."""
    text = body.decode("utf-8", "replace")
    if status is Status.HANDLER_ERROR:
        exc = HandlerError.from_remote(text)
        exc.args = (f"{where}: {exc.args[0]}",)
        return exc
    return EXCEPTIONS.get(status, RequestFailed)(f"{where}: {text or status.name.lower()}")


def _is_asyncio_timeout(exc: BaseException) -> bool:
    # Before 3.11 asyncio has its own TimeoutError; looked up, not imported,
    # so that the blocking client does not load asyncio.
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and isinstance(exc, asyncio.TimeoutError)


def as_request_failed(
    exc: BaseException, where: str, reset: type[RequestFailed] = RequestFailed
) -> RequestFailed | None:
    """The RequestFailed for a socket or framing error (`exc` itself if it is one), or None.

    A reset is how v1 reports a failed request (RequestFailed); in v2, where
    failures are replies, it means the connection broke (ConnectionFailed).
    """
    if isinstance(exc, RequestFailed):
        return exc
    if isinstance(exc, TimeoutError) or _is_asyncio_timeout(exc):
        return RequestTimeout(f"{where}: no reply in time")
    if isinstance(exc, ConnectionResetError):
        return reset(f"{where}: the server reset the connection")
    if isinstance(exc, LimitExceeded):
        return MessageTooLarge(f"{where}: reply too large: {exc}")
    if isinstance(exc, ProtocolError):
        return ConnectionFailed(f"{where}: {exc}")
    if isinstance(exc, OSError):
        return ConnectionFailed(f"{where}: connection failed: {exc}")
    return None


def classify(exc: BaseException) -> tuple[str, str | None]:
    """A failed request as (kind, detail) for counting; detail is None for the usual kinds.

    The kind of a typed failure is its status's (:data:`STATUS_KINDS`, through
    :data:`EXCEPTIONS`); a reply above the client's limit is ``too_large`` with
    the detail "reply too large"; a failure without a status is told by its
    cause: ``reset``, ``refused``, or ``other`` with the errno's name.
    """
    failed = as_request_failed(exc, "")
    if failed is None:
        return "other", f"{type(exc).__name__}: {exc}"[:120]
    cause = exc if failed is not exc else exc.__cause__
    if isinstance(cause, LimitExceeded):
        return STATUS_KINDS[Status.TOO_LARGE], REPLY_TOO_LARGE
    for status, kind in STATUS_KINDS.items():
        if isinstance(failed, EXCEPTIONS[status]):
            return kind, None
    if isinstance(cause, RequestFailed):
        return classify(cause)
    if isinstance(cause, ConnectionResetError | BrokenPipeError):
        return "reset", None
    if isinstance(cause, ConnectionRefusedError):
        return "refused", None
    if isinstance(cause, OSError) and cause.errno:
        return "other", errno.errorcode.get(cause.errno, f"errno {cause.errno}")
    shown = failed if cause is None else cause
    return "other", f"{type(shown).__name__}: {shown}"[:120]


class V1Exchange:
    """One v1 request and its reply, without I/O.

    Write :attr:`data`, :meth:`feed` what arrives, and call :meth:`end` when
    the stream ends, with the socket's pending error (``SO_ERROR``).  Over v1 a
    reset is the only failure signal, and an event loop may report a reset
    that arrives behind unread data as a clean end of stream (libuv does, when
    its last read was short): a pending error at the end fails the request, so
    a truncated reply never passes as a success.
    """

    __slots__ = ("data", "reader")

    def __init__(self, message: Message, max_reply_size: int | None) -> None:
        self.data = pack(message)
        self.reader = ReplyReader(max_reply_size)

    def feed(self, data: bytes) -> None:
        """Take reply bytes; raise LimitExceeded past the reply limit."""
        self.reader.feed(data)

    def end(self, error: int = 0) -> bytes:
        """The stream ended: the reply, or OSError (a reset) if `error` is set."""
        if error:
            raise OSError(error, os.strerror(error))  # ConnectionResetError for ECONNRESET
        return self.reader.finish()


W = TypeVar("W")


class RequestIds(Generic[W]):
    """Request ids of one v2 connection, and who waits for each reply.

    An id stays taken until the server's reply for it arrives, even when its
    caller gave up (timeout, cancellation): a late reply is then dropped here,
    and can never be taken for the reply of a later request that reused the id.
    Ids run through `size` values (all of v2's 2**32 unless a test wants them
    to wrap sooner) and wrap around.
    """

    __slots__ = ("_abandoned", "_next", "size", "waiting")

    def __init__(self, size: int = MAX_REQUEST_ID + 1) -> None:
        if not 1 <= size <= MAX_REQUEST_ID + 1:
            raise ValueError(f"size must be from 1 to {MAX_REQUEST_ID + 1}")
        self.size = size
        self.waiting: dict[int, W] = {}
        self._abandoned: set[int] = set()
        self._next = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self._abandoned)

    def open(self, waiter: W) -> int:
        """Take a fresh id for `waiter`; ProtocolError if every id is taken."""
        if len(self) >= self.size:
            raise ProtocolError(f"all {self.size} request ids are taken")
        rid = self._next
        while rid in self.waiting or rid in self._abandoned:
            rid = (rid + 1) % self.size
        self._next = (rid + 1) % self.size
        self.waiting[rid] = waiter
        return rid

    def abandon(self, rid: int) -> None:
        """The caller stopped waiting; keep the id taken until its reply arrives."""
        if self.waiting.pop(rid, None) is not None:
            self._abandoned.add(rid)

    def resolve(self, rid: int) -> W | None:
        """The reply for `rid` arrived: who waits for it, or None if nobody does any more.

        A reply for an id that is not taken breaks the protocol (ProtocolError).
        """
        waiter = self.waiting.pop(rid, None)
        if waiter is None:
            if rid not in self._abandoned:
                raise ProtocolError(f"reply for request {rid}, which is not in flight")
            self._abandoned.discard(rid)
        return waiter

    def drain(self) -> list[W]:
        """The connection is gone: every waiter, to be failed."""
        waiters = list(self.waiting.values())
        self.waiting.clear()
        self._abandoned.clear()
        return waiters


class ClientSession(Generic[W]):
    """The client side of one v2 connection, without I/O (in h11's spirit).

    Write :attr:`preamble` first; :meth:`send` turns a request into an id and
    the buffers to write; :meth:`receive` turns bytes read into (waiter,
    status, body) for the replies that someone still waits for.  A waiter is
    whatever the driver matches a reply with (a future, a flag).

    With ``control=True`` the preamble is :data:`gaspar.protocol.MAGIC_V2_CONTROL`:
    :meth:`send` gives a request its deadline and :meth:`cancel` returns the
    frame that tells the server to drop one.  A server without control frames
    resets such a connection before its preamble, having read no frame:
    :attr:`may_fall_back` then says that what was sent never ran, and the
    driver reopens with the plain preamble.
    """

    __slots__ = ("control", "ids", "preamble", "reader")

    PREAMBLE = MAGIC_V2

    def __init__(
        self,
        max_reply_size: int | None,
        ids: RequestIds[W] | None = None,
        *,
        control: bool = False,
    ) -> None:
        self.control = control
        self.preamble = MAGIC_V2_CONTROL if control else MAGIC_V2
        self.reader = ReplyReaderV2(max_reply_size, self.preamble)
        self.ids: RequestIds[W] = RequestIds() if ids is None else ids

    def __len__(self) -> int:
        """Ids taken: requests in flight, and given up on but not answered yet."""
        return len(self.ids)

    @property
    def greeted(self) -> bool:
        """True once the server's preamble has arrived."""
        return self.reader.greeted

    @property
    def may_fall_back(self) -> bool:
        """True if the connection ended now would mean a server without control frames.

        Such a server resets at the control preamble and reads no frame, so
        every request sent on the connection is safe to send again.
        """
        return self.control and not self.reader.greeted

    def send(
        self, waiter: W, payload: bytes, timeout: float | None = None
    ) -> tuple[int, list[bytes]]:
        """Frame `payload` for `waiter`: its id, and one buffer or (when large) two to write.

        On a control connection the request carries `timeout` (seconds left)
        as its deadline: the server fails it with TIMEOUT if it is still
        queued then.  Elsewhere `timeout` is not sent.
        """
        rid = self.ids.open(waiter)
        ms = deadline_ms(timeout) if self.control else None
        if ms is None:
            header = REQUEST_V2.pack(rid, len(payload))
        else:
            header = timed_header_v2(rid, ms, len(payload))
        if len(payload) >= SPLIT_WRITE:
            return rid, [header, payload]  # no copy of a large payload
        return rid, [header + payload]

    def receive(self, data: bytes) -> list[tuple[W, Status, bytes]]:
        """The replies `data` completes, with their waiters; late replies are dropped.

        Raises ProtocolError (LimitExceeded for a reply above the limit): the
        connection is then unusable.
        """
        resolve = self.ids.resolve
        answered = []
        for rid, status, body in self.reader.feed(data):
            waiter = resolve(rid)
            if waiter is not None:
                answered.append((waiter, status, body))
        return answered

    def abandon(self, rid: int) -> None:
        """The caller of `rid` stopped waiting (timeout, cancellation)."""
        self.ids.abandon(rid)

    def cancel(self, rid: int) -> bytes:
        """The caller of `rid` stopped waiting: the cancel frame to write, or b"".

        The id stays taken until the server's one reply for it (CANCELLED, or
        its own if it ended first) arrives, and that reply is dropped.  b"" on
        a plain connection, or when `rid`'s reply has arrived already.
        """
        waiting = rid in self.ids.waiting
        self.ids.abandon(rid)
        return pack_cancel_v2(rid) if waiting and self.control else b""

    def stats_request(self, waiter: W) -> tuple[int, bytes]:
        """A stats request for `waiter`: its id and its frame (control connections only).

        Send it only once :attr:`greeted`: a server that takes control frames
        but not this kind resets the connection, one that takes none never
        sees it.  Its reply is OK with the server's numbers as a JSON object.
        """
        if not self.control:
            raise ValueError("a stats request needs a control connection")
        rid = self.ids.open(waiter)
        return rid, pack_stats_v2(rid)

    def close(self) -> list[W]:
        """The connection is gone: every waiter, to be failed."""
        return self.ids.drain()

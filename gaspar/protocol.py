"""Wire protocols v1 and v2, without I/O.

v1 (gaspar 1.0's): a request is a 4-byte unsigned big-endian length followed
by that many bytes; the reply is the reply bytes, after which the server closes
the connection (or resets it when the request failed).

v2 (opt-in, same port): the client opens with :data:`MAGIC_V2`, four bytes no
v1 client can send (as a length they exceed any allowed limit), then sends
framed requests, each with an id; replies carry the id and a status and come
back in completion order.  docs/protocol.md specifies both byte by byte.

This module only turns bytes into events and events into bytes, so the server,
every client and a fuzzer share it.  Rules it keeps:

1. A declared length is checked against the limit before any byte of the
   payload is buffered, so a 4-byte header cannot make us allocate 4 GiB.
2. Buffering is linear: data is appended once and consumed from the front of
   one buffer, never re-sliced per chunk, so trickled input costs O(n).
3. A v1 reader is single-use: one request per connection.
4. An oversized v2 request is skipped without being buffered, and answered
   with TOO_LARGE; the connection stays usable.
5. The v2 rules of a connection (preamble, ids in flight, pipeline cap,
   shutting down, how replies are framed and bounded) live in one sans-I/O
   object, :class:`SessionV2`, which the server drives and tests and the
   fuzzer drive without sockets.
6. Control frames (a request with a deadline, a cancel, a stats request)
   exist only on a connection opened with :data:`MAGIC_V2_CONTROL`; on one
   opened with :data:`MAGIC_V2` every byte means what it meant before them.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_PIPELINE",
    "HEADER_SIZE",
    "CONTROL_BIT",
    "MAGIC_V2",
    "MAGIC_V2_CONTROL",
    "MAX_DEADLINE_MS",
    "MAX_LENGTH",
    "MAX_MESSAGE_SIZE_LIMIT",
    "LimitExceeded",
    "ProtocolError",
    "Cancel",
    "Refused",
    "StatsRequest",
    "Reply",
    "ReplyReader",
    "ReplyReaderV2",
    "Request",
    "RequestReader",
    "REPLY_V2",
    "REQUEST_V2",
    "SPLIT_WRITE",
    "SessionV2",
    "Status",
    "Timed",
    "pack",
    "pack_cancel_v2",
    "pack_stats_v2",
    "pack_reply_v2",
    "pack_request_v2",
    "pack_timed_request_v2",
    "timed_header_v2",
    "to_bytes",
]

HEADER = struct.Struct("!I")
HEADER_SIZE = HEADER.size
MAX_LENGTH = 0xFFFFFFFF
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# Requests in flight on one v2 connection, unless the server is told otherwise.
DEFAULT_MAX_PIPELINE = 128
# Frames with a payload at least this large are written as header and payload
# (two buffers to the transport), not concatenated into a copy.
SPLIT_WRITE = 64 * 1024
# Payloads at least this large may be read straight into a buffer of their size.
DIRECT_READ_MIN = 256 * 1024
# ... once this fraction (1/N) of them has arrived.
DIRECT_READ_RATIO = 16

MAGIC_V2 = b"\xffGS\x02"
# max_message_size may not reach the preamble's value read as a v1 length.
MAX_MESSAGE_SIZE_LIMIT = 0x7FFFFFFF
REQUEST_V2 = struct.Struct("!II")  # request id, payload length
REPLY_V2 = struct.Struct("!IBI")  # request id, status, body length
MAX_REQUEST_ID = 0xFFFFFFFF

# The preamble of a v2 connection whose client may send control frames: the
# version byte with its top bit set.  An older server reads it as a v1 length
# above its limit and resets the connection before reading any frame.
MAGIC_V2_CONTROL = b"\xffGS\x82"
# On such a connection, a request header's length word with this bit set is a
# control frame: kind in the next 7 bits, a 24-bit argument in the low bytes.
CONTROL_BIT = 0x80000000
KIND_CANCEL = 1  # id: the request to cancel; argument 0; nothing follows
KIND_TIMED = 2  # argument: deadline in ms; a 4-byte payload length and the payload follow
KIND_STATS = 3  # id: this frame's own; argument 0; nothing follows; answered with JSON
TIMED_V2 = struct.Struct("!III")  # id, 0x82000000 | deadline ms, payload length
MAX_DEADLINE_MS = 0xFFFFFF  # about 4.66 hours; a longer deadline is sent as none


class Status(enum.IntEnum):
    """How a request ended; carried in every v2 reply."""

    OK = 0
    HANDLER_ERROR = 1
    TIMEOUT = 2
    WORKER_LOST = 3
    OVERLOADED = 4
    TOO_LARGE = 5
    BAD_REQUEST = 6
    SHUTTING_DOWN = 7
    CANCELLED = 8  # sent only on control connections, in answer to a cancel


class Request(NamedTuple):
    """A complete request (v1 requests have id 0)."""

    id: int
    payload: bytes | bytearray


class Timed(NamedTuple):
    """A complete v2 request with a deadline, `deadline_ms` after the server read it."""

    id: int
    payload: bytes
    deadline_ms: int


class Cancel(NamedTuple):
    """The client no longer wants request `id` (which is in flight)."""

    id: int


class StatsRequest(NamedTuple):
    """The client asks for the server's numbers: answer `id` with them, as JSON, at once."""

    id: int


class Refused(NamedTuple):
    """A v2 request refused while parsing; the server answers `status` for `id`."""

    id: int
    status: Status
    message: str


class Reply(NamedTuple):
    """A v2 reply: the payload when status is OK, an error message otherwise."""

    id: int
    status: Status
    body: bytes


BytesLike = bytes | bytearray | memoryview
#: What :meth:`SessionV2.receive_data` returns.
Event = Request | Timed | Cancel | Refused | StatsRequest


class ProtocolError(ValueError):
    """The peer sent bytes that break the protocol."""


class LimitExceeded(ProtocolError):
    """A declared or received size is above the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


def to_bytes(message: BytesLike | str) -> bytes:
    """Return `message` as bytes; `str` is encoded as UTF-8."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        return message.encode("utf-8")
    if isinstance(message, bytearray | memoryview):
        return bytes(message)
    raise TypeError(f"expected bytes-like or str, got {type(message).__name__}")


def pack(message: BytesLike | str) -> bytes:
    """Frame one v1 request: the 4-byte big-endian length, then the payload."""
    payload = to_bytes(message)
    if len(payload) > MAX_LENGTH:
        raise LimitExceeded(len(payload), MAX_LENGTH)
    return HEADER.pack(len(payload)) + payload


class Limits:
    """Per-connection bounds that the server enforces: sizes, counts and deadlines.

    Every value is given: the defaults live in :mod:`gaspar.options`.
    """

    __slots__ = (
        "idle_timeout",
        "max_connections",
        "max_message_size",
        "max_pipeline",
        "read_timeout",
        "write_timeout",
    )

    def __init__(
        self,
        max_message_size: int,
        max_connections: int,
        read_timeout: float,
        write_timeout: float,
        max_pipeline: int,
        idle_timeout: float,
    ) -> None:
        self.max_message_size = max_message_size
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_pipeline = max_pipeline
        self.idle_timeout = idle_timeout


class RequestReader:
    """Parse one v1 request from the bytes a connection delivers.

    Feed it data with :meth:`feed`; it returns the payload once complete and
    ``None`` while more is needed.  Bytes after a complete request raise
    :class:`ProtocolError`, since v1 carries one request per connection.

    Once a sixteenth of a large payload has arrived, the reader gives it a
    buffer of its full size: :meth:`buffer` and :meth:`advance` let a caller
    read the rest straight into it, which saves copying and joining chunks.
    Waiting for that sixteenth keeps what a client can make us allocate within
    sixteen times what it has sent.
    """

    __slots__ = ("_body", "_chunks", "_have", "_header", "_length", "done", "max_message_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._header = b""
        self._length = -1
        self._chunks: list[bytes] = []
        self._body: bytearray | None = None
        self._have = 0
        self.done = False

    @property
    def started(self) -> bool:
        """True once any byte of the request has arrived."""
        return bool(self._header) or self._length >= 0

    def feed(self, data: bytes) -> bytes | bytearray | None:
        """Consume `data`; return the complete payload, or None if more is needed."""
        if self.done:
            if data:
                raise ProtocolError("data after a complete v1 request")
            return None
        if self._length < 0:
            # Fast path: the whole request in one chunk, the usual case.
            if not self._header and len(data) >= HEADER_SIZE:
                (length,) = HEADER.unpack_from(data)
                self._check(length)
                if len(data) == HEADER_SIZE + length:
                    self.done = True
                    return data[HEADER_SIZE:]
                self._length = length
                data = data[HEADER_SIZE:]
            else:
                need = HEADER_SIZE - len(self._header)
                self._header += data[:need]
                data = data[need:]
                if len(self._header) < HEADER_SIZE:
                    return None
                (length,) = HEADER.unpack(self._header)
                self._check(length)
                self._length = length
        return self._take(data)

    def buffer(self) -> memoryview | None:
        """The unfilled rest of the payload's buffer, to read into; None if there is none yet."""
        if self._body is None or self.done:
            return None
        return memoryview(self._body)[self._have :]

    def advance(self, nbytes: int) -> bytes | bytearray | None:
        """Count `nbytes` written into :meth:`buffer`; return the payload once complete."""
        if self._body is None or self.done or not 0 <= nbytes <= self._length - self._have:
            raise ValueError("advance() past the buffer")
        self._have += nbytes
        return self._complete()

    def _check(self, length: int) -> None:
        if length > self.max_message_size:
            raise LimitExceeded(length, self.max_message_size)

    def _take(self, data: bytes) -> bytes | bytearray | None:
        have, size = self._have, len(data)
        if have + size > self._length:
            raise ProtocolError("data after a complete v1 request")
        if self._body is not None:
            self._body[have : have + size] = data
        elif size:
            self._chunks.append(data)
            if (
                self._length >= DIRECT_READ_MIN
                and (have + size) * DIRECT_READ_RATIO >= self._length
                and have + size < self._length
            ):
                self._body = bytearray(self._length)
                self._body[: have + size] = b"".join(self._chunks)
                self._chunks = []
        self._have = have + size
        return self._complete()

    def _complete(self) -> bytes | bytearray | None:
        if self._have < self._length:
            return None
        self.done = True
        if self._body is not None:
            return self._body
        payload = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        return payload


class ReplyReader:
    """Collect a v1 reply, which runs to the end of the stream, within a limit."""

    __slots__ = ("_chunks", "_have", "max_reply_size")

    def __init__(self, max_reply_size: int | None = None) -> None:
        self.max_reply_size = max_reply_size
        self._chunks: list[bytes] = []
        self._have = 0

    def feed(self, data: bytes) -> None:
        """Consume `data`; raise LimitExceeded once the reply passes the limit."""
        self._have += len(data)
        if self.max_reply_size is not None and self._have > self.max_reply_size:
            raise LimitExceeded(self._have, self.max_reply_size)
        self._chunks.append(data)

    def finish(self) -> bytes:
        """Return the reply once the server has closed the stream."""
        return b"".join(self._chunks)


def pack_request_v2(request_id: int, payload: bytes | bytearray | memoryview) -> bytes:
    """Frame one v2 request."""
    return REQUEST_V2.pack(request_id, len(payload)) + payload


def timed_header_v2(request_id: int, deadline_ms: int, length: int) -> bytes:
    """The 12-byte header of a v2 request with a deadline (a control connection's frame)."""
    if not 0 <= deadline_ms <= MAX_DEADLINE_MS:
        raise ValueError(f"deadline_ms must be from 0 to {MAX_DEADLINE_MS}")
    return TIMED_V2.pack(request_id, CONTROL_BIT | KIND_TIMED << 24 | deadline_ms, length)


def pack_timed_request_v2(
    request_id: int, deadline_ms: int, payload: bytes | bytearray | memoryview
) -> bytes:
    """Frame one v2 request with a deadline (a control connection's frame)."""
    return timed_header_v2(request_id, deadline_ms, len(payload)) + payload


def pack_cancel_v2(request_id: int) -> bytes:
    """Frame one cancel of request `request_id` (a control connection's frame)."""
    return REQUEST_V2.pack(request_id, CONTROL_BIT | KIND_CANCEL << 24)


def pack_stats_v2(request_id: int) -> bytes:
    """Frame one stats request, answered as `request_id` (a control connection's frame)."""
    return REQUEST_V2.pack(request_id, CONTROL_BIT | KIND_STATS << 24)


def pack_reply_v2(request_id: int, status: Status, body: bytes | bytearray | memoryview) -> bytes:
    """Frame one v2 reply."""
    return REPLY_V2.pack(request_id, status, len(body)) + body


# A v2 session stops parsing frames while it holds this many bytes of replies
# not yet handed to the transport: refusals cost the server more than the
# client's frames (a 9-byte header and a message for 8 bytes in), so what a
# client that does not read can make us hold is bounded by this plus one read.
MAX_UNSENT = 256 * 1024

# The bodies of the refusals a session makes itself, one place for each.
SHUTTING_DOWN_MESSAGE = b"server stopping"
PIPELINE_FULL_MESSAGE = b"too many requests in flight"


class SessionV2:
    """The server's side of one v2 connection, without I/O (in the spirit of h11).

    Bytes in, events out: :meth:`receive_data` takes what the client sent,
    starting with its preamble, and returns the :class:`Request` events to run
    and the :class:`Refused` ones it has answered itself.  A reply in, bytes
    out: :meth:`reply` frames the outcome of a request, and
    :meth:`data_to_send` hands over every frame queued since the last call (our
    preamble first), as a list of buffers for one ``writelines``.

    Rules it keeps (docs/protocol.md states them for clients):

    1. The preamble must be :data:`MAGIC_V2`; anything else is a
       :class:`ProtocolError`.
    2. A request frame whose id is in flight (sent, not yet answered) is a
       connection error: :class:`ProtocolError`, and the caller resets the
       connection, as HTTP/2 does with a reused stream id.  Answering it
       would leave the client unable to tell which request a reply is for.
    3. A frame above ``max_message_size`` is refused (TOO_LARGE) from its
       header and its payload is skipped without being buffered.
    4. After :meth:`stop` every frame is refused (SHUTTING_DOWN); past
       ``max_pipeline`` requests in flight, OVERLOADED.  Refusals are
       answered at once and do not count toward the pipeline.
    5. Parsing pauses while :attr:`backlogged` (MAX_UNSENT bytes of replies
       not yet sent): the rest of what was fed waits, unparsed, until
       :meth:`data_to_send` empties the queue and ``receive_data(b"")`` is
       called again.  The caller stops reading meanwhile.
    6. Reply bodies of SPLIT_WRITE bytes or more are queued as their own
       buffer, after their header, never copied.
    7. After the :data:`MAGIC_V2_CONTROL` preamble (:attr:`control`), a
       length word with :data:`CONTROL_BIT` set is a control frame: a request
       with a deadline (a :class:`Timed` event, under the rules of a request)
       or a cancel (a :class:`Cancel` event for an id in flight; ignored for
       any other id: its one reply has gone already), or a stats request (a
       :class:`StatsRequest`, whose id must not be in flight, answered by the
       caller at once, refused with SHUTTING_DOWN after :meth:`stop`; it does
       not count toward the pipeline).  An unknown kind is a
       :class:`ProtocolError`, since its size cannot be known.  After the
       plain preamble those words mean a length, as they always did.
    """

    __slots__ = (
        "_buf",
        "_out",
        "_skip",
        "control",
        "eof",
        "greeted",
        "held",
        "in_flight",
        "max_message_size",
        "max_pipeline",
        "stopped",
        "unsent",
    )

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_pipeline: int = DEFAULT_MAX_PIPELINE,
    ) -> None:
        self.max_message_size = max_message_size
        self.max_pipeline = max_pipeline
        # The requests handed out and not yet answered: id -> what the caller keeps
        # for it (None until it says; the server keeps its job here, so that one
        # dict, not two, is touched per request).
        self.in_flight: dict[int, Any] = {}
        self.greeted = False  # the client's preamble has arrived (ours is queued)
        self.control = False  # ... and it was MAGIC_V2_CONTROL: control frames are allowed
        self.stopped = False  # stop(): refuse every new frame
        self.eof = False  # the client has half-closed: no more frames will come
        self.held = False  # complete frames wait unparsed behind a backlog (rule 5)
        self.unsent = 0  # bytes queued in _out
        self._out: list[BytesLike] = []
        self._buf = bytearray()
        self._skip = 0

    @property
    def in_frame(self) -> bool:
        """True while part of a frame (or of the preamble) is buffered or being skipped."""
        return bool(self._buf) or self._skip > 0

    @property
    def backlogged(self) -> bool:
        """True while parsing waits for queued replies to be sent (rule 5)."""
        return self.unsent >= MAX_UNSENT

    @property
    def finished(self) -> bool:
        """True once nothing more will be answered: stopped or at EOF, and nothing in flight.

        At EOF, frames still waiting behind a backlog are parsed first; a frame
        left incomplete by the EOF is never answered.
        """
        return not self.in_flight and (self.stopped or (self.eof and not self.held))

    def receive_data(self, data: BytesLike) -> list[Event]:
        """Consume `data`; return the requests to run, the cancels, and the refusals answered."""
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        buf = self._buf
        buf += data
        pos = 0
        if not self.greeted:
            have = bytes(buf[:HEADER_SIZE])
            if len(buf) < HEADER_SIZE:
                if MAGIC_V2[: len(buf)] != have and MAGIC_V2_CONTROL[: len(buf)] != have:
                    raise ProtocolError("malformed v2 preamble")
                return []
            if have not in (MAGIC_V2, MAGIC_V2_CONTROL):
                raise ProtocolError("malformed v2 preamble")
            self.greeted = True
            self.control = have == MAGIC_V2_CONTROL
            self._queue(have)  # the client's own preamble: it says we know its frames
            pos = HEADER_SIZE
        events: list[Event] = []
        pos = self._parse(buf, pos, events)
        del buf[:pos]
        return events

    def receive_eof(self) -> None:
        """The client half-closed: answer what it sent, then the connection can close."""
        self.eof = True

    def stop(self) -> None:
        """The server is stopping: refuse every frame from now on (SHUTTING_DOWN)."""
        self.stopped = True

    def reply(self, request_id: int, status: Status, body: BytesLike) -> None:
        """Request `request_id` ended with `status`: queue its reply frame."""
        self.in_flight.pop(request_id, None)
        self._queue_reply(request_id, status, body)

    def data_to_send(self) -> list[BytesLike]:
        """Every frame queued since the last call, to write in order."""
        out, self._out = self._out, []
        self.unsent = 0
        return out

    def _parse(self, buf: bytearray, pos: int, events: list[Event]) -> int:
        end = len(buf)
        in_flight, limit = self.in_flight, self.max_message_size
        # Slices of a view copy once; slices of the bytearray would copy twice.
        with memoryview(buf) as view:
            while end - pos >= REQUEST_V2.size and self.unsent < MAX_UNSENT:
                request_id, length = REQUEST_V2.unpack_from(buf, pos)
                if request_id in in_flight and not (self.control and length & CONTROL_BIT):
                    raise ProtocolError(f"request id {request_id} reused while in flight")
                deadline = -1
                start = pos + REQUEST_V2.size
                if length > limit:
                    # A control frame is above every limit: parsed here, off the common path.
                    if self.control and length & CONTROL_BIT:
                        kind = length >> 24 & 0x7F
                        if kind == KIND_CANCEL:
                            pos = start
                            if request_id in in_flight:
                                events.append(Cancel(request_id))
                            continue
                        if kind == KIND_STATS:
                            if request_id in in_flight:
                                raise ProtocolError(
                                    f"request id {request_id} reused while in flight"
                                )
                            pos = start
                            if self.stopped:
                                self._refuse(
                                    events,
                                    request_id,
                                    Status.SHUTTING_DOWN,
                                    SHUTTING_DOWN_MESSAGE.decode(),
                                )
                            else:
                                events.append(StatsRequest(request_id))
                            continue
                        if kind != KIND_TIMED:
                            raise ProtocolError(f"unknown control frame kind {kind}")
                        if request_id in in_flight:
                            raise ProtocolError(f"request id {request_id} reused while in flight")
                        if end - pos < TIMED_V2.size:
                            break
                        deadline = length & MAX_DEADLINE_MS
                        (length,) = HEADER.unpack_from(buf, start)
                        start = pos + TIMED_V2.size
                    if length > limit:
                        self._refuse(
                            events,
                            request_id,
                            Status.TOO_LARGE,
                            f"request of {length} bytes exceeds the limit of {limit} bytes",
                        )
                        dropped = min(length, end - start)
                        pos = start + dropped
                        self._skip = length - dropped
                        continue
                if end - start < length:
                    break
                pos = start + length
                if self.stopped:
                    self._refuse(
                        events, request_id, Status.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE.decode()
                    )
                elif len(in_flight) >= self.max_pipeline:
                    self._refuse(
                        events, request_id, Status.OVERLOADED, PIPELINE_FULL_MESSAGE.decode()
                    )
                else:
                    in_flight[request_id] = None
                    if deadline < 0:
                        events.append(Request(request_id, bytes(view[start:pos])))
                    else:
                        events.append(Timed(request_id, bytes(view[start:pos]), deadline))
        # Stopped by the backlog, not for want of bytes: the rest waits.
        self.held = self.unsent >= MAX_UNSENT and end - pos >= REQUEST_V2.size
        return pos

    def _refuse(self, events: list[Event], request_id: int, status: Status, message: str) -> None:
        events.append(Refused(request_id, status, message))
        self._queue_reply(request_id, status, message.encode())

    def _queue_reply(self, request_id: int, status: Status, body: BytesLike) -> None:
        if len(body) >= SPLIT_WRITE:
            self._out.append(REPLY_V2.pack(request_id, status, len(body)))
            self._out.append(body)
        else:
            self._out.append(pack_reply_v2(request_id, status, body))
        self.unsent += REPLY_V2.size + len(body)

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self.unsent += len(data)


class ReplyReaderV2:
    """The client's parser for a v2 connection: the server's preamble, then replies.

    `preamble` is the one the client sent (:data:`MAGIC_V2`, or
    :data:`MAGIC_V2_CONTROL`), which the server must answer with.
    """

    __slots__ = ("_buf", "greeted", "max_reply_size", "preamble")

    def __init__(self, max_reply_size: int | None = None, preamble: bytes = MAGIC_V2) -> None:
        self.max_reply_size = max_reply_size
        self.preamble = preamble
        self.greeted = False
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Reply]:
        """Consume `data`; raise ProtocolError or LimitExceeded on a broken stream."""
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        if not self.greeted:
            preamble = self.preamble
            if end < HEADER_SIZE:
                if preamble[:end] != bytes(buf):
                    raise ProtocolError("the server does not speak protocol v2")
                return []
            if buf[:HEADER_SIZE] != preamble:
                if preamble == MAGIC_V2_CONTROL and buf[:HEADER_SIZE] == MAGIC_V2:
                    raise ProtocolError("the server does not take control frames")
                raise ProtocolError("the server does not speak protocol v2")
            self.greeted = True
            pos = HEADER_SIZE
        replies: list[Reply] = []
        with memoryview(buf) as view:
            while end - pos >= REPLY_V2.size:
                request_id, status, length = REPLY_V2.unpack_from(buf, pos)
                if self.max_reply_size is not None and length > self.max_reply_size:
                    raise LimitExceeded(length, self.max_reply_size)
                start = pos + REPLY_V2.size
                if end - start < length:
                    break
                try:
                    code = Status(status)
                except ValueError:
                    raise ProtocolError(f"unknown reply status {status}") from None
                replies.append(Reply(request_id, code, bytes(view[start : start + length])))
                pos = start + length
        del buf[:pos]
        return replies

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
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "HEADER_SIZE",
    "MAGIC_V2",
    "MAX_LENGTH",
    "MAX_MESSAGE_SIZE_LIMIT",
    "LimitExceeded",
    "ProtocolError",
    "Refused",
    "Reply",
    "ReplyReader",
    "ReplyReaderV2",
    "Request",
    "RequestReader",
    "ServerReader",
    "Status",
    "pack",
    "pack_reply_v2",
    "pack_request_v2",
    "to_bytes",
]

HEADER = struct.Struct("!I")
HEADER_SIZE = HEADER.size
MAX_LENGTH = 0xFFFFFFFF
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
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


class Request(NamedTuple):
    """A complete request (v1 requests have id 0)."""

    id: int
    payload: bytes | bytearray


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
    """Per-connection bounds that the server enforces: sizes, counts and deadlines."""

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
        max_pipeline: int = 128,
        idle_timeout: float = 300.0,
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


def pack_reply_v2(request_id: int, status: Status, body: bytes | bytearray | memoryview) -> bytes:
    """Frame one v2 reply."""
    return REPLY_V2.pack(request_id, status, len(body)) + body


class ServerReader:
    """The server's parser for a connection of either version.

    The first four bytes decide: :data:`MAGIC_V2` makes it a v2 connection,
    anything else is a v1 length.  :meth:`feed` returns the events that the
    new data completes: :class:`Request` and, in v2, :class:`Refused`.
    """

    __slots__ = ("_buf", "_skip", "_v1", "max_message_size", "version")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self.version = 0  # unknown until four bytes have arrived
        self._v1: RequestReader | None = None
        self._buf = bytearray()
        self._skip = 0

    @property
    def in_frame(self) -> bool:
        """True while part of a request (or of the preamble) is buffered or being skipped."""
        if self.version == 1:
            return self._v1 is not None and self._v1.started and not self._v1.done
        return bool(self._buf) or self._skip > 0

    def feed(self, data: bytes) -> list[Request | Refused]:
        """Consume `data`; raise ProtocolError (v1 only) when the stream is unusable."""
        if self.version == 1:
            if self._v1 is None:  # the request came whole in its first read
                if data:
                    raise ProtocolError("data after a complete v1 request")
                return []
            payload = self._v1.feed(data)
            return [] if payload is None else [Request(0, payload)]
        if self.version == 0:
            if not self._buf and len(data) >= HEADER_SIZE and data[:HEADER_SIZE] != MAGIC_V2:
                (length,) = HEADER.unpack_from(data)
                if length == len(data) - HEADER_SIZE and length <= self.max_message_size:
                    self.version = 1  # the usual case, with no reader to build
                    return [Request(0, data[HEADER_SIZE:])]
                return self._become_v1(data)
            self._buf += data
            if len(self._buf) < HEADER_SIZE:
                return []
            if self._buf[:HEADER_SIZE] != MAGIC_V2:
                data, self._buf = bytes(self._buf), bytearray()
                return self._become_v1(data)
            self.version = 2
            del self._buf[:HEADER_SIZE]
            data = b""
        return self._feed_v2(data)

    def buffer(self) -> memoryview | None:
        """Where the rest of a large v1 payload can be read to directly (see RequestReader)."""
        return None if self._v1 is None else self._v1.buffer()

    def advance(self, nbytes: int) -> list[Request | Refused]:
        """Count `nbytes` written into :meth:`buffer`; return the request once complete."""
        if self._v1 is None:
            raise ValueError("advance() without a buffer")
        payload = self._v1.advance(nbytes)
        return [] if payload is None else [Request(0, payload)]

    def _become_v1(self, data: bytes) -> list[Request | Refused]:
        self.version = 1
        self._v1 = RequestReader(self.max_message_size)
        payload = self._v1.feed(data)
        return [] if payload is None else [Request(0, payload)]

    def _feed_v2(self, data: bytes) -> list[Request | Refused]:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        buf = self._buf
        buf += data
        events: list[Request | Refused] = []
        pos, end = 0, len(buf)
        # Slices of a view copy once; slices of the bytearray would copy twice.
        with memoryview(buf) as view:
            while end - pos >= REQUEST_V2.size:
                request_id, length = REQUEST_V2.unpack_from(buf, pos)
                if length > self.max_message_size:
                    events.append(
                        Refused(
                            request_id,
                            Status.TOO_LARGE,
                            f"request of {length} bytes exceeds the limit of "
                            f"{self.max_message_size} bytes",
                        )
                    )
                    pos += REQUEST_V2.size
                    dropped = min(length, end - pos)
                    pos += dropped
                    self._skip = length - dropped
                    continue
                start = pos + REQUEST_V2.size
                if end - start < length:
                    break
                events.append(Request(request_id, bytes(view[start : start + length])))
                pos = start + length
        del buf[:pos]
        return events


class ReplyReaderV2:
    """The client's parser for a v2 connection: the server's preamble, then replies."""

    __slots__ = ("_buf", "greeted", "max_reply_size")

    def __init__(self, max_reply_size: int | None = None) -> None:
        self.max_reply_size = max_reply_size
        self.greeted = False
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Reply]:
        """Consume `data`; raise ProtocolError or LimitExceeded on a broken stream."""
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        if not self.greeted:
            if end < HEADER_SIZE:
                if MAGIC_V2[:end] != bytes(buf):
                    raise ProtocolError("the server does not speak protocol v2")
                return []
            if buf[:HEADER_SIZE] != MAGIC_V2:
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

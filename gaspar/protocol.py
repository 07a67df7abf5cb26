"""Wire protocol v1, without I/O.

A request is a 4-byte unsigned big-endian length followed by that many bytes.
The reply is the reply bytes; the server then closes the connection (or resets
it when the request failed).

This module only turns bytes into messages and messages into bytes, so the
server, every client and a fuzzer can share it.  Rules it keeps:

1. A declared length is checked against the limit before any byte of the
   payload is buffered, so a 4-byte header cannot make us allocate 4 GiB.
2. Buffering is linear: chunks are appended once and joined once, never
   re-sliced per chunk, so a client trickling one byte at a time costs O(n).
3. A reader is single-use: one request per connection, as in v1.
"""

from __future__ import annotations

import struct

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "HEADER_SIZE",
    "MAX_LENGTH",
    "LimitExceeded",
    "ProtocolError",
    "ReplyReader",
    "RequestReader",
    "pack",
    "to_bytes",
]

HEADER = struct.Struct("!I")
HEADER_SIZE = HEADER.size
MAX_LENGTH = 0xFFFFFFFF
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

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


class RequestReader:
    """Parse one v1 request from the bytes a connection delivers.

    Feed it data with :meth:`feed`; it returns the payload once complete and
    ``None`` while more is needed.  Bytes after a complete request raise
    :class:`ProtocolError`, since v1 carries one request per connection.
    """

    __slots__ = ("_chunks", "_have", "_header", "_length", "done", "max_message_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._header = b""
        self._length = -1
        self._chunks: list[bytes] = []
        self._have = 0
        self.done = False

    @property
    def started(self) -> bool:
        """True once any byte of the request has arrived."""
        return bool(self._header) or self._length >= 0

    def feed(self, data: bytes) -> bytes | None:
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

    def _check(self, length: int) -> None:
        if length > self.max_message_size:
            raise LimitExceeded(length, self.max_message_size)

    def _take(self, data: bytes) -> bytes | None:
        if self._have + len(data) > self._length:
            raise ProtocolError("data after a complete v1 request")
        if data:
            self._chunks.append(data)
            self._have += len(data)
        if self._have < self._length:
            return None
        self.done = True
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

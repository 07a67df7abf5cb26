"""Messages between the dispatcher and its workers, whatever link carries them (no I/O here).

Every message has a head, a one-byte kind, an 8-byte job id and a 4-byte
number, and a body:

    worker -> dispatcher   READY  (id 0)   0       info: JSON {pid, host}
    dispatcher -> worker   JOB    id       0       payload
    dispatcher -> worker   BATCH  first id count   count x (id, 4-byte length, payload)
    worker -> dispatcher   DONE   id       micros  reply
    worker -> dispatcher   FAILED id       micros  error text, "TypeName: message" (UTF-8)
    worker -> dispatcher   GOODBYE (id 0)  0       empty
    worker -> dispatcher   ALIVE  (id 0)   0       empty

A worker runs the jobs of a BATCH in order and answers each on its own, as
soon as it is done; `micros` is the time the handler took.  A reply names the
job it answers, and the dispatcher drops any reply whose id is not the job it
expects next from that worker, so replies can never cross.

A worker that has said GOODBYE answers what it holds and leaves; a local one
leaves once its link ends, which the producer does as soon as that worker is
out of the pool (so nothing can be on its way to it).  An idle local worker
says ALIVE every third of its liveness timeout, so that one that hangs while
idle (a thread holding the GIL, a stuck C extension, SIGSTOP) is noticed;
a busy worker sends nothing until its reply (its request's timeout covers it).

On a local link (a Unix stream socket, gaspar/links.py) a message is a frame:
the body's length (4 bytes, big-endian), the head, the body.  :func:`frame`
makes one (a large body stays a buffer of its own, never joined to its head)
and :class:`FrameReader` reads them from a stream into buffers it reuses,
refusing a frame larger than its bound before a byte of its body is stored.
The ZeroMQ link (gaspar/link_zmq.py) carries the head and the body in one or
two ZeroMQ frames instead.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import NamedTuple

READY = b"R"
JOB = b"J"
DONE = b"D"
FAILED = b"F"
BATCH = b"B"
GOODBYE = b"G"
ALIVE = b"A"
KINDS = frozenset((READY, JOB, DONE, FAILED, BATCH, GOODBYE, ALIVE))

_HEAD = struct.Struct("!cQI")
HEAD_SIZE = _HEAD.size
_ITEM = struct.Struct("!QI")
ITEM_SIZE = _ITEM.size
MAX_NUMBER = 2**32 - 1
# Bodies at least this large travel as a buffer of their own, never copied to
# be joined to their head (and a reader stores them in a buffer of their size).
SPLIT_BODY = 64 * 1024
# Batches: at most this many jobs and this many payload bytes (each job's
# payload below SPLIT_BODY); the dispatcher sizes them (gaspar/dispatcher.py).
BATCH_MAX = 16
BATCH_BYTES = 64 * 1024
# A frame on a stream: the body's length, then the head.
_FRAME = struct.Struct("!Ic8sI")
FRAME_HEAD = _FRAME.size
MAX_BODY = 2**32 - 1
# What a FrameReader keeps for small frames; it holds any frame below SPLIT_BODY.
READ_BUFFER = 256 * 1024
# The largest body a reader that reuses its large buffer keeps a buffer for.
REUSE_MAX = 4 << 20

Message = tuple[bytes, bytes, int, bytes | memoryview]


class FrameError(ValueError):
    """The stream broke the framing: no message after it can be trusted."""


def job_id(n: int) -> bytes:
    """Encode a job number as the 8-byte id carried in every head."""
    return struct.pack("!Q", n)


def head(kind: bytes, jid: bytes, number: int = 0) -> bytes:
    """A message's head (without a frame's length)."""
    return kind + jid + (number if number < MAX_NUMBER else MAX_NUMBER).to_bytes(4, "big")


def max_job_body(max_message_size: int) -> int:
    """The largest body a worker may be sent: one request, or a batch of small ones."""
    return max(max_message_size, BATCH_BYTES + BATCH_MAX * ITEM_SIZE)


def frame(
    kind: bytes, jid: bytes, body: bytes | bytearray | memoryview, number: int = 0
) -> list[bytes | bytearray | memoryview]:
    """One message as a frame for a stream: one buffer, or head and body when the body is large."""
    size = body.nbytes if isinstance(body, memoryview) else len(body)
    if size > MAX_BODY:
        raise ValueError(f"a body of {size} bytes does not fit a frame")
    prefix = size.to_bytes(4, "big") + head(kind, jid, number)
    if size < SPLIT_BODY:
        return [prefix + body]
    return [prefix, body]


class FrameReader:
    """Frames from a byte stream, sans-I/O: read into :meth:`get_buffer`, then :meth:`feed`.

    Small frames are gathered in one buffer of READ_BUFFER bytes, reused for the
    reader's life; a body of SPLIT_BODY bytes or more is read straight into a
    buffer of its own size, which the message then carries (as a memoryview).
    With `reuse_large`, that buffer is kept for the next large body (up to
    REUSE_MAX bytes), so the message's view is valid only until the next read:
    for a reader whose caller copies the body at once (a worker hands its
    handler bytes), which spares a fresh allocation, zeroed, per large frame.
    A declared body over `max_body`, or a kind not in `kinds`, is a FrameError.
    """

    __slots__ = (
        "_big",
        "_big_have",
        "_big_head",
        "_buf",
        "_end",
        "_start",
        "_spare",
        "_view",
        "kinds",
        "max_body",
        "reuse_large",
    )

    def __init__(
        self, max_body: int, kinds: frozenset[bytes] = KINDS, reuse_large: bool = False
    ) -> None:
        self.max_body = max_body
        self.kinds = kinds
        self.reuse_large = reuse_large
        self._spare = bytearray()
        self._buf = bytearray(READ_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._big: memoryview | None = None
        self._big_have = 0
        self._big_head: tuple[bytes, bytes, int] = (b"", b"", 0)

    @property
    def pending(self) -> int:
        """Bytes of a frame begun but not complete (a truncated frame at EOF)."""
        if self._big is not None:
            return FRAME_HEAD + self._big_have
        return self._end - self._start

    def get_buffer(self) -> memoryview:
        """Where the next bytes of the stream go (call :meth:`next` until None first)."""
        if self._big is not None:
            return self._big[self._big_have :]
        if len(self._buf) - self._end < SPLIT_BODY + FRAME_HEAD and self._start:
            # What is left is less than one frame: move it to the front.
            rest = self._end - self._start
            self._buf[:rest] = self._view[self._start : self._end]
            self._start, self._end = 0, rest
        return self._view[self._end :]

    def feed(self, n: int) -> None:
        """`n` bytes were written into the last :meth:`get_buffer`."""
        if self._big is not None:
            self._big_have += n
        else:
            self._end += n

    def next(self) -> Message | None:
        """The next complete message, or None until more bytes come; FrameError if broken."""
        big = self._big
        if big is not None:
            if self._big_have < len(big):
                return None
            self._big = None
            kind, jid, number = self._big_head
            return kind, jid, number, big
        start = self._start
        avail = self._end - start
        if avail < FRAME_HEAD:
            return None
        size, kind, jid, number = _FRAME.unpack_from(self._buf, start)
        if kind not in self.kinds:
            raise FrameError(f"unknown message kind {kind!r}")
        if size > self.max_body:
            raise FrameError(f"a frame of {size} bytes, over the bound of {self.max_body}")
        begin = start + FRAME_HEAD
        if size >= SPLIT_BODY:
            if not self.reuse_large or size > REUSE_MAX:
                buffer = memoryview(bytearray(size))
            else:
                if len(self._spare) < size:
                    self._spare = bytearray(size)
                buffer = memoryview(self._spare)[:size]
            have = min(size, avail - FRAME_HEAD)
            buffer[:have] = self._view[begin : begin + have]
            # Whatever follows the body (only once it is all here) stays for next().
            self._start = begin + have
            if self._start == self._end:
                self._start = self._end = 0
            self._big, self._big_have, self._big_head = buffer, have, (kind, jid, number)
            return self.next()
        if avail - FRAME_HEAD < size:
            return None
        end = begin + size
        body = self._view[begin:end].tobytes()
        if end == self._end:
            self._start = self._end = 0
        else:
            self._start = end
        return kind, jid, number, body


def pack_batch(jobs: list[tuple[bytes, bytes | bytearray]]) -> bytes:
    """The body of a BATCH: each job's id, payload length and payload, in order."""
    parts: list[bytes | bytearray] = []
    for jid, payload in jobs:
        parts.append(jid + len(payload).to_bytes(4, "big"))
        parts.append(payload)
    return b"".join(parts)


def unpack_batch(body: bytes, count: int) -> list[tuple[bytes, bytes]]:
    """Split a BATCH body into `count` (job id, payload); ValueError when malformed."""
    jobs = []
    offset, end = 0, len(body)
    for _ in range(count):
        if end - offset < _ITEM.size:
            raise ValueError("batch shorter than its count")
        size = _ITEM.unpack_from(body, offset)[1]
        start = offset + _ITEM.size
        if end - start < size:
            raise ValueError("batch item longer than the batch")
        jobs.append((body[offset : offset + 8], body[start : start + size]))
        offset = start + size
    if offset != end:
        raise ValueError("bytes after the last item of a batch")
    return jobs


def ready_info() -> bytes:
    """Describe this worker process for its READY message."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()


class ReadyInfo(NamedTuple):
    """What a worker says of itself in its READY message."""

    pid: int
    host: str


def parse_ready(info: bytes) -> ReadyInfo:
    """Decode a READY message's info; raise ValueError (only) when malformed."""
    data = json.loads(info)  # a JSONDecodeError or UnicodeDecodeError is a ValueError
    if not isinstance(data, dict):
        raise ValueError("READY info is not an object")
    pid, host = data.get("pid"), data.get("host", "")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise ValueError(f"READY info without a valid pid: {pid!r}")
    if not isinstance(host, str):
        raise ValueError(f"READY info with a host that is not a string: {host!r}")
    return ReadyInfo(pid, host)

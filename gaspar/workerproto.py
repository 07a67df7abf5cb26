"""Messages between the dispatcher (a ZeroMQ ROUTER) and its workers (DEALERs).

A message is one or two frames.  The first, the head, is a one-byte kind, an
8-byte job id and a 4-byte number, followed by the body when the body is
small; a large body travels as a second frame instead, so that it is never
copied to be joined.  The ROUTER prepends the worker's identity on receipt and
strips it on send; workers never see identities.

    worker -> dispatcher   READY  (id 0)   0       info: JSON {pid, host}
    dispatcher -> worker   JOB    id       0       payload
    dispatcher -> worker   BATCH  first id count   count x (id, 4-byte length, payload)
    worker -> dispatcher   DONE   id       micros  reply
    worker -> dispatcher   FAILED id       micros  error text, "TypeName: message" (UTF-8)

A worker runs the jobs of a BATCH in order and answers each on its own, as
soon as it is done; `micros` is the time the handler took.  A reply names the
job it answers, and the dispatcher drops any reply whose id is not the job it
expects next from that worker, so replies can never cross.

Few frames and plain-int flags matter here: this is the hot path, and each
frame or flag-enum operation in pyzmq costs microseconds.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import NamedTuple

import zmq

READY = b"R"
JOB = b"J"
DONE = b"D"
FAILED = b"F"
BATCH = b"B"

_HEAD = struct.Struct("!cQI")
HEAD_SIZE = _HEAD.size
_ITEM = struct.Struct("!QI")
MAX_NUMBER = 2**32 - 1
# Bodies at least this large go in their own frame, sent without a copy.
SPLIT_BODY = 64 * 1024
SNDMORE = int(zmq.SNDMORE)
RCVMORE = int(zmq.RCVMORE)
NOBLOCK = int(zmq.NOBLOCK)


def job_id(n: int) -> bytes:
    """Encode a job number as the 8-byte id carried in every head."""
    return struct.pack("!Q", n)


def send(
    sock: zmq.Socket[bytes],
    kind: bytes,
    jid: bytes,
    body: bytes | bytearray | memoryview,
    number: int = 0,
) -> None:
    """Send one message (after any identity frame the caller sent with SNDMORE)."""
    size = body.nbytes if isinstance(body, memoryview) else len(body)
    head = kind + jid + (number if number < MAX_NUMBER else MAX_NUMBER).to_bytes(4, "big")
    if size < SPLIT_BODY:
        sock.send(head + body)
    else:
        sock.send(head, SNDMORE)
        sock.send(body, copy=False)


def split(
    first: bytes, sock: zmq.Socket[bytes], flags: int = 0, copy: bool = True
) -> tuple[bytes, bytes, int, bytes | memoryview]:
    """Parse a message whose first frame is `first`: (kind, job id, number, body).

    Reads the body frame when there is one (with copy=False, as a view of the
    ZeroMQ message, which saves copying a large body once more); raises
    ValueError for a message of the wrong shape, after draining its frames.
    """
    body: bytes | memoryview = first[HEAD_SIZE:]
    if sock.get(RCVMORE):
        body = sock.recv(flags) if copy else sock.recv(flags, copy=False).buffer
        if sock.get(RCVMORE):
            while sock.get(RCVMORE):
                sock.recv(flags)
            raise ValueError("message of more than two frames")
        if len(first) != HEAD_SIZE:
            raise ValueError("head with an inline body followed by a body frame")
    if len(first) < HEAD_SIZE:
        raise ValueError("message head too short")
    return first[:1], first[1:9], int.from_bytes(first[9:HEAD_SIZE], "big"), body


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

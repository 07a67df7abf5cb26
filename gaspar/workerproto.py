"""Messages between the dispatcher (a ZeroMQ ROUTER) and its workers (DEALERs).

A message is one or two frames.  The first, the head, is a one-byte kind and
an 8-byte job id, followed by the body when the body is small; a large body
travels as a second frame instead, so that it is never copied to be joined.
The ROUTER prepends the worker's identity on receipt and strips it on send;
workers never see identities.

    worker -> dispatcher   READY  (id 0)  info: JSON {pid, host}
    dispatcher -> worker   JOB    id      payload
    worker -> dispatcher   DONE   id      reply
    worker -> dispatcher   FAILED id      error text, "TypeName: message" (UTF-8)

A reply names the job it answers, and the dispatcher drops any reply whose id
is not the job it gave that worker, so replies can never cross.

Few frames and plain-int flags matter here: this is the hot path, and each
frame or flag-enum operation in pyzmq costs microseconds.
"""

from __future__ import annotations

import json
import os
import socket
import struct

import zmq

READY = b"R"
JOB = b"J"
DONE = b"D"
FAILED = b"F"

_HEAD = struct.Struct("!cQ")
HEAD_SIZE = _HEAD.size
# Bodies at least this large go in their own frame, sent without a copy.
SPLIT_BODY = 64 * 1024
SNDMORE = int(zmq.SNDMORE)
RCVMORE = int(zmq.RCVMORE)
NOBLOCK = int(zmq.NOBLOCK)


def job_id(n: int) -> bytes:
    """Encode a job number as the 8-byte id carried in every head."""
    return struct.pack("!Q", n)


def send(
    sock: zmq.Socket[bytes], kind: bytes, jid: bytes, body: bytes | bytearray | memoryview
) -> None:
    """Send one message (after any identity frame the caller sent with SNDMORE)."""
    size = body.nbytes if isinstance(body, memoryview) else len(body)
    if size < SPLIT_BODY:
        sock.send(kind + jid + body)
    else:
        sock.send(kind + jid, SNDMORE)
        sock.send(body, copy=False)


def split(
    first: bytes, sock: zmq.Socket[bytes], flags: int = 0, copy: bool = True
) -> tuple[bytes, bytes, bytes | memoryview]:
    """Parse a message whose first frame is `first`: (kind, job id, body).

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
    return first[:1], first[1:HEAD_SIZE], body


def ready_info() -> bytes:
    """Describe this worker process for its READY message."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()


def parse_ready(info: bytes) -> dict[str, object]:
    """Decode a READY message's info; raise ValueError when malformed."""
    data = json.loads(info)
    if not isinstance(data, dict):
        raise ValueError("READY info is not an object")
    return data

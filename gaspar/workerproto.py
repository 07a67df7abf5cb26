"""Frames between the dispatcher (a ZeroMQ ROUTER) and its workers (DEALERs).

Every message is a multipart ZeroMQ message whose first frame is a one-byte
kind.  The ROUTER prepends the worker's identity on receipt and strips it on
send; workers never see identities.

    worker -> dispatcher   READY  info (JSON: pid, host)
    dispatcher -> worker   JOB    job id (8 bytes), payload
    worker -> dispatcher   DONE   job id, reply
    worker -> dispatcher   FAILED job id, error text (UTF-8)

A reply names the job it answers, and the dispatcher drops any reply whose id
is not the job it gave that worker, so replies can never cross.
"""

from __future__ import annotations

import json
import os
import socket
import struct

READY = b"R"
JOB = b"J"
DONE = b"D"
FAILED = b"F"

_ID = struct.Struct("!Q")


def job_id(n: int) -> bytes:
    """Encode a job number as the 8-byte id carried in JOB, DONE and FAILED."""
    return _ID.pack(n)


def ready_info() -> bytes:
    """Describe this worker process for its READY message."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()


def parse_ready(info: bytes) -> dict[str, object]:
    """Decode a READY message's info frame; raise ValueError when malformed."""
    data = json.loads(info)
    if not isinstance(data, dict):
        raise ValueError("READY info is not an object")
    return data

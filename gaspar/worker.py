"""The worker process: runs the consumer's handler on jobs from the dispatcher.

A local worker is forked by the supervisor with one end of a Unix socket pair
whose other end the producer holds (gaspar/links.py): no path, no handshake,
no ZeroMQ, no thread.  It runs ``setup()``, says READY on its socket, then
answers one job at a time (the jobs of a batch in order, each answered as
soon as it is done), in a blocking loop that reads into one reused buffer.
It leaves when its link ends (EOF: the producer has gone or dropped it), when
it is sent SIGTERM, or when its supervisor dies (the kernel kills it then, on
Linux, by a parent-death signal).

:func:`run` is the handler's side of every kind of link: the ZeroMQ worker
loop (gaspar/link_zmq.py) runs jobs with it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
import traceback

from . import workerproto as wp
from .consumer import Consumer
from .exitcodes import EXIT_BOOT_ERROR, EXIT_ERROR, EXIT_OK, MAX_SETUP_ERROR

log = logging.getLogger("gaspar.worker")

# The most of a handler's error text, in bytes, that a FAILED reply carries.
MAX_ERROR_TEXT = 65536
# A worker's reader takes JOB and BATCH frames only.
JOB_KINDS = frozenset((wp.JOB, wp.BATCH))

Frames = list[bytes | bytearray | memoryview]


def describe_error(exc: BaseException) -> str:
    """One-line summary of a handler exception for the dispatcher's log and client."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def error_bytes(exc: BaseException, limit: int) -> bytes:
    """:func:`describe_error` as UTF-8, cut to `limit` bytes on a character boundary."""
    data = describe_error(exc).encode("utf-8", "replace")
    return data if len(data) <= limit else data[:limit].decode("utf-8", "ignore").encode()


def main(consumer: Consumer, link: socket.socket, max_job: int, report: int | None = None) -> int:
    """Body of a freshly forked worker process; returns its exit code.

    `link` is the worker's end of its socket pair; `max_job` bounds the body
    of a job frame.  SIGINT is ignored (a terminal's Ctrl-C reaches the whole
    process group and the producer decides how to stop); SIGTERM keeps its
    default, since the supervisor sends it only to workers it is retiring.  If
    setup() raises, its "TypeName: message" is written to the descriptor
    `report` (the supervisor's pipe), which is closed either way before serving.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        consumer.setup()
    except Exception as exc:
        log.error("setup() failed in worker %d: %s", os.getpid(), traceback.format_exc().rstrip())
        if report is not None:
            with contextlib.suppress(OSError):
                os.write(report, error_bytes(exc, MAX_SETUP_ERROR))
        return EXIT_BOOT_ERROR
    finally:
        if report is not None:
            os.close(report)
    try:
        serve(consumer, link, max_job)
    except Exception:
        log.critical("worker %d failed: %s", os.getpid(), traceback.format_exc().rstrip())
        return EXIT_ERROR
    return EXIT_OK


def serve(consumer: Consumer, link: socket.socket, max_job: int) -> None:
    """Say READY on `link`, then answer its jobs until it ends."""
    link.setblocking(True)
    reader = wp.FrameReader(max_job, JOB_KINDS, reuse_large=True)
    send_frames(link, wp.frame(wp.READY, wp.job_id(0), wp.ready_info()))
    try:
        while True:
            n = link.recv_into(reader.get_buffer())
            if not n:
                if reader.pending:
                    raise wp.FrameError("the link ended inside a frame")
                log.debug("link closed; worker %d leaving", os.getpid())
                return
            reader.feed(n)
            while (message := reader.next()) is not None:
                kind, jid, count, body = message
                if kind == wp.JOB:
                    send_frames(link, run(consumer, jid, as_bytes(body)))
                else:
                    for item, payload in wp.unpack_batch(as_bytes(body), count):
                        send_frames(link, run(consumer, item, payload))
    except ConnectionResetError:
        log.debug("link reset; worker %d leaving", os.getpid())
    finally:
        link.close()


def as_bytes(body: bytes | memoryview) -> bytes:
    """A job's payload as the handler takes it: bytes."""
    return body if isinstance(body, bytes) else body.tobytes()


def send_frames(link: socket.socket, frames: Frames) -> None:
    """Write one frame, given as one buffer or as head and body, in full."""
    if len(frames) == 1:
        link.sendall(frames[0])
        return
    head, body = frames
    body = memoryview(body).cast("B")
    sent = link.sendmsg([head, body])
    if sent < len(head):
        link.sendall(head[sent:])
        sent = len(head)
    if sent - len(head) < body.nbytes:
        link.sendall(body[sent - len(head) :])


def run(consumer: Consumer, jid: bytes, payload: bytes) -> Frames:
    """Run the handler on one job: its DONE or FAILED message, as frames."""
    started = time.perf_counter()
    try:
        reply = consumer.handle(payload)
        if not isinstance(reply, bytes | bytearray | memoryview | str):
            raise TypeError(f"handler returned {type(reply).__name__}; expected bytes-like or str")
        data = reply.encode("utf-8") if isinstance(reply, str) else reply
    except Exception as exc:
        micros = int((time.perf_counter() - started) * 1e6)
        log.error("handler raised in worker %d: %s", os.getpid(), traceback.format_exc().rstrip())
        return wp.frame(wp.FAILED, jid, error_bytes(exc, MAX_ERROR_TEXT), micros)
    micros = int((time.perf_counter() - started) * 1e6)
    try:
        return wp.frame(wp.DONE, jid, data, micros)
    except ValueError as exc:  # a reply too large for any frame
        return wp.frame(wp.FAILED, jid, error_bytes(exc, MAX_ERROR_TEXT), micros)

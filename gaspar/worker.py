"""The worker process: runs the consumer's handler on jobs from the dispatcher.

A worker is forked by the supervisor, which loads this module (and ZeroMQ's)
but creates no context: each worker builds its own after the fork.
It runs ``setup()``, connects a DEALER to the dispatcher, says READY, then
answers one job at a time (the jobs of a batch in order, each answered as soon
as it is done).  It leaves when it is sent SIGTERM, or
when its supervisor goes away: on Linux the kernel kills it then (a
parent-death signal); elsewhere it notices within ORPHAN_CHECK seconds.
"""

from __future__ import annotations

import binascii
import contextlib
import logging
import os
import signal
import time
import traceback

import zmq

from . import workerproto as wp
from .consumer import Consumer
from .exitcodes import EXIT_BOOT_ERROR, EXIT_ERROR, EXIT_OK, MAX_SETUP_ERROR

log = logging.getLogger("gaspar.worker")

# Seconds between checks, while idle, that the supervisor still exists.
ORPHAN_CHECK = 1.0
# The most of a handler's error text, in bytes, that a FAILED reply carries.
MAX_ERROR_TEXT = 65536


def describe_error(exc: BaseException) -> str:
    """One-line summary of a handler exception for the dispatcher's log and client."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def error_bytes(exc: BaseException, limit: int) -> bytes:
    """:func:`describe_error` as UTF-8, cut to `limit` bytes on a character boundary."""
    data = describe_error(exc).encode("utf-8", "replace")
    return data if len(data) <= limit else data[:limit].decode("utf-8", "ignore").encode()


def main(consumer: Consumer, endpoint: str, report: int | None = None) -> int:
    """Body of a freshly forked worker process; returns its exit code.

    SIGINT is ignored (a terminal's Ctrl-C reaches the whole process group and
    the producer decides how to stop); SIGTERM keeps its default, since the
    supervisor sends it only to workers it is retiring.  If setup() raises, its
    "TypeName: message" is written to the descriptor `report` (the
    supervisor's pipe), which is closed either way before serving.
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
        serve(consumer, endpoint)
    except Exception:
        log.critical("worker %d failed: %s", os.getpid(), traceback.format_exc().rstrip())
        return EXIT_ERROR
    return EXIT_OK


def serve(consumer: Consumer, endpoint: str) -> None:
    """Answer jobs until the supervisor that forked us is gone."""
    parent = os.getppid()
    ctx = zmq.Context(io_threads=1)
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.linger = 1000
    sock.rcvtimeo = int(ORPHAN_CHECK * 1000)
    sock.identity = b"%d-%s" % (os.getpid(), binascii.hexlify(os.urandom(4)))
    sock.connect(endpoint)
    try:
        wp.send(sock, wp.READY, wp.job_id(0), wp.ready_info())
        while True:
            try:
                first = sock.recv()
            except zmq.Again:
                if os.getppid() != parent:
                    log.debug("supervisor gone; worker %d leaving", os.getpid())
                    return
                continue
            _answer(consumer, sock, first)
    finally:
        sock.close(linger=1000)
        ctx.term()


def _answer(consumer: Consumer, sock: zmq.Socket[bytes], first: bytes) -> None:
    try:
        kind, jid, count, payload = wp.split(first, sock)
        assert isinstance(payload, bytes)  # split copies by default
        if kind == wp.JOB:
            jobs = [(jid, payload)]
        elif kind == wp.BATCH:
            jobs = wp.unpack_batch(payload, count)
        else:
            raise ValueError(f"unexpected message kind {kind!r}")
    except ValueError as exc:
        log.warning("worker %d dropped a malformed job: %s", os.getpid(), exc)
        return
    for jid, payload in jobs:
        _run(consumer, sock, jid, payload)


def _run(consumer: Consumer, sock: zmq.Socket[bytes], jid: bytes, payload: bytes) -> None:
    started = time.perf_counter()
    try:
        reply = consumer.handle(payload)
        if not isinstance(reply, bytes | bytearray | memoryview | str):
            raise TypeError(f"handler returned {type(reply).__name__}; expected bytes-like or str")
        data = reply.encode("utf-8") if isinstance(reply, str) else reply
    except Exception as exc:
        micros = int((time.perf_counter() - started) * 1e6)
        log.error("handler raised in worker %d: %s", os.getpid(), traceback.format_exc().rstrip())
        text = error_bytes(exc, MAX_ERROR_TEXT)
        wp.send(sock, wp.FAILED, jid, text, micros)
        return
    wp.send(sock, wp.DONE, jid, data, int((time.perf_counter() - started) * 1e6))

"""The worker process: runs the consumer's handler on jobs from the dispatcher.

A worker is forked by the supervisor and builds its own ZeroMQ context after
the fork.  It connects a DEALER to the dispatcher, runs ``setup()``, says
READY, then answers one job at a time.  It leaves when its supervisor goes
away (the lifeline pipe reaches EOF) or when it is sent SIGTERM.
"""

from __future__ import annotations

import binascii
import logging
import os
import signal
import traceback

import zmq

from . import workerproto as wp
from .consumer import Consumer

log = logging.getLogger("gaspar.worker")

# Payloads at least this large are sent without an extra copy.
ZERO_COPY_THRESHOLD = 64 * 1024


def describe_error(exc: BaseException) -> str:
    """One-line summary of a handler exception for the dispatcher's log and client."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Exit codes a worker process ends with; the supervisor reads them.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BOOT_ERROR = 3


def main(consumer: Consumer, endpoint: str, lifeline: int) -> int:
    """Body of a freshly forked worker process; returns its exit code.

    SIGINT is ignored (a terminal's Ctrl-C reaches the whole process group and
    the producer decides how to stop); SIGTERM keeps its default, since the
    supervisor sends it only to workers it is retiring.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        consumer.setup()
    except Exception:
        log.error("setup() failed in worker %d: %s", os.getpid(), traceback.format_exc().rstrip())
        return EXIT_BOOT_ERROR
    try:
        serve(consumer, endpoint, lifeline)
    except Exception:
        log.critical("worker %d failed: %s", os.getpid(), traceback.format_exc().rstrip())
        return EXIT_ERROR
    return EXIT_OK


def serve(consumer: Consumer, endpoint: str, lifeline: int) -> None:
    """Answer jobs until the lifeline reaches EOF, which means the supervisor is gone."""
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 1000
    sock.identity = b"%d-%s" % (os.getpid(), binascii.hexlify(os.urandom(4)))
    sock.connect(endpoint)
    try:
        sock.send_multipart([wp.READY, wp.ready_info()])
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(lifeline, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if lifeline in events:
                log.debug("supervisor gone; worker %d leaving", os.getpid())
                return
            if sock in events:
                _answer(consumer, sock)
    finally:
        sock.close(linger=1000)
        ctx.term()


def _answer(consumer: Consumer, sock: zmq.Socket[bytes]) -> None:
    frames = sock.recv_multipart()
    if len(frames) != 3 or frames[0] != wp.JOB:
        log.warning("worker %d: malformed job of %d frames dropped", os.getpid(), len(frames))
        return
    _, jid, payload = frames
    try:
        reply = consumer.handle(payload)
        if not isinstance(reply, bytes | bytearray | memoryview | str):
            raise TypeError(f"handler returned {type(reply).__name__}; expected bytes-like or str")
        data = reply.encode("utf-8") if isinstance(reply, str) else reply
    except Exception as exc:
        log.error("handler raised in worker %d: %s", os.getpid(), traceback.format_exc().rstrip())
        sock.send_multipart([wp.FAILED, jid, describe_error(exc).encode("utf-8", "replace")])
        return
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    sock.send_multipart([wp.DONE, jid, data], copy=size < ZERO_COPY_THRESHOLD)

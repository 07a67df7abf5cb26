"""The worker process: runs the consumer's handler on jobs from the dispatcher.

A local worker is forked by the supervisor with one end of a Unix socket pair
whose other end the producer holds (gaspar/links.py): no path, no handshake,
no ZeroMQ, no thread.  It runs ``setup()``, says READY on its socket, then
answers one job at a time (the jobs of a batch in order, each answered as
soon as it is done), in a blocking loop that reads into one reused buffer.

It leaves when its link ends (EOF: the producer has gone, dropped it, or
retired it once it was idle), or when its supervisor dies (the kernel kills
it then, on Linux, by a parent-death signal).  The signals an operator sends
to the whole process group (TERM, INT, QUIT, HUP, TTIN, TTOU) do nothing here:
the producer decides, and a job that is running finishes.  A worker recycles
itself (max_requests, max_worker_memory) by saying GOODBYE before its last
reply and serving on until the producer, having taken that reply, ends the
link.  While idle it says ALIVE every third of its liveness timeout (a
receive timeout of the kernel's, so a busy worker does nothing for it).

:func:`run` is the handler's side of every kind of link: the ZeroMQ worker
loop (gaspar/link_zmq.py) runs jobs with it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable
from typing import NamedTuple

from . import workerproto as wp
from .consumer import Consumer
from .exitcodes import EXIT_BOOT_ERROR, EXIT_ERROR, EXIT_OK, MAX_SETUP_ERROR
from .proctitle import setter

log = logging.getLogger("gaspar.worker")

# The most of a handler's error text, in bytes, that a FAILED reply carries.
MAX_ERROR_TEXT = 65536
# A worker's reader takes JOB and BATCH frames only.
JOB_KINDS = frozenset((wp.JOB, wp.BATCH))

Frames = list[bytes | bytearray | memoryview]

# Signals sent to a whole process group that a worker leaves to the producer.
GROUP_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
_GOODBYE = wp.frame(wp.GOODBYE, wp.job_id(0), b"")
_ALIVE = wp.frame(wp.ALIVE, wp.job_id(0), b"")
_PAGE = os.sysconf("SC_PAGE_SIZE")
# A worker's title turns idle once it has had no job for this long (seconds).
IDLE_TITLE = 0.1


class WorkerLimits(NamedTuple):
    """When a worker recycles itself, and how often an idle one says ALIVE.

    A worker's own request limit is max_requests plus a random 0..jitter, so
    that workers started together do not all leave together.
    """

    max_requests: int | None = None
    max_requests_jitter: int = 0
    max_memory: int | None = None  # bytes of resident memory
    liveness: float | None = None  # seconds; ALIVE every third of it while idle


class Recycler:
    """Counts a worker's requests and watches its memory: True once it should leave."""

    def __init__(self, limits: WorkerLimits) -> None:
        self.left: int | None = None
        if limits.max_requests is not None:
            self.left = limits.max_requests + random.randint(0, limits.max_requests_jitter)
        self.max_memory = limits.max_memory
        # /proc/self/statm, opened once: each pread of it is read afresh.
        self.statm = -1
        if self.max_memory is not None:
            self.statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)

    def __call__(self) -> bool:
        """One request done: is it time to leave?"""
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                log.info("worker %d served its max_requests; recycling", os.getpid())
                return True
        if self.max_memory is not None:
            rss = int(os.pread(self.statm, 64, 0).split()[1]) * _PAGE
            if rss > self.max_memory:
                log.info(
                    "worker %d: resident memory %d MiB over max_worker_memory; recycling",
                    os.getpid(),
                    rss >> 20,
                )
                return True
        return False

    def close(self) -> None:
        if self.statm >= 0:
            os.close(self.statm)
            self.statm = -1


def _group_signal(signum: int, frame: object) -> None:
    """A signal sent to the process group: the producer acts on it, not a worker."""


def describe_error(exc: BaseException) -> str:
    """One-line summary of a handler exception for the dispatcher's log and client."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def error_bytes(exc: BaseException, limit: int) -> bytes:
    """:func:`describe_error` as UTF-8, cut to `limit` bytes on a character boundary."""
    data = describe_error(exc).encode("utf-8", "replace")
    return data if len(data) <= limit else data[:limit].decode("utf-8", "ignore").encode()


def ignore_group_signals() -> None:
    """Let TERM, INT, QUIT, HUP, TTIN and TTOU sent to the process group pass by.

    A handler that does nothing rather than SIG_IGN, so that a program the
    handler runs (exec resets handlers, not SIG_IGN) gets the defaults; and
    system calls restart after one, so a handler's C code never sees EINTR.
    """
    for sig in GROUP_SIGNALS:
        signal.signal(sig, _group_signal)
        signal.siginterrupt(sig, False)


def main(
    consumer: Consumer,
    link: socket.socket,
    max_job: int,
    report: int | None = None,
    *,
    number: int = 0,
    limits: WorkerLimits = WorkerLimits(),  # noqa: B008 (immutable)
) -> int:
    """Body of a freshly forked worker process; returns its exit code.

    `link` is the worker's end of its socket pair; `max_job` bounds the body
    of a job frame; `number` is its slot number, for its title.  If setup()
    raises, its "TypeName: message" is written to the descriptor `report`
    (the supervisor's pipe), which is closed either way before serving.
    """
    ignore_group_signals()
    title = setter()
    name = f"gaspar: worker {number}"
    with contextlib.suppress(Exception):
        title(name + " idle")
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
    recycle = None
    try:
        if limits.max_requests is not None or limits.max_memory is not None:
            recycle = Recycler(limits)
        try:
            busy = _titles(title, name)
        except Exception:
            busy = None
        serve(consumer, link, max_job, recycle=recycle, liveness=limits.liveness, busy=busy)
    except Exception:
        log.critical("worker %d failed: %s", os.getpid(), traceback.format_exc().rstrip())
        return EXIT_ERROR
    finally:
        if recycle is not None:
            recycle.close()
    return EXIT_OK


def _titles(title: Callable[[str], None], name: str) -> Callable[[bool], None]:
    """Set this worker's title to busy (True) or idle (False), each a prepared string."""
    busy, idle = name + " busy", name + " idle"

    def switch(on: bool) -> None:
        title(busy if on else idle)

    return switch


def serve(
    consumer: Consumer,
    link: socket.socket,
    max_job: int,
    *,
    recycle: Callable[[], bool] | None = None,
    liveness: float | None = None,
    busy: Callable[[bool], None] | None = None,
) -> None:
    """Say READY on `link`, then answer its jobs until it ends.

    `recycle`, if given, is asked after each job whether this worker should
    leave; once it says so, the worker says GOODBYE before that job's reply,
    answers what it still holds, and serves on until the link ends.  With
    `liveness`, an idle worker says ALIVE each time `liveness` / 3 seconds
    pass with nothing to read.  `busy` sets the process title: busy when a
    job comes, idle once nothing has come for IDLE_TITLE seconds (a shorter
    receive timeout meanwhile), so that a worker under load pays nothing per
    request for its title; see docs/operations.md.
    """
    link.setblocking(True)
    alive_every = None if liveness is None else liveness / 3
    reader = wp.FrameReader(max_job, JOB_KINDS, reuse_large=True)
    leaving = False
    titled_busy = False
    try:
        _receive_timeout(link, alive_every)
        send_frames(link, wp.frame(wp.READY, wp.job_id(0), wp.ready_info()))
        while True:
            try:
                n = link.recv_into(reader.get_buffer())
            except BlockingIOError:  # SO_RCVTIMEO: nothing came for a while
                if titled_busy:  # IDLE_TITLE passed: idle now, and back to ALIVE's pace
                    titled_busy = False
                    busy(False)  # type: ignore[misc]
                    _receive_timeout(link, alive_every)
                else:
                    send_frames(link, _ALIVE)
                continue
            if not n:
                if reader.pending:
                    raise wp.FrameError("the link ended inside a frame")
                log.debug("link closed; worker %d leaving", os.getpid())
                return
            reader.feed(n)
            if busy is not None and not titled_busy:
                titled_busy = True
                busy(True)
                _receive_timeout(link, IDLE_TITLE)
            while (message := reader.next()) is not None:
                kind, jid, count, body = message
                if kind == wp.JOB:
                    reply = run(consumer, jid, as_bytes(body))
                    if recycle is not None and not leaving and recycle():
                        leaving = True
                        send_frames(link, _GOODBYE)
                    send_frames(link, reply)
                else:
                    for item, payload in wp.unpack_batch(as_bytes(body), count):
                        reply = run(consumer, item, payload)
                        if recycle is not None and not leaving and recycle():
                            leaving = True
                            send_frames(link, _GOODBYE)
                        send_frames(link, reply)
    except (ConnectionResetError, BrokenPipeError):
        log.debug("link reset; worker %d leaving", os.getpid())
    finally:
        link.close()


def _receive_timeout(link: socket.socket, seconds: float | None) -> None:
    """The kernel's receive timeout on `link` (None: none): no poll() before each read."""
    whole, micros = 0, 0
    if seconds is not None:
        whole = int(seconds)
        micros = int((seconds - whole) * 1e6) or (0 if whole else 1)  # 0, 0 would mean none
    link.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, micros))


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

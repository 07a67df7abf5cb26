"""Worker links: how jobs reach workers and replies come back; the local link.

A worker link is the seam between the dispatcher and its workers.  The
dispatcher calls a link to send a message to a worker and to have a worker
killed; the link tells the dispatcher of a worker's READY
(:meth:`Dispatcher.worker_ready`, which gives the link the worker's slot), of
its replies (:meth:`Dispatcher.handle_reply`, after
:meth:`Dispatcher.begin_pass`, so that what the replies of one loop pass
produced is written once that pass is over), and of its loss
(:meth:`Dispatcher.worker_lost`).  Each kind of link names its workers by
a key of its own (a connection here, a ZeroMQ identity in gaspar/link_zmq.py).

The local link: each worker forked by the supervisor has one end of a Unix
stream socket pair that the supervisor made at the fork; the other end comes
to the producer over the supervisor's control socket (SCM_RIGHTS) and is read
on the event loop by a :class:`LocalConnection`, an ``asyncio.BufferedProtocol``
that reads frames (gaspar/workerproto.py) into the buffers of one
:class:`~gaspar.workerproto.FrameReader`.  No path, no handshake: the pair
exists before the worker runs.  A worker that dies closes its end, so its
loss is seen at once, as EOF; a frame that breaks the framing or its bound
drops the worker (it is killed and replaced), never the producer.

A worker that leaves the pool (it said GOODBYE, or the supervisor retired it)
has its link ended by us once it has answered what it held, and leaves at
EOF.  Idle local workers say ALIVE every third of the liveness timeout; one
silent for the whole timeout while idle is killed (and so replaced).  The
producer checks, not the supervisor: it already reads every link and knows
which workers are idle, and a busy worker is its request timeout's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, cast

from . import workerproto as wp
from .dispatcher import WorkerUnreachable

if TYPE_CHECKING:
    from .dispatcher import Dispatcher, WorkerSlot

log = logging.getLogger("gaspar.links")

# What the producer reads from a worker: READY, replies and GOODBYE; and from a local
# one, ALIVE too.
REPLY_KINDS = frozenset((wp.READY, wp.DONE, wp.FAILED, wp.GOODBYE))
LOCAL_KINDS = REPLY_KINDS | {wp.ALIVE}


def _ignore_pid(pid: int) -> None:
    pass


class WorkerLink(Protocol):
    """What the dispatcher asks of a kind of link."""

    def send(
        self,
        slot: WorkerSlot,
        kind: bytes,
        jid: bytes,
        body: bytes | bytearray | memoryview,
        number: int = 0,
    ) -> None:
        """Send one message to `slot`'s worker; raise WorkerUnreachable if it is gone."""

    def kill(self, slot: WorkerSlot) -> None:
        """Have `slot`'s worker killed (and so replaced): its job ran past the timeout."""

    def close(self) -> None:
        """Close the link and everything it holds."""


class Watched(Protocol):
    """One worker's end, as an :class:`IdleWatch` sees it."""

    pid: int
    heard: bool  # something came since the last liveness check
    quiet: int  # liveness checks in a row it was idle and said nothing

    @property
    def idle(self) -> bool:
        """It is ready and holds no job (so it says ALIVE while it lives)."""


W = TypeVar("W", bound=Watched)


class IdleWatch(Generic[W]):
    """Call `silent(member)` for each member idle and silent for `timeout` seconds.

    Checked every third of `timeout`; the local link's and, on a worker host
    (gaspar/remote.py), each worker's relay.
    """

    CHECKS = 3  # intervals of silence that make `timeout`

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        members: Callable[[], Iterable[W]],
        silent: Callable[[W], None],
    ) -> None:
        self.timeout = timeout
        self._loop = loop
        self._interval = timeout / self.CHECKS
        self._members = members
        self._silent = silent
        self._timer: asyncio.TimerHandle | None = loop.call_later(self._interval, self._check)

    def _check(self) -> None:
        self._timer = self._loop.call_later(self._interval, self._check)
        for member in list(self._members()):
            if member.heard or not member.idle:
                member.heard, member.quiet = False, 0
                continue
            member.quiet += 1
            if member.quiet >= self.CHECKS:
                member.quiet = 0
                self._silent(member)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class LocalConnection(asyncio.BufferedProtocol):
    """The producer's end of one local worker's socket pair."""

    def __init__(self, link: LocalLink, pid: int) -> None:
        self.link = link
        self.pid = pid
        self.reader = wp.FrameReader(link.max_reply, LOCAL_KINDS)
        self.transport: asyncio.Transport | None = None
        self.slot: WorkerSlot | None = None
        self.broken = ""  # why this end dropped the worker, if it did
        self.released = False  # leaving: its link ends once it holds nothing
        self.heard = False  # something came since the last liveness check
        self.quiet = 0  # liveness checks in a row it was idle and said nothing

    @property
    def idle(self) -> bool:
        slot = self.slot
        return slot is not None and slot.job is None and not slot.batch

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is no subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        reader = self.reader
        reader.feed(nbytes)
        self.heard = True
        disp = self.link.dispatcher
        disp.begin_pass()
        try:
            while (message := reader.next()) is not None:
                kind, jid, number, body = message
                slot = self.slot
                if slot is not None and (kind == wp.DONE or kind == wp.FAILED):
                    disp.handle_reply(slot, kind, jid, number, body)
                    if slot.leaving:
                        self.release()
                elif kind == wp.ALIVE:
                    pass
                elif slot is not None and kind == wp.GOODBYE:
                    disp.worker_leaving(slot)
                    self.release()
                elif slot is None and kind == wp.READY:
                    self._ready(bytes(body))
                else:
                    raise wp.FrameError(f"{kind!r} {'before' if slot is None else 'after'} READY")
        except ValueError as exc:  # FrameError, or a malformed READY
            self.drop(str(exc))

    def retire(self) -> None:
        """The supervisor retires this worker: nothing more is sent to it; it leaves when idle."""
        if self.slot is not None:
            self.link.dispatcher.worker_leaving(self.slot)
        self.release()

    def release(self) -> None:
        """End the link of a leaving worker once it holds no job (it leaves at EOF)."""
        slot = self.slot
        if slot is not None and (slot.job is not None or slot.batch):
            return
        self.slot = None  # out of the pool already: its EOF is no loss
        self.released = True  # (if not attached yet, _attached ends it)
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return None  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.forget(self)
        if self.slot is not None:
            if self.broken:
                reason = f"its link broke ({self.broken})"
            elif self.reader.pending:
                reason = "its link closed inside a message"
            else:
                reason = "its link closed"
            self.link.dispatcher.worker_lost(self.slot, reason)

    def drop(self, why: str) -> None:
        """The worker broke the framing: kill it (its supervisor replaces it), close our end."""
        if self.broken:
            return
        self.broken = why
        log.warning("worker %d broke its link (%s); dropping it", self.pid, why)
        self.link.kill_pid(self.pid)
        if self.transport is not None:
            self.transport.abort()

    def _ready(self, info_bytes: bytes) -> None:
        info = wp.parse_ready(info_bytes)
        if info.pid != self.pid:
            raise wp.FrameError(f"READY from pid {info.pid} on the link of worker {self.pid}")
        self.slot = self.link.dispatcher.worker_ready(self.link, self, info)
        if self.slot is not None:
            self.link.on_ready(self.pid)


class LocalLink:
    """Local workers, each on its own Unix socket pair, read on the dispatcher's loop."""

    def __init__(
        self, dispatcher: Dispatcher, *, kill: Callable[[int], None], max_reply: int
    ) -> None:
        self.dispatcher = dispatcher
        self.kill_pid = kill
        self.max_reply = max_reply
        self._loop = asyncio.get_running_loop()
        self._connections: dict[int, LocalConnection] = {}
        self._closed = False
        self.on_ready: Callable[[int], None] = _ignore_pid
        self._watch: IdleWatch[LocalConnection] | None = None
        dispatcher.links.append(self)

    def add(self, pid: int, sock: socket.socket) -> None:
        """The supervisor forked worker `pid`; `sock` is our end of its socket pair."""
        if self._closed:
            sock.close()
            return
        sock.setblocking(False)
        conn = LocalConnection(self, pid)
        self._connections[pid] = conn
        task = self._loop.create_task(self._loop.connect_accepted_socket(lambda: conn, sock))
        task.add_done_callback(lambda done: self._attached(done, conn, sock))

    def exited(self, pid: int, code: int) -> None:
        """The supervisor reaped worker `pid`: if its link is still open, it is lost now."""
        conn = self._connections.pop(pid, None)
        if conn is None:
            log.debug("worker %d exited (code %d)", pid, code)
            return
        if conn.slot is not None:
            self.dispatcher.worker_lost(conn.slot, f"it exited with code {code}")
            conn.slot = None
        if conn.transport is not None:
            conn.transport.abort()

    def lose_all(self, reason: str) -> None:
        """Every local worker is gone (their supervisor died, and they with it)."""
        for conn in list(self._connections.values()):
            if conn.slot is not None:
                self.dispatcher.worker_lost(conn.slot, reason)
                conn.slot = None
        self.close()

    def retire(self, pid: int) -> None:
        """The supervisor retires worker `pid` (a reload, or fewer workers)."""
        conn = self._connections.get(pid)
        if conn is not None:
            conn.retire()

    def watch(self, timeout: float) -> None:
        """Kill any ready worker that says nothing for `timeout` seconds while idle."""
        self._watch = IdleWatch(self._loop, timeout, self._connections.values, self._silent)

    def _silent(self, conn: LocalConnection) -> None:
        timeout = self._watch.timeout if self._watch is not None else 0.0
        log.warning(
            "worker %d said nothing for %.3gs while idle (hung?); killing it", conn.pid, timeout
        )
        if conn.slot is not None:
            self.dispatcher.worker_lost(conn.slot, "it was silent while idle")
            conn.slot = None
        self.kill_pid(conn.pid)
        if conn.transport is not None:
            conn.transport.abort()

    def forget(self, conn: LocalConnection) -> None:
        """`conn` closed."""
        if self._connections.get(conn.pid) is conn:
            del self._connections[conn.pid]

    # -- the seam --------------------------------------------------------------

    def send(
        self,
        slot: WorkerSlot,
        kind: bytes,
        jid: bytes,
        body: bytes | bytearray | memoryview,
        number: int = 0,
    ) -> None:
        """Write one frame to `slot`'s worker; WorkerUnreachable if its link is closed."""
        conn: LocalConnection = slot.key  # type: ignore[assignment]
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise WorkerUnreachable("its link is closed")
        frames = wp.frame(kind, jid, body, number)
        if len(frames) == 1:
            transport.write(frames[0])
        else:
            transport.writelines(frames)

    def kill(self, slot: WorkerSlot) -> None:
        """Have the supervisor SIGKILL `slot`'s worker (its job ran past the timeout)."""
        self.kill_pid(slot.pid)

    def close(self) -> None:
        """Close every worker's link (the workers see EOF and leave)."""
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for conn in list(self._connections.values()):
            if conn.transport is not None:
                conn.transport.abort()
        self._connections.clear()

    def _attached(
        self, done: asyncio.Task[object], conn: LocalConnection, sock: socket.socket
    ) -> None:
        failure = "cancelled" if done.cancelled() else done.exception()
        if failure is not None:
            log.error("cannot read worker %d's link: %s", conn.pid, failure)
            self.forget(conn)
            with contextlib.suppress(OSError):
                sock.close()
            self.kill_pid(conn.pid)
        elif self._closed and conn.transport is not None:
            conn.transport.abort()
        elif conn.released and conn.transport is not None:
            conn.transport.close()

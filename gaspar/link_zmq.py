"""The ZeroMQ worker link: a ROUTER the dispatcher's workers reach with DEALER sockets.

The second kind of worker link (the first, for local workers, is
gaspar/links.py).  Workers may run anywhere an endpoint reaches: worker hosts
(gaspar/remote.py, ``gaspar worker``) join over tcp:// with CURVE
(gaspar/security.py) and heartbeats in both directions.  A message is one or two
ZeroMQ frames: the head of gaspar/workerproto.py followed by the body when it
is small, or the head alone and the body as a second frame, sent without a
copy.  The ROUTER prepends the worker's identity on receipt and strips it on
send; workers never see identities.  A worker is known by that identity; its
pid is information (and what its host's supervisor kills).

Few frames and plain-int flags matter here: each frame or flag-enum operation
in pyzmq costs microseconds.  Only this module, gaspar/security.py and
gaspar/remote.py import ZeroMQ, and only a producer with a worker endpoint,
or a worker host, loads them: local workers and the supervisor never do.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import math
import os
from collections.abc import Callable

import zmq

from . import workerproto as wp
from .consumer import Consumer
from .dispatcher import Dispatcher, WorkerSlot, WorkerUnreachable
from .links import REPLY_KINDS
from .security import ServerKeys, WorkerAuthenticator
from .worker import Frames, run

log = logging.getLogger("gaspar.link_zmq")

SNDMORE = int(zmq.SNDMORE)
RCVMORE = int(zmq.RCVMORE)
NOBLOCK = int(zmq.NOBLOCK)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
# Seconds between checks, while idle, that a ZeroMQ worker's parent still exists.
ORPHAN_CHECK = 1.0
# Heartbeat intervals of silence after which a peer is lost (the Paranoid Pirate's liveness).
LIVENESS = 3
ZERO_ID = wp.job_id(0) + bytes(4)  # the id and number of a message that names no job
# What the producer reads on this link: READY, replies, GOODBYE, and from hosts these two.
ZMQ_KINDS = REPLY_KINDS | {wp.HEARTBEAT, wp.LOST}


def send(sock: zmq.Socket[bytes], frames: Frames) -> None:
    """Send one message, as gaspar/workerproto.py's frame() gave it (after any identity)."""
    if len(frames) == 1:
        sock.send(memoryview(frames[0])[4:])
    else:
        sock.send(frames[0][4:], SNDMORE)  # type: ignore[index]
        sock.send(frames[1], copy=False)


def split(
    first: bytes, sock: zmq.Socket[bytes], flags: int = 0, copy: bool = True
) -> tuple[bytes, bytes, int, bytes | memoryview]:
    """Parse a message whose first frame is `first`: (kind, job id, number, body).

    Reads the body frame when there is one (with copy=False, as a view of the
    ZeroMQ message, which saves copying a large body once more); raises
    ValueError for a message of the wrong shape, after draining its frames.
    """
    body: bytes | memoryview = first[wp.HEAD_SIZE :]
    if sock.get(RCVMORE):
        body = sock.recv(flags) if copy else sock.recv(flags, copy=False).buffer
        if sock.get(RCVMORE):
            while sock.get(RCVMORE):
                sock.recv(flags)
            raise ValueError("message of more than two frames")
        if len(first) != wp.HEAD_SIZE:
            raise ValueError("head with an inline body followed by a body frame")
    if len(first) < wp.HEAD_SIZE:
        raise ValueError("message head too short")
    return first[:1], first[1:9], int.from_bytes(first[9 : wp.HEAD_SIZE], "big"), body


class ZmqLink:
    """The producer's side: a ROUTER bound to `endpoint`, read on the dispatcher's loop.

    With `heartbeat` (seconds; for worker hosts, gaspar/remote.py), every
    known worker is sent HEARTBEAT each interval, and one from which nothing
    came for LIVENESS intervals is lost: its running job and batch fail
    WORKER_LOST, its slot leaves.  A message from an identity this link does
    not know is answered UNKNOWN, which makes the host join again under a new
    identity (after a producer restart, or a host that was frozen).  A LOST
    frame from a host reports a worker process that died.  Without
    `heartbeat` (tests, and :func:`serve_worker`), losses are reported through
    :meth:`worker_exited`, and a send to an identity ZeroMQ knows is gone
    fails (ROUTER_MANDATORY).

    `kill` asks whoever runs the worker to kill it, by pid; without it, the
    link sends KILL to the worker's host, which has its supervisor do it.
    With `keys` the socket is a CURVE server that accepts only the worker
    keys of their allow directory (gaspar/security.py).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        endpoint: str,
        *,
        kill: Callable[[int], None] | None = None,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        heartbeat: float | None = None,
        keys: ServerKeys | None = None,
        max_reply: int | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self._kill = kill
        self._own_ctx = ctx is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = ctx if ctx is not None else zmq.Context()
        self._loop = asyncio.get_running_loop()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.ROUTER)
        self.auth: WorkerAuthenticator | None = None
        try:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._sock.setsockopt(zmq.LINGER, 0)
            if max_reply is not None:
                # A larger message is refused (the peer disconnected) before it is stored.
                self._sock.setsockopt(zmq.MAXMSGSIZE, max_reply + wp.HEAD_SIZE)
            if keys is not None:
                self.auth = WorkerAuthenticator(self._ctx, keys)
                self.auth.secure(self._sock)
            self._sock.bind(endpoint)
        except zmq.ZMQError:
            # An open socket would make the context's term() wait forever.
            if self.auth is not None:
                self.auth.close()
            self._sock.close(linger=0)
            if self._own_ctx:
                self._ctx.term()
            raise
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._slots: dict[bytes, WorkerSlot] = {}
        # Heartbeats: the tick each identity was last heard from, and its host.
        self.heartbeat = heartbeat
        self._tick = 0
        self._seen: dict[bytes, int] | None = {} if heartbeat is not None else None
        self._nodes: dict[bytes, str] = {}
        # Ticks of silence after which each identity is lost: LIVENESS intervals of
        # the slower of its host's heartbeat and ours.
        self._limits: dict[bytes, int] = {}
        self._beat = ZERO_ID
        if heartbeat is not None:
            self._beat = wp.job_id(0) + min(int(heartbeat * 1000), wp.MAX_NUMBER).to_bytes(4, "big")
        self._timer: asyncio.TimerHandle | None = None
        self._check_scheduled = False
        self._fd: int = self._sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._loop.add_reader(self._fd, self._on_readable)
        if heartbeat is not None:
            self._timer = self._loop.call_later(heartbeat, self._on_tick)
        dispatcher.links.append(self)

    @property
    def workers(self) -> int:
        """Workers of this link that are ready or busy."""
        return sum(1 for slot in list(self._slots.values()) if not (slot.doomed or slot.leaving))

    @property
    def hosts(self) -> int:
        """Worker hosts with a worker in the pool (safe from another thread)."""
        return len(set(list(self._nodes.values())))

    # -- the seam --------------------------------------------------------------

    def send(
        self,
        slot: WorkerSlot,
        kind: bytes,
        jid: bytes,
        body: bytes | bytearray | memoryview,
        number: int = 0,
    ) -> None:
        """Send one message to `slot`'s worker; WorkerUnreachable if ZeroMQ knows it is gone."""
        try:
            self._sock.send(slot.key, SNDMORE)  # type: ignore[call-overload]
            send(self._sock, wp.frame(kind, jid, body, number))
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: ZeroMQ already knows the peer is gone.
            self._forget(slot.key)  # type: ignore[arg-type]
            raise WorkerUnreachable(str(exc)) from exc
        # A send can consume the edge-triggered FD's notice of pending input:
        # look now, and read on the next loop pass if there is some.
        if self._sock.get(EVENTS) & POLLIN:  # type: ignore[operator]
            self._schedule_check()

    def kill(self, slot: WorkerSlot) -> None:
        """Have `slot`'s worker killed (its job ran past the timeout)."""
        if self._kill is not None:
            self._kill(slot.pid)
        else:
            self._control(slot.key, wp.KILL)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop reading and close the ROUTER socket (and the context, if ours)."""
        if self._sock.closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._loop.remove_reader(self._fd)
        if self.auth is not None:
            self.auth.close()
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.destroy(linger=0)

    def worker_exited(self, pid: int, code: int) -> None:
        """The supervisor of this link's workers reports that worker `pid` ended."""
        for key, slot in list(self._slots.items()):
            if slot.pid == pid:
                self._forget(key)
                self.dispatcher.worker_lost(slot, f"it exited with code {code}")

    # -- heartbeats ------------------------------------------------------------

    def _on_tick(self) -> None:
        """Every heartbeat: lose the silent, send HEARTBEAT to the others."""
        assert self.heartbeat is not None and self._seen is not None
        self._timer = self._loop.call_later(self.heartbeat, self._on_tick)
        self._tick += 1
        seen, tick = self._seen, self._tick
        for identity, slot in list(self._slots.items()):
            silent = tick - seen.get(identity, tick)
            if slot.leaving and slot.job is None and not slot.batch:
                self._forget(identity)  # it left (GOODBYE) and holds nothing
            elif silent > self._limits.get(identity, LIVENESS):
                self._forget(identity)
                self.dispatcher.worker_lost(
                    slot, f"nothing heard from it for {silent * self.heartbeat:.3g}s"
                )
            else:
                self._control(identity, wp.HEARTBEAT, self._beat)

    def _control(self, identity: bytes, kind: bytes, rest: bytes = ZERO_ID) -> None:
        """Send a body-less message of `kind` to `identity`, if it is still there."""
        try:
            self._sock.send_multipart((identity, kind + rest))
        except zmq.ZMQError:
            return  # gone: its silence will tell
        if self._sock.get(EVENTS) & POLLIN:  # type: ignore[operator]
            self._schedule_check()

    def _drop_former(self, node: str, pid: int) -> None:
        """A worker joins under a new identity: the slot of its former one is lost now.

        Its host gave that identity up (the producer fell silent for it), so
        whatever the slot held will never be answered, and the slot is no
        worker any more.
        """
        for identity, slot in list(self._slots.items()):
            if slot.pid == pid and self._nodes.get(identity) == node:
                self._forget(identity)
                self.dispatcher.worker_lost(slot, "it joined again under a new identity")

    def _forget(self, identity: bytes) -> None:
        self._slots.pop(identity, None)
        self._nodes.pop(identity, None)
        self._limits.pop(identity, None)
        if self._seen is not None:
            self._seen.pop(identity, None)

    # -- reading ---------------------------------------------------------------

    def _schedule_check(self) -> None:
        if not self._check_scheduled:
            self._check_scheduled = True
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        # Checking EVENTS (not catching zmq.Again) keeps the empty case cheap,
        # and also re-arms the edge-triggered descriptor.
        self._check_scheduled = False
        sock = self._sock
        if sock.closed:
            return
        disp = self.dispatcher
        seen = self._seen
        disp.begin_pass()
        while sock.get(EVENTS) & POLLIN:  # type: ignore[operator]
            identity = sock.recv(NOBLOCK)
            try:
                # Only what breaks gaspar/workerproto.py is "malformed".
                if not sock.get(RCVMORE):
                    raise ValueError("message without a body")
                kind, jid, number, body = split(sock.recv(NOBLOCK), sock, NOBLOCK, copy=False)
                info = wp.parse_ready(bytes(body)) if kind == wp.READY else None
                if info is None and kind not in ZMQ_KINDS:
                    raise ValueError(f"unknown message kind {kind!r}")
            except ValueError as exc:
                log.warning("malformed message from a worker dropped: %s", exc)
                continue
            if info is not None:
                if identity not in self._slots:
                    node, beat = _host_of(bytes(body), info)
                    self._drop_former(node, info.pid)
                    slot = disp.worker_ready(self, identity, info)
                    if slot is not None:
                        self._slots[identity] = slot
                        self._nodes[identity] = node
                        if seen is not None:
                            seen[identity] = self._tick
                            if beat and self.heartbeat is not None:
                                ratio = beat / self.heartbeat
                                self._limits[identity] = max(LIVENESS, math.ceil(LIVENESS * ratio))
                            # At once: the host learns our interval before it could miss one.
                            self._control(identity, wp.HEARTBEAT, self._beat)
                continue
            slot = self._slots.get(identity)
            if slot is None:
                if seen is not None and kind != wp.LOST:
                    self._control(identity, wp.UNKNOWN)
                continue
            if seen is not None:
                seen[identity] = self._tick
            if kind == wp.DONE or kind == wp.FAILED:
                disp.handle_reply(slot, kind, jid, number, body)
            elif kind == wp.GOODBYE:
                disp.worker_leaving(slot)
                if seen is not None:  # a worker host: tell it nothing more comes
                    self._control(identity, wp.GOODBYE)
            elif kind == wp.LOST:
                self._forget(identity)
                why = bytes(body).decode("utf-8", "replace") or "its host says it died"
                disp.worker_lost(slot, why)


def _host_of(body: bytes, info: wp.ReadyInfo) -> tuple[str, float]:
    """The worker host a READY came through, and its heartbeat in seconds (0: not said).

    A host adds "node" and "heartbeat" to its workers' READY info; a plain
    worker is a host of its own.
    """
    data = json.loads(body)  # parse_ready has read it already
    node, beat = data.get("node"), data.get("heartbeat")
    if not isinstance(beat, int | float) or isinstance(beat, bool) or not 0 < beat < 3600:
        beat = 0.0
    return (node if isinstance(node, str) else f"{info.host} {info.pid}"), float(beat)


def serve_worker(consumer: Consumer, endpoint: str) -> None:
    """A worker on the ZeroMQ link: DEALER to `endpoint`, READY, then answer jobs.

    It runs until its parent process is gone (checked every ORPHAN_CHECK
    seconds while idle).  No heartbeats: for a link without them (tests); a
    worker on another host runs under ``gaspar worker`` (gaspar/remote.py).
    """
    parent = os.getppid()
    ctx = zmq.Context(io_threads=1)
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.linger = 1000
    sock.rcvtimeo = int(ORPHAN_CHECK * 1000)
    sock.identity = b"%d-%s" % (os.getpid(), binascii.hexlify(os.urandom(4)))
    sock.connect(endpoint)
    try:
        send(sock, wp.frame(wp.READY, wp.job_id(0), wp.ready_info()))
        while True:
            try:
                first = sock.recv()
            except zmq.Again:
                if os.getppid() != parent:
                    log.debug("parent gone; worker %d leaving", os.getpid())
                    return
                continue
            try:
                kind, jid, count, payload = split(first, sock)
                assert isinstance(payload, bytes)  # split copies by default
                if kind == wp.JOB:
                    jobs = [(jid, payload)]
                elif kind == wp.BATCH:
                    jobs = wp.unpack_batch(payload, count)
                else:
                    raise ValueError(f"unexpected message kind {kind!r}")
            except ValueError as exc:
                log.warning("worker %d dropped a malformed job: %s", os.getpid(), exc)
                continue
            for jid, payload in jobs:
                send(sock, run(consumer, jid, payload))
    finally:
        sock.close(linger=1000)
        ctx.term()

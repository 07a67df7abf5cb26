"""A worker host (``gaspar worker``): workers on another machine in a producer's pool.

The process layout mirrors the producer's:

    gaspar worker  (WorkerHost: event loop, ZeroMQ context and sockets, made
    │               after the supervisor is forked)
    └─ supervisor  (gaspar/supervisor.py, as under a producer)
         ├─ worker (gaspar/worker.py: a local Unix link to this process)
         └─ worker ...

The host relays.  For each worker it reads the worker's local link, exactly as
a producer does (gaspar/links.py), and holds one DEALER socket to the
producer's ROUTER (gaspar/link_zmq.py) under an identity of its own, so the
producer still knows one identity as one worker slot.  Jobs go from the
DEALER to that worker's link; replies come back the other way.  The host never
runs a handler, so it keeps heartbeating while one is busy for minutes.

Liveness (the ZeroMQ Guide's Paranoid Pirate): HEARTBEAT both ways on each
DEALER every `heartbeat` seconds; a producer silent for LIVENESS intervals is
given up: that DEALER is closed and, after a backoff (doubling from
RECONNECT_MIN to RECONNECT_MAX seconds), the worker joins again under a new
identity.  A producer that does not know an identity answers UNKNOWN, and the
worker joins again at once (a restarted producer, a host that was frozen).  A
worker that joins again does so only once it is idle: replies still owed
under an old identity are dropped here, so no reply can cross into the new
session, and the idle-only rule holds.

A worker that leaves the pool while the host stays (the supervisor retires
it on a reload or when there are fewer workers; it recycles itself after
max_requests or past max_worker_memory) leaves as a producer's local one does
(gaspar/links.py): its DEALER says GOODBYE before any reply still owed (the
worker's own GOODBYE is relayed in the order it came, before its last reply),
and once the producer has answered that GOODBYE and every reply is passed on,
the host closes the DEALER and ends the worker's link; the worker leaves at
EOF and the supervisor replaces it.  The host says "ready PID" to its
supervisor at each worker's READY, so that a reload retires an old worker only
once a new one is ready.  Idle workers say ALIVE on their links (not relayed):
the host watches them as a producer watches its own (gaspar/links.py's
IdleWatch) and has one silent for `liveness_timeout` killed and replaced.

A worker process that dies: its link ends (EOF) and the host sends LOST, so
its job fails WORKER_LOST at once; the supervisor replaces it and the new
worker joins.  KILL from the producer (a job past its timeout) has the
supervisor kill that worker.  SIGTERM or SIGINT: every DEALER says GOODBYE;
the host finishes what its workers hold within `grace`, then stops its
supervisor and exits; a second signal, or SIGQUIT, stops at once.  SIGHUP:
the supervisor re-imports MODULE:ATTR and replaces every worker, one at a
time (a new one ready before an old one is retired); SIGTTIN, SIGTTOU: one
worker more, one fewer (never below one).  The supervisor and the workers
leave the group's signals to this process, as under a producer.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
import math
import os
import signal
import socket
from typing import cast

import zmq

from . import workerproto as wp
from .consumer import Consumer, Handler, as_consumer
from .link_zmq import LIVENESS, NOBLOCK, POLLIN, SNDMORE, split
from .links import LOCAL_KINDS, IdleWatch
from .options import DEFAULTS, validate
from .proctitle import set_title
from .protocol import MAX_LENGTH, MAX_MESSAGE_SIZE_LIMIT
from .security import INSECURE_WARNING, ClientKeys, apply_client, check_endpoint, load_client_keys
from .supervisor import SupervisorLink
from .worker import GROUP_SIGNALS, Frames, WorkerLimits

__all__ = ["KEYWORD_NAMES", "WorkerHost", "host_keys", "run_worker_host"]

log = logging.getLogger("gaspar.remote")

# Seconds before a worker joins again after its producer went silent: doubling, capped.
RECONNECT_MIN = 1.0
RECONNECT_MAX = 32.0
# Milliseconds a closing DEALER has to hand over its last messages (replies, LOST, GOODBYE).
LINGER_MS = 1000
# Seconds the supervisor gives workers to leave on SIGTERM once the host stops.
TERM_TIMEOUT = 5.0
# The largest job a host takes: whatever a producer may send (it bounds requests itself).
MAX_JOB = wp.max_job_body(MAX_MESSAGE_SIZE_LIMIT)
# How errors name the options, for callers from Python (the command uses its flags).
KEYWORD_NAMES = ("endpoint", "key", "server_key", "insecure_workers")
EVENTS = int(zmq.EVENTS)


def host_keys(
    endpoint: str,
    key: str | None,
    server_key: str | None,
    insecure_workers: bool,
    names: tuple[str, str, str, str] = KEYWORD_NAMES,
) -> ClientKeys | None:
    """The keys a host uses for `endpoint` (None: no CURVE); ValueError, one line, if refused."""
    if not check_endpoint(endpoint, (key, server_key), insecure_workers, names):
        return None
    assert key is not None and server_key is not None
    return load_client_keys(key, server_key)


def _push(sock: zmq.Socket[bytes], frames: Frames) -> bool:
    """Send one message without blocking; False if the socket cannot take it now."""
    try:
        if len(frames) == 1:
            sock.send(memoryview(frames[0])[4:], NOBLOCK)
        else:
            sock.send(frames[0][4:], NOBLOCK | SNDMORE)  # type: ignore[index]
            sock.send(frames[1], NOBLOCK, copy=False)
    except zmq.ZMQError:
        return False
    return True


class Relay(asyncio.BufferedProtocol):
    """One worker: its local link (this protocol) and its DEALER to the producer."""

    def __init__(self, host: WorkerHost, pid: int) -> None:
        self.host = host
        self.pid = pid
        self.reader = wp.FrameReader(MAX_LENGTH, LOCAL_KINDS)
        self.transport: asyncio.Transport | None = None
        self.info: dict[str, object] | None = None  # its READY, once it said it
        self.sock: zmq.Socket[bytes] | None = None
        self.fd = -1
        self.owed = 0  # replies the producer awaits on this DEALER
        self.stale = 0  # replies to jobs of an identity given up: dropped
        self.last_heard = 0  # the host's tick when the producer was last heard
        self.limit = LIVENESS  # ticks of silence after which the producer is given up
        self.backoff = RECONNECT_MIN
        self.retry: asyncio.TimerHandle | None = None
        self.leaving = False  # joins no more (the host stops, or the worker retires)
        self.acked = False  # the producer answered our GOODBYE
        self.gone = False  # its link ended
        self.released = False  # we end its link (it left the pool)
        self.heard = False  # something came on its link since the last liveness check
        self.quiet = 0  # liveness checks in a row it was idle and said nothing
        self._check_scheduled = False

    @property
    def done(self) -> bool:
        """Nothing more is owed to a producer through this worker."""
        return self.gone or self.sock is None or (self.acked and self.owed == 0)

    # -- the worker's local link -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    @property
    def idle(self) -> bool:
        """Ready and holding no job: it says ALIVE while it lives (an IdleWatch checks)."""
        return self.info is not None and not self.owed and not self.stale and not self.gone

    def buffer_updated(self, nbytes: int) -> None:
        reader = self.reader
        reader.feed(nbytes)
        self.heard = True
        try:
            while (message := reader.next()) is not None:
                kind, jid, number, body = message
                if kind == wp.READY and self.info is None:
                    self._ready(bytes(body))
                elif self.info is None or kind == wp.READY:
                    where = "before" if self.info is None else "after"
                    raise wp.FrameError(f"{kind!r} {where} READY")
                elif kind == wp.GOODBYE:  # it recycles itself: pass it on, before its reply
                    self.leaving = True
                    self._cancel_retry()
                    self._to_producer(wp.frame(wp.GOODBYE, jid, b""))
                    self.release()
                elif kind == wp.DONE or kind == wp.FAILED:
                    self._reply(wp.frame(kind, jid, body, number))
                # ALIVE is for this host's IdleWatch (heard, above): not relayed.
        except ValueError as exc:  # FrameError, or a malformed READY
            self.drop(str(exc))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker_gone("its process ended")

    def worker_gone(self, why: str) -> None:
        """The worker's link ended: tell the producer (its job fails now), forget it."""
        if self.gone:
            return
        self.gone = True
        if self.sock is not None and not self.acked:
            self._to_producer(wp.frame(wp.LOST, wp.job_id(0), f"worker {self.pid}: {why}".encode()))
        self.close_socket(LINGER_MS)
        self.host.forget(self)

    def drop(self, why: str) -> None:
        """The worker broke its link's framing: have it killed (and so replaced)."""
        log.warning("worker %d broke its link (%s); dropping it", self.pid, why)
        self.host.supervisor.kill(self.pid)
        if self.transport is not None:
            self.transport.abort()

    def _ready(self, body: bytes) -> None:
        info = wp.parse_ready(body)
        if info.pid != self.pid:
            raise wp.FrameError(f"READY from pid {info.pid} on the link of worker {self.pid}")
        self.info = {
            "pid": info.pid,
            "host": info.host,
            "node": self.host.node,
            "heartbeat": self.host.heartbeat,
        }
        self.host.supervisor.ready(self.pid)  # a reload retires an old worker only now
        self.join()

    def _reply(self, frames: Frames) -> None:
        if self.stale:
            self.stale -= 1
            if not self.stale:
                self.join()  # idle now
                self.release()
            return
        if self.owed:
            self.owed -= 1
        self._to_producer(frames)
        if self.leaving:
            self.release()
            self.host.check_done()

    # -- the DEALER to the producer ----------------------------------------------

    def join(self) -> None:
        """Say READY on a new DEALER, if this worker may join now (idle, not backing off)."""
        if (
            self.gone
            or self.leaving
            or self.host.leaving
            or self.info is None
            or self.stale
            or self.sock is not None
            or self.retry is not None
        ):
            return
        host = self.host
        sock: zmq.Socket[bytes] = host.ctx.socket(zmq.DEALER)
        suffix = binascii.hexlify(os.urandom(4)).decode()
        sock.identity = f"{host.node}/{self.pid}/{suffix}".encode()[-255:]
        sock.linger = 0
        sock.reconnect_ivl = int(RECONNECT_MIN * 1000)
        sock.reconnect_ivl_max = int(RECONNECT_MAX * 1000)
        sock.maxmsgsize = MAX_JOB + wp.HEAD_SIZE
        if host.keys is not None:
            apply_client(sock, host.keys)
        sock.connect(host.endpoint)
        self.sock, self.fd = sock, cast(int, sock.getsockopt(zmq.FD))
        self.last_heard, self.acked = host.tick, False
        host.loop.add_reader(self.fd, self._on_readable)
        self._to_producer(wp.frame(wp.READY, wp.job_id(0), json.dumps(self.info).encode()))
        log.debug("worker %d joins as %s", self.pid, sock.identity.decode())

    def leave(self) -> None:
        """The host stops: say GOODBYE (before any reply still owed), join no more."""
        self.leaving = True
        self._cancel_retry()
        if self.sock is not None and not self.acked:
            self._to_producer(wp.frame(wp.GOODBYE, wp.job_id(0), b""))

    def retire(self) -> None:
        """The supervisor retires this worker: GOODBYE, then it leaves once it holds nothing."""
        self.leave()
        self.release()

    def release(self) -> None:
        """End a leaving worker's DEALER and link once nothing is owed (it leaves at EOF).

        Not while the host itself stops: its teardown ends every link then.
        """
        if (
            not self.leaving
            or self.gone
            or self.host.leaving
            or self.owed
            or self.stale
            or (self.sock is not None and not self.acked)
        ):
            return
        self.close_socket(LINGER_MS)
        self.released = True
        if self.transport is not None:
            self.transport.close()

    def rotate(self, delay: float) -> None:
        """Give up this DEALER's identity; join again after `delay` seconds, once idle."""
        self.close_socket(0)
        self.stale += self.owed
        self.owed = 0
        if delay > 0 and not self.leaving:
            self.retry = self.host.loop.call_later(delay, self._retry)
        self.join()
        self.release()

    def close_socket(self, linger: int) -> None:
        """Close the DEALER (after `linger` ms to hand over what it holds)."""
        self._cancel_retry()
        sock, self.sock = self.sock, None
        if sock is not None:
            self.host.loop.remove_reader(self.fd)
            sock.close(linger=linger)

    def beat(self) -> None:
        """One heartbeat interval passed."""
        if self.sock is not None:
            self._to_producer([self.host.beat_frame])

    def _retry(self) -> None:
        self.retry = None
        self.join()

    def _cancel_retry(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None

    def _to_producer(self, frames: Frames) -> None:
        sock = self.sock
        if sock is None:
            return
        if not _push(sock, frames):
            log.warning("worker %d: the producer is not taking messages; one dropped", self.pid)
        # A send can take the edge-triggered FD's notice of input: look again soon.
        if sock.get(EVENTS) & POLLIN:  # type: ignore[operator]
            self._schedule_check()

    def _schedule_check(self) -> None:
        if not self._check_scheduled:
            self._check_scheduled = True
            self.host.loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        self._check_scheduled = False
        sock = self.sock
        while sock is not None and sock.get(EVENTS) & POLLIN:  # type: ignore[operator]
            try:
                kind, jid, number, body = split(sock.recv(NOBLOCK), sock, NOBLOCK, copy=False)
            except ValueError as exc:
                log.warning("worker %d: malformed message from the producer: %s", self.pid, exc)
                continue
            except zmq.ZMQError:
                return
            self.last_heard, self.backoff = self.host.tick, RECONNECT_MIN
            if kind == wp.JOB or kind == wp.BATCH:
                self.owed += 1 if kind == wp.JOB else number
                self._to_worker(wp.frame(kind, jid, body, number))
            elif kind == wp.HEARTBEAT:
                # `number`: the producer's interval in ms; a slower producer is waited for.
                ratio = number / 1000 / self.host.heartbeat
                self.limit = max(LIVENESS, math.ceil(LIVENESS * ratio))
            elif kind == wp.KILL:
                log.warning("worker %d: killed at the producer's request (timeout)", self.pid)
                self.host.supervisor.kill(self.pid)
            elif kind == wp.GOODBYE:
                self.acked = True
                self.release()
                self.host.check_done()
            elif kind == wp.UNKNOWN:
                if self.leaving:
                    self.acked = True  # it has forgotten us: nothing more comes
                    self.release()
                    self.host.check_done()
                else:
                    log.info("worker %d: the producer does not know it; joining again", self.pid)
                    self.rotate(0)
                return
            else:
                log.warning("worker %d: unexpected %r from the producer", self.pid, kind)
            if sock is not self.sock:
                return

    def _to_worker(self, frames: Frames) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # its loss is on its way
        if len(frames) == 1:
            transport.write(frames[0])
        else:
            transport.writelines(frames)


class WorkerHost:
    """The host process's event-loop side: a relay per worker, heartbeats, signals."""

    def __init__(
        self,
        supervisor: SupervisorLink,
        endpoint: str,
        *,
        keys: ClientKeys | None,
        heartbeat: float,
        grace: float,
        processes: int,
        liveness: float | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.liveness = liveness
        self.processes = processes
        self.endpoint = endpoint
        self.keys = keys
        self.heartbeat = heartbeat
        self.grace = grace
        self.node = f"{socket.gethostname()}/{os.getpid()}"
        # A HEARTBEAT carries the sender's interval in ms (as its number).
        self.beat_frame = wp.frame(wp.HEARTBEAT, wp.job_id(0), b"", int(heartbeat * 1000))[0]
        self.relays: dict[int, Relay] = {}
        self.tick = 0
        self.leaving = False
        self.at_once = False  # QUIT, or a second TERM or INT: every worker is killed at the stop
        self.exit_code = 0
        self.loop = asyncio.get_running_loop()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._stop = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._watch: IdleWatch[Relay] | None = None

    async def run(self) -> int:
        """Serve until told to stop; return the process exit code."""
        link, loop = self.supervisor, self.loop
        link.on_spawned = self._spawned
        link.on_exited = self._exited
        link.on_setup_failed = self._setup_failed
        link.on_lost = self._supervisor_lost
        link.on_retire = self._retire
        link.attach(loop)
        for sig in GROUP_SIGNALS:  # the supervisor and workers leave them to us
            loop.add_signal_handler(sig, self._on_signal, sig)
        set_title(f"gaspar: worker host {self.endpoint}")
        self._timer = loop.call_later(self.heartbeat, self._on_tick)
        if self.liveness is not None:
            self._watch = IdleWatch(loop, self.liveness, self.relays.values, self._silent)
        if self.keys is None:
            log.warning(INSECURE_WARNING, self.endpoint)
        log.info("worker host %s: %d workers for %s", self.node, self.processes, self.endpoint)
        link.go()
        try:
            await self._stop.wait()
        finally:
            for sig in GROUP_SIGNALS:  # the supervisor and workers leave them to us
                loop.remove_signal_handler(sig)
            await self._teardown()
        return self.exit_code

    def forget(self, relay: Relay) -> None:
        """`relay`'s worker is gone."""
        if self.relays.get(relay.pid) is relay:
            del self.relays[relay.pid]
        self.check_done()

    def check_done(self) -> None:
        """When leaving, stop once no worker owes the producer anything."""
        if self.leaving and all(r.done for r in self.relays.values()):
            self._stop.set()

    # -- events ------------------------------------------------------------------

    def _spawned(self, pid: int, sock: socket.socket) -> None:
        sock.setblocking(False)
        relay = Relay(self, pid)
        relay.leaving = self.leaving
        self.relays[pid] = relay
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: relay, sock))
        task.add_done_callback(lambda done: self._attached(done, relay, sock))

    def _attached(self, done: asyncio.Task[object], relay: Relay, sock: socket.socket) -> None:
        failure = "cancelled" if done.cancelled() else done.exception()
        if failure is not None:
            log.error("cannot read worker %d's link: %s", relay.pid, failure)
            with contextlib.suppress(OSError):
                sock.close()
            self.supervisor.kill(relay.pid)
            relay.worker_gone("its link could not be read")
        elif relay.released and relay.transport is not None:
            relay.transport.close()

    def _exited(self, pid: int, code: int) -> None:
        relay = self.relays.get(pid)
        if relay is not None:
            relay.worker_gone(f"it exited with code {code}")
            if relay.transport is not None:
                relay.transport.abort()

    def _retire(self, pid: int) -> None:
        relay = self.relays.get(pid)
        if relay is not None:
            relay.retire()

    def _silent(self, relay: Relay) -> None:
        assert self.liveness is not None
        log.warning(
            "worker %d said nothing for %.3gs while idle (hung?); killing it",
            relay.pid,
            self.liveness,
        )
        relay.worker_gone("it was silent while idle")
        self.supervisor.kill(relay.pid)
        if relay.transport is not None:
            relay.transport.abort()

    def _setup_failed(self, pid: int, backoff: float, error: str) -> None:
        log.error("worker %d: setup() failed: %s; next attempt in %.3gs", pid, error, backoff)

    def _supervisor_lost(self) -> None:
        log.critical("supervisor process died, and its workers with it; stopping")
        self.exit_code = 1
        for relay in list(self.relays.values()):
            relay.worker_gone("its supervisor died")
        self._stop.set()

    def _on_signal(self, sig: int) -> None:
        """TERM, INT: leave gracefully, at once the second time; QUIT: at once;
        HUP: reload; TTIN, TTOU: one worker more, one fewer (never below one)."""
        name = signal.Signals(sig).name
        if sig == signal.SIGQUIT or (self.leaving and sig in (signal.SIGTERM, signal.SIGINT)):
            log.warning("%s%s: stopping now", name, " again" if self.leaving else "")
            self.leaving = self.at_once = True
            self._stop.set()
            return
        if self.leaving:
            log.info("%s ignored: the host is stopping", name)
            return
        if sig == signal.SIGHUP:
            log.info("SIGHUP: reloading")
            self.supervisor.reload()
            return
        if sig in (signal.SIGTTIN, signal.SIGTTOU):
            self.processes = max(1, self.processes + (1 if sig == signal.SIGTTIN else -1))
            log.info("%s: %d workers", name, self.processes)
            self.supervisor.scale(self.processes)
            return
        self.leaving = True
        owed = sum(r.owed for r in self.relays.values())
        log.info("%s: leaving the pool; %d jobs to finish within %.3gs", name, owed, self.grace)
        for relay in self.relays.values():
            relay.leave()
        self.loop.call_later(self.grace, self._stop.set)
        self.check_done()

    def _on_tick(self) -> None:
        self._timer = self.loop.call_later(self.heartbeat, self._on_tick)
        self.tick += 1
        given_up = []
        for relay in list(self.relays.values()):
            if relay.sock is None:
                continue
            if self.tick - relay.last_heard > relay.limit:
                given_up.append(relay)
            else:
                relay.beat()
        if given_up:
            delay = given_up[0].backoff
            log.warning(
                "nothing heard from the producer at %s for %.3gs (stopped, unreachable, or"
                " refusing our keys: check its --allow and our --server-key): %d workers join"
                " again in %.3gs",
                self.endpoint,
                (self.tick - given_up[0].last_heard) * self.heartbeat,
                len(given_up),
                delay,
            )
            for relay in given_up:
                relay.rotate(0 if self.leaving else relay.backoff)
                relay.backoff = min(RECONNECT_MAX, relay.backoff * 2)
        self.check_done()

    async def _teardown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watch is not None:
            self._watch.cancel()
        # From here the supervisor's exit and the workers' are expected.
        self.supervisor.on_lost = _nothing
        for relay in list(self.relays.values()):
            if relay.sock is not None and relay.owed and not relay.gone:
                relay._to_producer(
                    wp.frame(wp.LOST, wp.job_id(0), b"its host stopped before it finished")
                )
            relay.leaving = True
            relay.close_socket(LINGER_MS)
            # As a producer stops: idle workers' links end (they leave at EOF), busy ones
            # (past the grace: their jobs were just failed) are killed; at once, all are.
            if relay.transport is not None and not relay.gone:
                if relay.owed or relay.stale or self.at_once:
                    self.supervisor.kill(relay.pid)
                relay.transport.close()
        code = await self.supervisor.stop(term_timeout=TERM_TIMEOUT)
        if code not in (0, None) and self.exit_code == 0:
            log.warning("supervisor exited with code %d", code)
        self.supervisor.close()
        self.ctx.term()  # waits at most LINGER_MS for the last messages
        log.info("worker host %s stopped", self.node)


def _nothing() -> None:
    pass


def run_worker_host(
    consumer: Consumer | type[Consumer] | Handler,
    endpoint: str,
    *,
    processes: int | None = None,
    key: str | None = None,
    server_key: str | None = None,
    heartbeat: float = 1.0,
    grace: float = 30.0,
    insecure_workers: bool = False,
    use_uvloop: bool | None = None,
    target: str | None = None,
    max_requests: int | None = None,
    max_requests_jitter: int = 0,
    max_worker_memory: int | None = None,
    liveness_timeout: float = DEFAULTS["liveness_timeout"],
) -> int:
    """Run a worker host in this process until SIGTERM/SIGINT/SIGQUIT; return its exit code.

    Forks a supervisor with `processes` workers (None: one per CPU this
    process may use) that join the producer's pool at `endpoint`.  `key` is
    this host's secret certificate, `server_key` the producer's public one
    (CURVE; both required for tcp:// unless `insecure_workers` on loopback).
    `target` (MODULE:ATTR) is what SIGHUP re-imports (None: the workers are
    replaced with the same code); `max_requests`, `max_requests_jitter` and
    `max_worker_memory` (MiB) recycle workers, and `liveness_timeout` has an
    idle worker that says nothing for so long killed and replaced, as a
    producer's options of those names do.
    Call it from a process with no event loop, thread or ZeroMQ context of
    its own yet: it forks.  Raises ValueError (one line) for what it refuses.
    """
    from .producer import available_cpus

    if not heartbeat > 0 or not grace >= 0:
        raise ValueError("heartbeat must be above 0 and grace at least 0")
    if processes is not None and processes < 1:
        raise ValueError(f"processes must be at least 1 or None, got {processes!r}")
    o = validate(
        max_requests=max_requests,
        max_requests_jitter=max_requests_jitter,
        max_worker_memory=max_worker_memory,
        liveness_timeout=liveness_timeout,
    )
    memory = o["max_worker_memory"]
    limits = WorkerLimits(
        o["max_requests"],
        o["max_requests_jitter"],
        None if memory is None else memory << 20,
        o["liveness_timeout"],
    )
    keys = host_keys(endpoint, key, server_key, insecure_workers)
    count = processes or available_cpus()
    supervisor = SupervisorLink.fork(
        as_consumer(consumer), count, MAX_JOB, target=target, limits=limits
    )
    from .loop import new_event_loop

    loop = new_event_loop(use_uvloop)
    try:

        async def main() -> int:
            host = WorkerHost(
                supervisor,
                endpoint,
                keys=keys,
                heartbeat=heartbeat,
                grace=grace,
                processes=count,
                liveness=limits.liveness,
            )
            return await host.run()

        return loop.run_until_complete(main())
    finally:
        loop.close()

"""The dispatcher: hands each request to an idle worker over ZeroMQ.

This is the ZeroMQ Guide's load-balancing broker.  Workers connect DEALER
sockets to our ROUTER and say READY; we keep one queue of waiting jobs and one
queue of idle workers, and send a job only to a worker that is idle.  A long
job therefore never holds up a short one while another worker is free, unlike
PUSH/PULL round-robin, which deals work ahead to busy workers.

The dispatcher does not care where a worker runs: it knows a worker by its
ZeroMQ identity, and learns of deaths through :meth:`worker_exited` (from the
local supervisor today; from heartbeats once remote workers join).  Killing a
worker whose job ran past its deadline is delegated to the `kill` callback.

Every job ends exactly once, through its callback, with one :class:`Status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

import zmq

from . import workerproto as wp
from .protocol import Status

log = logging.getLogger("gaspar.dispatcher")

# A READY from a pid reported dead this recently is stale and is ignored.
STALE_READY_WINDOW = 60.0
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)


Callback = Callable[[Status, bytes | memoryview], None]


class Job:
    """One request on its way through the dispatcher."""

    __slots__ = ("callback", "id", "payload", "timer", "worker")

    def __init__(self, n: int, payload: bytes | bytearray, callback: Callback) -> None:
        self.id = wp.job_id(n)
        self.payload: bytes | bytearray | None = payload
        self.callback: Callback | None = callback
        self.worker: WorkerSlot | None = None
        self.timer: asyncio.TimerHandle | None = None


class WorkerSlot:
    """What the dispatcher knows of one worker."""

    __slots__ = ("doomed", "host", "identity", "job", "pid")

    def __init__(self, identity: bytes, pid: int, host: str) -> None:
        self.identity = identity
        self.pid = pid
        self.host = host
        self.job: Job | None = None
        self.doomed = False


class Dispatcher:
    """Load-balances jobs across workers behind a ROUTER socket."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        *,
        kill: Callable[[int], None],
        timeout: float | None = None,
        max_queue: int = 1000,
    ) -> None:
        self.timeout = timeout
        self.max_queue = max_queue
        self._kill = kill
        self._loop = asyncio.get_running_loop()
        self._sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._fd: int = self._sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._loop.add_reader(self._fd, self._on_readable)
        self._check_scheduled = False
        self._counter = 0
        self._pending: deque[Job] = deque()
        self._idle: deque[WorkerSlot] = deque()
        self._workers: dict[bytes, WorkerSlot] = {}
        self._by_pid: dict[int, WorkerSlot] = {}
        self._recently_exited: dict[int, float] = {}
        self._busy = 0
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    # -- public ----------------------------------------------------------------

    @property
    def ready_workers(self) -> int:
        """Workers that said READY and are not known to be dead or doomed."""
        return sum(1 for slot in self._workers.values() if not slot.doomed)

    def worker_pids(self) -> list[int]:
        """Pids of the workers that are ready to take jobs or running one."""
        slots = list(self._workers.values())  # one C call: safe from another thread
        return sorted(slot.pid for slot in slots if not slot.doomed)

    @property
    def outstanding(self) -> int:
        """Jobs queued or running."""
        return self._busy

    def submit(self, payload: bytes | bytearray, callback: Callback) -> Job | None:
        """Queue `payload` for the next idle worker; None when the queue is full."""
        if not self._idle and len(self._pending) >= self.max_queue:
            return None
        self._counter += 1
        job = Job(self._counter, payload, callback)
        self._busy += 1
        if self._idle:
            self._send(self._idle.popleft(), job)
            # A send can consume the edge-triggered FD's notice of pending
            # input: look now, and read on the next loop pass if there is some.
            if self._sock.get(EVENTS) & POLLIN:  # type: ignore[operator]
                self._schedule_check()
        else:
            self._pending.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """Forget a job whose client has gone; a running one is left to finish."""
        if job.callback is None:
            return
        job.callback = None
        if job.worker is None:
            try:
                self._pending.remove(job)
            except ValueError:
                return
            self._done()

    def worker_exited(self, pid: int, code: int) -> None:
        """A worker process ended: fail its job, if any, and forget it."""
        slot = self._by_pid.pop(pid, None)
        if slot is None:
            now = time.monotonic()
            self._recently_exited = {
                p: t for p, t in self._recently_exited.items() if now - t < STALE_READY_WINDOW
            }
            self._recently_exited[pid] = now
            self._notify()
            return
        self._remove(slot)
        if not slot.doomed:
            log.warning("worker %d exited unexpectedly (code %d)", pid, code)
        if slot.job is not None:
            self._finish(slot.job, Status.WORKER_LOST, b"the worker running the request died")
        self._notify()

    def retire(self) -> None:
        """Take every worker out of service: they are about to be stopped."""
        self._idle.clear()
        for slot in self._workers.values():
            slot.doomed = True

    def fail_all(self, outcome: Status, message: bytes) -> None:
        """End every queued and running job with `outcome` (used at shutdown)."""
        while self._pending:
            self._finish(self._pending.popleft(), outcome, message)
        for slot in list(self._workers.values()):
            if slot.job is not None:
                job, slot.job = slot.job, None
                self._finish(job, outcome, message)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until `predicate()` holds, re-checked after each worker or job event."""
        if predicate():
            return True
        fut = self._loop.create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def close(self) -> None:
        """Stop reading and close the ROUTER socket."""
        self._loop.remove_reader(self._fd)
        self._sock.close(linger=0)

    # -- jobs ------------------------------------------------------------------

    def _send(self, slot: WorkerSlot, job: Job) -> None:
        """Give `job` to the idle worker `slot`, or requeue it if that worker vanished."""
        payload = job.payload
        assert payload is not None
        try:
            self._sock.send(slot.identity, wp.SNDMORE)
            wp.send(self._sock, wp.JOB, job.id, payload)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: ZeroMQ already knows the peer is gone.
            log.warning("worker %d unreachable (%s); requeueing job", slot.pid, exc)
            self._remove(slot)
            self._by_pid.pop(slot.pid, None)
            self._pending.appendleft(job)
            self._dispatch()
            return
        job.payload = None
        job.worker = slot
        slot.job = job
        if self.timeout is not None:
            job.timer = self._loop.call_later(self.timeout, self._expire, slot, job)

    def _dispatch(self) -> None:
        while self._idle and self._pending:
            self._send(self._idle.popleft(), self._pending.popleft())

    def _finish(self, job: Job, outcome: Status, data: bytes | memoryview) -> None:
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        job.worker = None
        callback, job.callback = job.callback, None
        if callback is not None:
            try:
                callback(outcome, data)
            except Exception:
                log.exception("job callback failed")
        self._done()

    def _done(self) -> None:
        self._busy -= 1
        if self._waiters:
            self._notify()

    def _expire(self, slot: WorkerSlot, job: Job) -> None:
        if slot.job is not job:
            return
        slot.job = None
        slot.doomed = True
        log.warning(
            "job ran past the %.3gs timeout in worker %d; killing it", self.timeout, slot.pid
        )
        self._finish(job, Status.TIMEOUT, b"request ran past the server's timeout")
        self._kill(slot.pid)

    # -- workers ---------------------------------------------------------------

    def _remove(self, slot: WorkerSlot) -> None:
        self._workers.pop(slot.identity, None)
        with contextlib.suppress(ValueError):
            self._idle.remove(slot)

    def _became_idle(self, slot: WorkerSlot) -> None:
        if self._pending:
            self._send(slot, self._pending.popleft())
        else:
            self._idle.append(slot)

    def _notify(self) -> None:
        for predicate, fut in list(self._waiters):
            if not fut.done() and predicate():
                fut.set_result(None)

    # -- socket ----------------------------------------------------------------

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
        while sock.get(EVENTS) & POLLIN:  # type: ignore[operator]
            identity = sock.recv(wp.NOBLOCK)
            try:
                if not sock.get(wp.RCVMORE):
                    raise ValueError("message without a body")
                kind, jid, body = wp.split(sock.recv(wp.NOBLOCK), sock, wp.NOBLOCK, copy=False)
                self._handle(identity, kind, jid, body)
            except Exception:
                log.exception("malformed message from a worker dropped")

    def _handle(self, identity: bytes, kind: bytes, jid: bytes, body: bytes | memoryview) -> None:
        if kind == wp.DONE or kind == wp.FAILED:
            slot = self._workers.get(identity)
            if slot is None or slot.doomed:
                return
            job = slot.job
            if job is None or job.id != jid:
                log.warning("worker %d sent a reply for a job it does not hold", slot.pid)
                return
            slot.job = None
            # The worker's next job first: it then runs while this reply is written.
            self._became_idle(slot)
            self._finish(job, Status.OK if kind == wp.DONE else Status.HANDLER_ERROR, body)
        elif kind == wp.READY:
            info = wp.parse_ready(bytes(body))
            pid = int(info["pid"])  # type: ignore[call-overload]
            exited_at = self._recently_exited.pop(pid, None)
            if identity in self._workers or (
                exited_at is not None and time.monotonic() - exited_at < STALE_READY_WINDOW
            ):
                return
            slot = WorkerSlot(identity, pid, str(info.get("host", "")))
            self._workers[identity] = slot
            self._by_pid[pid] = slot
            log.debug("worker %d ready", pid)
            self._became_idle(slot)
            self._notify()

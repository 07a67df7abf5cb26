"""The dispatcher: hands each request to an idle worker, over whatever link reaches it.

This is the ZeroMQ Guide's load-balancing broker.  Workers say READY; we keep
one queue of waiting jobs and one queue of idle workers, and send jobs only to
a worker that is idle.  A long job therefore never holds up a short one while
another worker is free, unlike PUSH/PULL round-robin, which deals work ahead
to busy workers.

Batches: when jobs are waiting for every worker and the handler's recent runs
have all been short (see BATCH_BUDGET), a freed worker is sent several waiting
jobs in one message: the queue, less one job for each other worker.  It runs
them in order and answers each as soon as it is done.  That spreads the cost
per message (a wake-up of the worker, a system call each way) over the batch,
which is most of what tiny jobs cost.  A batch is sized to run within
BATCH_BUDGET, so what it can hold up is bounded, and any handler run longer
than half of that stops batching until it has been forgotten.

The dispatcher does not care where a worker runs or how its messages travel:
a worker link (gaspar/links.py: the local Unix link; gaspar/link_zmq.py: the
ZeroMQ one) tells it of READY (:meth:`worker_ready`, which gives the link the
worker's :class:`WorkerSlot`), of replies (:meth:`handle_reply`) and of a
worker's loss (:meth:`worker_lost`), and carries its jobs and its requests to
kill a worker whose job ran past its deadline.  A worker is known by its slot,
which its link made from an identity of its own, never by its pid alone.

Every job ends exactly once, through its callback, with one :class:`Status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import workerproto as wp
from .metrics import BOUNDS, WORKER_STATES, Histogram, clock
from .protocol import Status
from .workerproto import BATCH_BYTES, BATCH_MAX

if TYPE_CHECKING:
    from .links import WorkerLink

__all__ = ["BATCH_BUDGET", "BATCH_BYTES", "BATCH_MAX", "Dispatcher", "Job", "WorkerSlot"]

log = logging.getLogger("gaspar.dispatcher")

# Batches (at most wp.BATCH_MAX jobs and wp.BATCH_BYTES of payload) are sized
# to run within BATCH_BUDGET seconds by the handler's recent peak run time,
# which decays by PEAK_DECAY with each reply.
BATCH_BUDGET = 0.001
PEAK_DECAY = 0.98


Callback = Callable[[Status, bytes | memoryview], None]
NO_DEADLINE = float("inf")
LATE_MESSAGE = b"deadline too near for the request to finish: not run"


def _nothing() -> None:
    pass


def _no_slot(slot: WorkerSlot) -> None:
    pass


class WorkerUnreachable(Exception):
    """A link could not hand a message to a worker: it is gone, though not yet reported lost."""


class Job:
    """One request on its way through the dispatcher.

    Its times (of :func:`gaspar.metrics.clock`) and its handler's run time feed
    the histograms and the access log; `worker` stays set once it has ended,
    so that the access log can name the worker that held it.
    """

    __slots__ = (
        "callback",
        "deadline",
        "id",
        "micros",
        "payload",
        "started",
        "submitted",
        "timer",
        "worker",
    )

    def __init__(self, n: int, payload: bytes | bytearray, callback: Callback, now: float) -> None:
        self.id = wp.job_id(n)
        self.payload: bytes | bytearray | None = payload
        self.callback: Callback | None = callback
        self.worker: WorkerSlot | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.submitted = now
        self.started = 0.0  # 0 until a worker runs it
        self.micros = -1  # the handler's run time, from its reply; -1 without one
        # When its client gives up (of clock(); the caller sets it): see _skip_late.
        self.deadline = NO_DEADLINE


class WorkerSlot:
    """What the dispatcher knows of one worker: its link, the link's key for it, its jobs."""

    __slots__ = ("batch", "doomed", "host", "job", "key", "leaving", "link", "pid")

    def __init__(self, link: WorkerLink, key: object, pid: int, host: str) -> None:
        self.link = link
        self.key = key  # the link's identity of the worker (a ZeroMQ identity, a connection)
        self.pid = pid  # information, and what the local supervisor kills
        self.host = host
        # The job it is running (the one whose reply comes next), and the rest
        # of its batch, which it runs after it, in order.
        self.job: Job | None = None
        self.batch: deque[Job] = deque()
        # Taken out of service (killed, lost, retiring): its replies are dropped.
        self.doomed = False
        # It said GOODBYE: it gets nothing more, and leaves the pool once it has
        # answered what it holds.
        self.leaving = False


class Dispatcher:
    """Load-balances jobs across the workers of its links."""

    def __init__(self, *, timeout: float | None, max_queue: int) -> None:
        self.timeout = timeout
        self.max_queue = max_queue
        self._loop = asyncio.get_running_loop()
        self.links: list[WorkerLink] = []
        # True from a link's first read of replies in a loop pass until that
        # pass is over; on_replies runs then, so that what every reply of the
        # pass produced (v2 replies, on any connection) is written in one go.
        self.reading = False
        self.on_replies: Callable[[], None] = _nothing
        self._counter = 0
        self._pending: deque[Job] = deque()
        self._idle: deque[WorkerSlot] = deque()
        self._workers: dict[WorkerSlot, None] = {}  # in the order they came
        self._busy = 0
        self._abandoned = 0  # of _busy: running (or batched) jobs whose client has gone
        # The handler's recent peak run time (s); unknown counts as the budget.
        self._peak = BATCH_BUDGET
        self.batches = 0  # batches sent so far
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._retired = False  # no worker joins once retire() was called
        # Seconds from submit to start, of the handler's run, from submit to end.
        self.queue_wait = Histogram()
        self.handler_time = Histogram()
        self.latency = Histogram()
        # Told of each worker killed because its job ran past the timeout.
        self.on_timeout_kill: Callable[[WorkerSlot], None] = _no_slot

    # -- public ----------------------------------------------------------------

    @property
    def ready_workers(self) -> int:
        """Workers that said READY and are not known to be dead or doomed."""
        slots = list(self._workers)  # one C call: stats() may ask from another thread
        return sum(1 for slot in slots if not (slot.doomed or slot.leaving))

    def worker_pids(self) -> list[int]:
        """Pids of the workers that are ready to take jobs or running one."""
        slots = list(self._workers)  # one C call: safe from another thread
        return sorted(slot.pid for slot in slots if not (slot.doomed or slot.leaving))

    def busy_pids(self, link: WorkerLink) -> list[int]:
        """Pids of `link`'s workers that are not idle: running a job, even one failed since."""
        idle = set(self._idle)
        return [slot.pid for slot in self._workers if slot.link is link and slot not in idle]

    def stats(self) -> dict[str, int]:
        """Plain numbers for :meth:`gaspar.Producer.stats`: queue, jobs running, workers."""
        queued = len(self._pending)
        return {
            "queued": queued,
            "in_flight": self._busy - queued,
            "workers": self.ready_workers,
            "batches": self.batches,
        }

    def worker_states(self) -> dict[str, int]:
        """Workers by state: idle, busy (holding a job), leaving (said GOODBYE)."""
        slots = list(self._workers)  # one C call: safe from another thread
        states = dict.fromkeys(WORKER_STATES, 0)
        for slot in slots:
            if slot.doomed:
                continue
            if slot.leaving:
                states["leaving"] += 1
            elif slot.job is not None:
                states["busy"] += 1
            else:
                states["idle"] += 1
        return states

    def link_pids(self, link: object) -> list[int]:
        """Pids of the workers of `link` that are in service (the local ones, for their memory)."""
        slots = list(self._workers)
        return [slot.pid for slot in slots if slot.link is link and not slot.doomed]

    @property
    def outstanding(self) -> int:
        """Jobs queued or running."""
        return self._busy

    @property
    def awaited(self) -> int:
        """Jobs queued or running that a client still waits for (what a stop waits for)."""
        return self._busy - self._abandoned

    def submit(self, payload: bytes | bytearray, callback: Callback) -> Job | None:
        """Queue `payload` for the next idle worker; None when the queue is full."""
        if not self._idle and len(self._pending) >= self.max_queue:
            return None
        self._counter += 1
        job = Job(self._counter, payload, callback, clock())
        self._busy += 1
        if self._idle:
            self._send(self._idle.popleft(), [job])
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
        else:  # it runs on, for nobody: a stop need not wait for it
            self._abandoned += 1
            if self._waiters:
                self.notify()

    def retire(self) -> None:
        """Take every worker out of service: they are about to be stopped."""
        self._retired = True
        self._idle.clear()
        for slot in self._workers:
            slot.doomed = True

    def fail_queued(self, outcome: Status, message: bytes) -> None:
        """End every job still waiting for a worker with `outcome`."""
        while self._pending:
            self._finish(self._pending.popleft(), outcome, message)

    def fail_all(self, outcome: Status, message: bytes) -> None:
        """End every queued and running job with `outcome` (used at shutdown)."""
        self.fail_queued(outcome, message)
        for slot in list(self._workers):
            if slot.job is not None:
                job, slot.job = slot.job, None
                self._finish(job, outcome, message)
            while slot.batch:
                self._finish(slot.batch.popleft(), outcome, message)

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
        """Close every link."""
        for link in self.links:
            link.close()
        self.links.clear()

    # -- what links tell us ------------------------------------------------------

    def worker_ready(self, link: WorkerLink, key: object, info: wp.ReadyInfo) -> WorkerSlot | None:
        """A worker said READY on `link`: its slot, or None if no worker may join now."""
        if self._retired:
            return None
        slot = WorkerSlot(link, key, info.pid, info.host)
        self._workers[slot] = None
        log.debug("worker %d ready", info.pid, extra={"worker": info.pid})
        try:
            self._became_idle(slot)
        except Exception:
            log.exception("dispatcher bug while handling a worker's message")
        self.notify()
        return slot

    def begin_pass(self) -> None:
        """A link is about to read replies: on_replies runs once this loop pass is over."""
        if not self.reading:
            self.reading = True
            self._loop.call_soon(self._end_pass)

    def _end_pass(self) -> None:
        self.reading = False
        self.on_replies()

    def handle_reply(
        self, slot: WorkerSlot, kind: bytes, jid: bytes, number: int, body: bytes | memoryview
    ) -> None:
        """A DONE or FAILED from `slot`'s worker (read after :meth:`begin_pass`)."""
        try:
            self._reply(slot, kind, jid, number, body)
        except Exception:
            # Our own bug, not the worker's: say so, and read on.
            log.exception("dispatcher bug while handling a worker's message")

    def worker_leaving(self, slot: WorkerSlot) -> None:
        """`slot`'s worker said GOODBYE: send it nothing more; it leaves once it is idle.

        Its job and the rest of its batch are still answered (a worker sends
        GOODBYE before its last reply); it is no longer counted as ready.
        """
        if slot not in self._workers or slot.leaving:
            return
        slot.leaving = True
        if slot.job is None and not slot.batch:
            self._remove(slot)
        self.notify()

    def worker_lost(self, slot: WorkerSlot, reason: str) -> None:
        """`slot`'s worker is gone (its link closed, or it was reported dead): fail its jobs.

        The rest of its batch fails too: whether the worker had started the
        next job before it died cannot be known, and a job never runs twice.
        """
        if slot not in self._workers:
            return
        self._remove(slot)
        if not slot.doomed:
            log.warning("worker %d lost: %s", slot.pid, reason, extra={"worker": slot.pid})
        slot.doomed = True
        if slot.job is not None:
            job, slot.job = slot.job, None
            self._finish(job, Status.WORKER_LOST, b"the worker running the request died")
        while slot.batch:
            self._finish(
                slot.batch.popleft(), Status.WORKER_LOST, b"the worker holding the request died"
            )
        self.notify()

    # -- jobs ------------------------------------------------------------------

    def _send(self, slot: WorkerSlot, jobs: list[Job]) -> None:
        """Give `jobs` to the idle worker `slot` (one JOB, or a BATCH it runs in order).

        If that worker has vanished, the jobs go back to the head of the queue.
        """
        first = jobs[0]
        try:
            if len(jobs) == 1:
                slot.link.send(slot, wp.JOB, first.id, first.payload)  # type: ignore[arg-type]
            else:
                body = wp.pack_batch([(job.id, job.payload) for job in jobs])  # type: ignore[misc]
                slot.link.send(slot, wp.BATCH, first.id, body, len(jobs))
        except WorkerUnreachable as exc:
            log.warning(
                "worker %d unreachable (%s); requeueing", slot.pid, exc, extra={"worker": slot.pid}
            )
            self._remove(slot)
            slot.doomed = True
            self._pending.extendleft(reversed(jobs))
            self._dispatch()
            return
        for job in jobs:
            job.worker = slot
        if len(jobs) > 1:
            self.batches += 1
            slot.batch.extend(jobs[1:])
        self._start(slot, first)

    def _start(self, slot: WorkerSlot, job: Job) -> None:
        """`job` is the one `slot` runs now: its timeout starts."""
        job.payload = None
        slot.job = job
        job.started = now = clock()
        # Histogram.observe inlined here and below: the call would double its cost.
        wait, h = now - job.submitted, self.queue_wait
        h.counts[bisect_left(BOUNDS, wait)] += 1
        h.sum += wait
        if self.timeout is not None:
            job.timer = self._loop.call_later(self.timeout, self._expire, slot, job)

    def _take_batch(self) -> list[Job]:
        """Jobs from the head of the queue for one worker: one, or a batch."""
        pending = self._pending
        first = pending.popleft()
        if not pending or self._peak * 2 > BATCH_BUDGET:
            return [first]
        size = len(first.payload)  # type: ignore[arg-type]
        share = len(pending) + 2 - max(1, len(self._workers))
        limit = min(BATCH_MAX, share, int(BATCH_BUDGET / max(self._peak, 1e-6)))
        if size >= wp.SPLIT_BODY or limit < 2:
            return [first]
        jobs = [first]
        while pending and len(jobs) < limit:
            size += len(pending[0].payload)  # type: ignore[arg-type]
            if size > BATCH_BYTES:
                break
            jobs.append(pending.popleft())
        return jobs

    def _dispatch(self) -> None:
        while self._idle and self._pending:
            self._became_idle(self._idle.popleft())

    def _finish(self, job: Job, outcome: Status, data: bytes | memoryview) -> None:
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        callback, job.callback = job.callback, None
        if callback is not None:
            took, h = clock() - job.submitted, self.latency
            h.counts[bisect_left(BOUNDS, took)] += 1
            h.sum += took
            try:
                callback(outcome, data)
            except Exception:
                log.exception("job callback failed")
        else:
            self._abandoned -= 1
        self._done()

    def _done(self) -> None:
        self._busy -= 1
        if self._waiters:
            self.notify()

    def _expire(self, slot: WorkerSlot, job: Job) -> None:
        if slot.job is not job:
            return
        slot.job = None
        slot.doomed = True
        log.warning(
            "job ran past the %.3gs timeout in worker %d; killing it",
            self.timeout,
            slot.pid,
            extra={"worker": slot.pid},
        )
        # The rest of its batch waits behind the stuck job: it goes back to the
        # head of the queue (those whose clients have gone are dropped).
        while slot.batch:
            held = slot.batch.pop()
            held.worker = None
            if held.callback is None:
                self._abandoned -= 1
                self._done()
            else:
                self._pending.appendleft(held)
        self._finish(job, Status.TIMEOUT, b"request ran past the server's timeout")
        self.on_timeout_kill(slot)
        slot.link.kill(slot)
        self._dispatch()

    def _reply(
        self, slot: WorkerSlot, kind: bytes, jid: bytes, number: int, body: bytes | memoryview
    ) -> None:
        if slot.doomed:
            return
        job = slot.job
        if job is None or job.id != jid:
            log.warning(
                "worker %d sent a reply for a job it does not hold",
                slot.pid,
                extra={"worker": slot.pid},
            )
            return
        slot.job = None
        job.micros = number
        run = number / 1e6
        h = self.handler_time
        h.counts[bisect_left(BOUNDS, run)] += 1
        h.sum += run
        try:
            self._peak = max(run, self._peak * PEAK_DECAY)
            # The worker's next job first: it then runs while this reply is written.
            if slot.batch:
                self._start(slot, slot.batch.popleft())
            elif slot.leaving:
                self._remove(slot)
                self.notify()
            else:
                self._became_idle(slot)
        finally:  # whatever went wrong above, this job ends
            self._finish(job, Status.OK if kind == wp.DONE else Status.HANDLER_ERROR, body)

    # -- workers ---------------------------------------------------------------

    def _remove(self, slot: WorkerSlot) -> None:
        self._workers.pop(slot, None)
        with contextlib.suppress(ValueError):
            self._idle.remove(slot)

    def _became_idle(self, slot: WorkerSlot) -> None:
        pending = self._pending
        if pending and pending[0].deadline != NO_DEADLINE:
            self._skip_late()
        if not pending:
            self._idle.append(slot)
            return
        self._send(slot, self._take_batch())

    def _skip_late(self) -> None:
        """Fail (TIMEOUT, never run) the jobs at the head of the queue whose deadline is
        nearer than the handler's recent peak run time.

        Under overload the queue's head is the job nearest its deadline; run,
        it would mostly finish after its client had given up (worker time
        spent for nobody: benchmarks/overload.py measures the share).
        """
        pending, now = self._pending, clock()
        while pending and pending[0].deadline - now < self._peak:
            self._finish(pending.popleft(), Status.TIMEOUT, LATE_MESSAGE)

    def notify(self) -> None:
        """Re-check what :meth:`wait_for` waits for (after an event it cannot see)."""
        for predicate, fut in list(self._waiters):
            if not fut.done() and predicate():
                fut.set_result(None)

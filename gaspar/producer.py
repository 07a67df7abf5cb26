"""The producer: a TCP server in front of a pool of worker processes.

It owns the order of start and stop, and nothing else: the supervisor owns
processes, the dispatcher owns jobs, the server owns connections.

Start: fork the supervisor (before any loop or thread exists), then on the
event loop make the dispatcher and its local worker link and bind the TCP
port, let the supervisor fork workers (each worker's link comes back with its
"spawned" line), and wait until every worker has said READY.

Stop: stop accepting, let queued and running requests finish within the
grace period, fail the rest, flush replies, retire the workers and the
supervisor, and close the links.  Nothing is left on disk: there is none.

asyncio, uvloop, the server and the dispatcher are imported only once the
supervisor is forked, so that it and every worker are spared their memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import options
from . import workerproto as wp
from .address import format_address
from .consumer import Consumer, Handler, as_consumer
from .errors import StartupError
from .options import DEFAULTS
from .protocol import MAX_LENGTH, Limits, Status
from .supervisor import SupervisorLink
from .worker import WorkerLimits

if TYPE_CHECKING:
    import asyncio

    from .dispatcher import Dispatcher
    from .links import LocalLink
    from .server import Server

log = logging.getLogger("gaspar.producer")

NEW, STARTING, RUNNING, STOPPING, STOPPED = "new", "starting", "running", "stopping", "stopped"
# What the producer's own process does on each signal, when it runs the main thread.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CONTROL_SIGNALS = (*STOP_SIGNALS, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
STOPPED_EARLY = "stopped before the workers were ready"

# glibc's mallopt parameters, and what tune_malloc sets them to.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20


def _nothing() -> None:
    pass


def _ignore_setup_failure(pid: int, backoff: float, error: str) -> None:
    pass


def describe_exit(code: int) -> str:
    """How a process ended, from its exit code (minus a signal's number): for a log line."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def tune_malloc() -> bool:
    """Keep large buffers of this process on glibc's heap, for reuse; False if not glibc.

    By default glibc maps every allocation above a threshold that adapts upward
    as such blocks are freed (from 128 KiB), and returns freed memory at the
    heap's top beyond twice that; a server of megabyte-sized requests then
    still maps, faults in and zeroes fresh pages for many of its buffers.
    Fixed thresholds (blocks below 4 MiB come from the heap, and up to 32 MiB of
    free memory at its top is kept) let them be reused instead.  This is
    process-wide, so the producer does it only when asked (``gaspar serve``
    asks), and only in its own process, after forking the supervisor.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


class Producer:
    """Serve `consumer` on a TCP port with a pool of forked worker processes.

    ``start()`` blocks until ``stop()``, SIGINT or SIGTERM; ``start(blocking=False)``
    returns once the port is bound and every worker is ready.  As a context
    manager the producer starts in the background and stops on exit.  A
    producer starts once.

    A blocking ``start()`` in the main thread acts on signals (see
    docs/operations.md): TERM and INT stop gracefully, a second one or QUIT
    at once; HUP is :meth:`reload`; TTIN and TTOU add and remove a worker.
    """

    def __init__(
        self,
        consumer: Consumer | type[Consumer] | Handler,
        port: int,
        processes: int | None = DEFAULTS["processes"],
        host: str = DEFAULTS["host"],
        *,
        timeout: float | None = DEFAULTS["timeout"],
        max_message_size: int = DEFAULTS["max_message_size"],
        max_queue: int = DEFAULTS["max_queue"],
        max_connections: int = DEFAULTS["max_connections"],
        read_timeout: float = DEFAULTS["read_timeout"],
        write_timeout: float = DEFAULTS["write_timeout"],
        max_pipeline: int = DEFAULTS["max_pipeline"],
        idle_timeout: float = DEFAULTS["idle_timeout"],
        grace: float = DEFAULTS["grace"],
        use_uvloop: bool | None = DEFAULTS["use_uvloop"],
        tune_malloc: bool = DEFAULTS["tune_malloc"],
        max_requests: int | None = DEFAULTS["max_requests"],
        max_requests_jitter: int = DEFAULTS["max_requests_jitter"],
        max_worker_memory: int | None = DEFAULTS["max_worker_memory"],
        liveness_timeout: float = DEFAULTS["liveness_timeout"],
    ) -> None:
        # Every option is checked against gaspar/options.py; a bad one is a
        # one-line ValueError naming it and what it may be.
        given = locals()
        o = options.validate(**{opt.name: given[opt.name] for opt in options.PRODUCER_OPTIONS})
        self.consumer = as_consumer(consumer)
        self.options: dict[str, Any] = o  # every option, checked, by name
        self.host: str = o["host"]
        self.port: int = o["port"]
        self.processes: int = o["processes"] or available_cpus()
        self.timeout: float | None = o["timeout"]
        self.max_queue: int = o["max_queue"]
        self.grace: float = o["grace"]
        self.use_uvloop: bool | None = o["use_uvloop"]
        self.tune_malloc: bool = o["tune_malloc"]
        self.limits = Limits(
            o["max_message_size"],
            o["max_connections"],
            o["read_timeout"],
            o["write_timeout"],
            max_pipeline=o["max_pipeline"],
            idle_timeout=o["idle_timeout"],
        )
        self.worker_limits = WorkerLimits(
            o["max_requests"],
            o["max_requests_jitter"],
            None if o["max_worker_memory"] is None else o["max_worker_memory"] << 20,
            o["liveness_timeout"],
        )
        # MODULE:ATTR of the consumer, which a reload re-imports (`gaspar serve`
        # sets it); None: a reload replaces the workers with the same code.
        self.target: str | None = None
        self.state = NEW
        self.address: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._startup_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_grace: float | None = None
        self._stop_requested = False  # by stop(), possibly before the loop exists
        self._supervisor_lost = False
        self._link: SupervisorLink | None = None
        self._dispatcher: Dispatcher | None = None
        self._local: LocalLink | None = None
        self._server: Server | None = None

    # -- public ----------------------------------------------------------------

    def start(self, blocking: bool = True) -> None:
        """Serve; block until stopped, or with blocking=False return once ready."""
        with self._lock:
            if self.state != NEW:
                raise RuntimeError(f"producer already {self.state}")
            self.state = STARTING
        try:
            self._link = SupervisorLink.fork(
                self.consumer,
                self.processes,
                wp.max_job_body(self.limits.max_message_size),
                target=self.target,
                limits=self.worker_limits,
            )
        except BaseException as exc:
            with self._lock:
                self.state = STOPPED
            self._ready.set()
            self._finished.set()
            if isinstance(exc, OSError):
                log.error("could not start: cannot fork the supervisor: %s", exc)
                raise StartupError(f"cannot fork the supervisor: {exc}") from exc
            raise
        if self.tune_malloc:
            if tune_malloc():
                log.info(
                    "malloc tuned: blocks below %d MiB from the heap, %d MiB of free heap kept",
                    MMAP_THRESHOLD >> 20,
                    TRIM_THRESHOLD >> 20,
                )
            else:
                log.info("tune_malloc: not glibc; malloc left as it is")
        if blocking:
            self._run(install_signals=threading.current_thread() is threading.main_thread())
            if self._startup_error is not None:
                raise self._startup_error
            return
        self._loop_thread = threading.Thread(
            target=self._run, args=(False,), name="gaspar-producer", daemon=True
        )
        self._loop_thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._loop_thread.join()
            raise self._startup_error

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; requests in flight get up to `grace` seconds to finish.

        Safe from any thread.  Returns once every worker and the supervisor
        have exited, unless called from the producer's own event loop.
        """
        with self._lock:
            if self.state in (NEW, STOPPED):
                return
            if not self._stop_requested:
                # Seen by _main even if its loop does not exist yet.
                self._stop_requested, self._stop_grace = True, grace
            if self.state == STARTING:
                self.state = STOPPING
            loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._request_stop, grace)
        if self._in_loop_thread():
            return
        self._finished.wait()
        if self._loop_thread is not None:
            self._loop_thread.join()

    def reload(self) -> None:
        """Replace every worker with a fresh one, one at a time, with no request failed.

        With :attr:`target` set (``gaspar serve`` sets it), the supervisor first
        re-imports that module, so that new code is served; a module that fails
        to import leaves the old workers serving, and the log says why.  A
        handler given from Python keeps its code: only the processes are new.
        Safe from any thread; returns at once (see docs/operations.md).
        """
        self._control(lambda link: link.reload())

    def scale(self, processes: int) -> None:
        """Have `processes` workers (at least 1); safe from any thread; returns at once."""
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be an integer at least 1, got {processes!r}")

        def rescale(link: SupervisorLink) -> None:
            self.processes = processes
            link.scale(processes)

        self._control(rescale)

    def _control(self, order: Callable[[SupervisorLink], None]) -> None:
        """Run `order` on the supervisor's link from the producer's loop (any thread)."""
        with self._lock:
            loop, link, state = self._loop, self._link, self.state
        if state != RUNNING or loop is None or link is None:
            raise RuntimeError(f"producer {state}, not running")
        if self._in_loop_thread():
            order(link)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(order, link)

    @property
    def supervisor_pid(self) -> int | None:
        """Pid of the supervisor process, once started."""
        return self._link.pid if self._link is not None else None

    def worker_pids(self) -> list[int]:
        """Pids of the workers that are ready or busy (a snapshot)."""
        dispatcher = self._dispatcher
        return dispatcher.worker_pids() if dispatcher is not None else []

    def stats(self) -> dict[str, Any]:
        """A snapshot in plain numbers; safe from any thread.

        ``requests`` maps each outcome's lower-case status name (``ok``,
        ``handler_error``, ``timeout``, ``worker_lost``, ``overloaded``,
        ``too_large``, ``bad_request``, ``shutting_down``, ``cancelled``) to how
        many requests ended so; ``queued`` are waiting for a worker, ``in_flight`` running in
        one; ``workers`` are ready or busy; ``batches`` were sent so far;
        ``connections`` are open.
        """
        server, dispatcher = self._server, self._dispatcher
        result: dict[str, Any] = {
            "requests": dict.fromkeys((s.name.lower() for s in Status), 0),
            "queued": 0,
            "in_flight": 0,
            "workers": 0,
            "batches": 0,
            "connections": 0,
        }
        if server is not None:
            result["requests"] = dict(server.requests)
            result["connections"] = len(server.connections)
        if dispatcher is not None:
            result.update(dispatcher.stats())
        return result

    def __enter__(self) -> Producer:
        self.start(blocking=False)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = format_address(*self.address) if self.address else f"port {self.port}"
        return f"<Producer {where} {self.processes} workers {self.state}>"

    # -- event loop --------------------------------------------------------------

    def _in_loop_thread(self) -> bool:
        if self._loop_thread is not None:
            return threading.current_thread() is self._loop_thread
        import asyncio

        loop = self._loop
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:
            return False

    def _run(self, install_signals: bool) -> None:
        from .loop import new_event_loop

        loop = new_event_loop(self.use_uvloop)
        with self._lock:
            self._loop = loop
        try:
            if install_signals:
                for sig in CONTROL_SIGNALS:
                    loop.add_signal_handler(sig, self._on_signal, sig)
            loop.run_until_complete(self._main(retitle=install_signals))
        except BaseException as exc:
            if self._startup_error is None and not self._ready.is_set():
                self._startup_error = exc
            else:
                log.exception("producer event loop failed")
        finally:
            if install_signals:
                for sig in CONTROL_SIGNALS:
                    loop.remove_signal_handler(sig)
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            with self._lock:
                self._loop = None
                self.state = STOPPED
            loop.close()
            self._ready.set()
            self._finished.set()

    def _on_signal(self, sig: int) -> None:
        """TERM, INT: stop gracefully, at once the second time; QUIT: at once;
        HUP: reload; TTIN, TTOU: one worker more, one fewer (never below one)."""
        name = signal.Signals(sig).name
        stopping = self._stop_event is not None and self._stop_event.is_set()
        if sig == signal.SIGQUIT or (sig in STOP_SIGNALS and stopping):
            log.warning("%s%s: stopping now", name, " again" if stopping else "")
            self._request_stop(0.0)
            if self._dispatcher is not None:
                self._dispatcher.fail_all(Status.SHUTTING_DOWN, b"server stopping")
        elif sig in STOP_SIGNALS:
            log.info("%s: stopping", name)
            self._request_stop(None)
        elif stopping or self.state != RUNNING:
            log.info("%s ignored: the producer is %s", name, self.state)
        elif sig == signal.SIGHUP:
            log.info("SIGHUP: reloading")
            self.reload()
        else:
            n = self.processes + 1 if sig == signal.SIGTTIN else max(1, self.processes - 1)
            log.info("%s: %d workers", name, n)
            self.scale(n)

    def _request_stop(self, grace: float | None) -> None:
        if self._stop_event is None or self._stop_event.is_set():
            return
        self._stop_grace = grace
        self._stop_event.set()

    def _supervisor_died(self) -> None:
        """The supervisor is gone, and its workers with it: fail what they held, and stop.

        A new supervisor cannot be forked from here: this process runs an event
        loop and threads, and a fork must carry neither.  The requests that the
        workers held end as WORKER_LOST at once, those still queued as
        SHUTTING_DOWN (no worker will come for them), and the producer stops.
        """
        self._supervisor_lost = True
        dispatcher = self._dispatcher
        if self.state == RUNNING and dispatcher is not None:
            stats = dispatcher.stats()
            log.critical(
                "supervisor process died, and its workers with it: %d requests in flight"
                " fail as worker_lost, %d queued as shutting_down; stopping",
                stats["in_flight"],
                stats["queued"],
            )
        if self._local is not None:
            self._local.lose_all("its supervisor died")
        if dispatcher is not None:
            dispatcher.fail_queued(Status.SHUTTING_DOWN, b"server stopping: its workers died")
        self._request_stop(0.0)

    async def _main(self, retitle: bool = False) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        with self._lock:
            if self._stop_requested:
                self._stop_event.set()
        link = self._link
        assert link is not None
        try:
            try:
                await self._boot(loop, link)
            except BaseException as exc:
                self._startup_error = (
                    exc
                    if isinstance(exc, StartupError)
                    else StartupError(f"could not start: {exc}")
                )
                if not isinstance(exc, StartupError):
                    self._startup_error.__cause__ = exc
                # The cause first, before the lines that tearing down writes.
                if self._stop_event.is_set() and self._startup_error.args == (STOPPED_EARLY,):
                    log.info("%s", STOPPED_EARLY)
                else:
                    log.error("could not start: %s", self._startup_error)
                return
            with self._lock:
                if self.state == STARTING:
                    self.state = RUNNING
            if retitle and self.address is not None:
                from .proctitle import set_title

                set_title(f"gaspar: producer {format_address(*self.address)}")
            self._ready.set()
            await self._stop_event.wait()
            self.state = STOPPING
            grace = self.grace if self._stop_grace is None else self._stop_grace
            await self._drain(grace)
        finally:
            await self._teardown(link)

    async def _boot(self, loop: asyncio.AbstractEventLoop, link: SupervisorLink) -> None:
        import asyncio

        from .dispatcher import Dispatcher
        from .links import LocalLink
        from .server import Server

        boot_failed: list[str] = []
        dispatcher = Dispatcher(timeout=self.timeout, max_queue=self.max_queue)
        local = LocalLink(dispatcher, kill=link.kill, max_reply=MAX_LENGTH)
        self._dispatcher, self._local = dispatcher, local

        def on_setup_failed(pid: int, backoff: float, error: str) -> None:
            if self.state == STARTING:
                # Its "exited" follows, and wakes the wait below.
                boot_failed.append(f"worker {pid}: setup() failed: {error}")
            elif self.state == RUNNING:
                log.error(
                    "worker %d: setup() failed: %s; next attempt in %.3gs", pid, error, backoff
                )

        def on_exited(pid: int, code: int) -> None:
            # During start-up any death is a failure of it: a worker that
            # crashes (not raises) in setup() would otherwise be replaced for ever.
            if self.state == STARTING and not boot_failed:
                boot_failed.append(f"worker {pid} {describe_exit(code)} during start-up")
            local.exited(pid, code)
            dispatcher.notify()  # the wait below may be for this

        link.on_spawned = local.add
        link.on_setup_failed = on_setup_failed
        link.on_exited = on_exited
        link.on_lost = self._supervisor_died
        self._manage_workers(local, link)
        link.attach(loop)
        self._server = Server(dispatcher, self.limits)
        try:
            self.address = await self._server.listen(self.host, self.port)
        except OSError as exc:
            where = format_address(self.host, self.port)
            raise StartupError(f"cannot listen on {where}: {exc}") from exc
        link.go()
        want = self.processes
        assert self._stop_event is not None
        waits = {
            asyncio.ensure_future(
                dispatcher.wait_for(
                    lambda: dispatcher.ready_workers >= want or bool(boot_failed), None
                )
            ),
            asyncio.ensure_future(self._stop_event.wait()),
        }
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if boot_failed:
            raise StartupError(boot_failed[0])
        if self._supervisor_lost:
            raise StartupError("the supervisor process died before the workers were ready")
        if dispatcher.ready_workers < want:
            raise StartupError(STOPPED_EARLY)
        log.info(
            "listening on %s with %d workers (pid %d)",
            format_address(*self.address),
            want,
            os.getpid(),
        )

    def _manage_workers(self, local: LocalLink, link: SupervisorLink) -> None:
        """Wire reload, scaling and liveness: the supervisor retires, the link watches."""
        link.on_retire = local.retire
        local.on_ready = link.ready
        local.watch(self.worker_limits.liveness or DEFAULTS["liveness_timeout"])

    async def _drain(self, grace: float) -> None:
        server, dispatcher = self._server, self._dispatcher
        assert server is not None and dispatcher is not None
        server.stop_accepting()
        log.info("stopping: %d requests in flight, %.3gs grace", dispatcher.outstanding, grace)
        finished = await dispatcher.wait_for(lambda: dispatcher.outstanding == 0, grace)
        if not finished:
            log.warning("grace period over; failing %d requests", dispatcher.outstanding)
            dispatcher.fail_all(Status.SHUTTING_DOWN, b"server stopping")
        # Replies are written; give them a bounded moment to reach the clients.
        if not await server.wait_closed(self.limits.write_timeout):
            server.abort_all()

    async def _teardown(self, link: SupervisorLink) -> None:
        # From here the supervisor's exit and the workers' are expected.
        link.on_lost = _nothing
        link.on_setup_failed = _ignore_setup_failure
        if self._server is not None:
            self._server.stop_accepting()
            self._server.abort_all()
            self._server.close()
        if self._dispatcher is not None:
            # Workers still running a request (its client has its answer by
            # now: shutting_down) are killed; the others leave at EOF on their links.
            if self._local is not None:
                for pid in self._dispatcher.busy_pids(self._local):
                    link.kill(pid)
            self._dispatcher.fail_all(Status.SHUTTING_DOWN, b"server stopping")
            self._dispatcher.retire()
            self._dispatcher.close()
        code = await link.stop(term_timeout=5.0)
        if code != 0:
            log.warning("supervisor exited with code %d", code)
        link.close()
        log.info("stopped")

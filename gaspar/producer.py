"""The producer: a TCP server in front of a pool of worker processes.

It owns the order of start and stop, and nothing else: the supervisor owns
processes, the dispatcher owns jobs, the server owns connections.

Start: fork the supervisor (before any loop or thread exists; none for a
front end with processes=0), then on the event loop make the dispatcher and
its local worker link, bind the TCP port and, with worker_bind, the endpoint
worker hosts join (gaspar/link_zmq.py), let the supervisor fork workers (each
worker's link comes back with its "spawned" line), and wait until every local
worker has said READY; worker hosts join whenever they come.

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
import socket
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import metrics, options
from . import workerproto as wp
from .address import format_address
from .consumer import Consumer, Handler, as_consumer
from .errors import StartupError
from .options import DEFAULTS
from .protocol import MAX_LENGTH, Limits, Status
from .supervisor import SupervisorLink
from .systemd import listen_fds_with_names, notify
from .worker import WorkerLimits

if TYPE_CHECKING:
    import asyncio

    from .dispatcher import Dispatcher, WorkerSlot
    from .link_zmq import ZmqLink
    from .links import LocalLink
    from .metrics import MetricsServer
    from .security import ServerKeys
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


# Client ports taken from systemd (socket activation), which exist before the
# supervisor is forked: every process forked from this one closes them at once,
# so that neither the supervisor nor a worker ever holds the client port.
_ADOPTED: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_fork_hook_set = False


def _close_adopted() -> None:
    for sock in list(_ADOPTED):
        sock.close()


def _adopt(sock: socket.socket) -> None:
    """Have every child forked from now on close `sock` (the hook is set on first use)."""
    global _fork_hook_set
    if not _fork_hook_set:
        os.register_at_fork(after_in_child=_close_adopted)
        _fork_hook_set = True
    _ADOPTED.add(sock)


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
    producer starts once.  Under systemd it serves on the socket passed to it
    (socket activation) instead of binding, and says when it is ready and when
    it stops (``Type=notify``): see gaspar/systemd.py.

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
        metrics_port: int | None = DEFAULTS["metrics_port"],
        metrics_host: str = DEFAULTS["metrics_host"],
        access_log: bool = DEFAULTS["access_log"],
        worker_bind: str | None = DEFAULTS["worker_bind"],
        key: str | None = DEFAULTS["key"],
        allow: str | None = DEFAULTS["allow"],
        heartbeat: float = DEFAULTS["heartbeat"],
        insecure_workers: bool = DEFAULTS["insecure_workers"],
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
        # None: one per CPU; 0: none (a front end for worker hosts).
        self.processes: int = available_cpus() if o["processes"] is None else o["processes"]
        self.worker_bind: str | None = o["worker_bind"]
        self.heartbeat: float = o["heartbeat"]
        self._worker_keys: ServerKeys | None = None
        if self.worker_bind is not None:
            from .security import check_endpoint, load_server_keys  # loads ZeroMQ

            if check_endpoint(
                self.worker_bind,
                (o["key"], o["allow"]),
                o["insecure_workers"],
                ("worker_bind", "key", "allow", "insecure_workers"),
            ):
                self._worker_keys = load_server_keys(o["key"], o["allow"])
        elif self.processes == 0:
            raise ValueError("processes=0 (no local workers) needs worker_bind for worker hosts")
        elif o["key"] is not None or o["allow"] is not None or o["insecure_workers"]:
            raise ValueError("key, allow and insecure_workers apply to worker_bind only")
        self.timeout: float | None = o["timeout"]
        self.max_queue: int = o["max_queue"]
        self.grace: float = o["grace"]
        self.use_uvloop: bool | None = o["use_uvloop"]
        self.tune_malloc: bool = o["tune_malloc"]
        self.metrics_port: int | None = o["metrics_port"]
        self.metrics_host: str = o["metrics_host"]
        self.access_log: bool = o["access_log"]
        # The /metrics endpoint's bound (host, port), once it is serving.
        self.metrics_address: tuple[str, int] | None = None
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
        self._remote: ZmqLink | None = None
        self._server: Server | None = None
        self._inherited: socket.socket | None = None  # the client port, from systemd
        self._metrics: MetricsServer | None = None
        # Worker starts and exits by cause, counted here: they outlive every worker.
        self._starts = 0
        self._exits: dict[str, int] = dict.fromkeys(metrics.EXIT_CAUSES, 0)
        self._timeout_killed: set[int] = set()  # local workers killed for a job's timeout

    # -- public ----------------------------------------------------------------

    def start(self, blocking: bool = True) -> None:
        """Serve; block until stopped, or with blocking=False return once ready."""
        with self._lock:
            if self.state != NEW:
                raise RuntimeError(f"producer already {self.state}")
            self.state = STARTING
        try:
            self._adopt_socket()
            if self.metrics_port is not None:
                metrics.require()
            if self.processes:  # a front end for worker hosts alone forks nothing
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
            if self._inherited is not None:
                self._inherited.close()
            self._ready.set()
            self._finished.set()
            if isinstance(exc, StartupError):
                log.error("could not start: %s", exc)
                raise
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
        Safe from any thread; returns at once (see docs/operations.md);
        RuntimeError unless the producer is running.
        """
        self._control(lambda link: link.reload())

    def scale(self, processes: int) -> None:
        """Have `processes` workers (at least 1); safe from any thread; returns at once.

        New workers are forked at once; surplus ones finish what they hold and
        leave.  RuntimeError unless the producer is running.
        """
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

    @property
    def worker_endpoint(self) -> str | None:
        """The endpoint worker hosts join (with the port bound, for a port of 0), once started."""
        remote = self._remote
        return remote.endpoint if remote is not None else None

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
        ``connections`` are open; with ``worker_bind``, ``remote_hosts`` is how
        many worker hosts have a worker in the pool.

        Also: ``requests_by_protocol`` (``v1``, ``v2``: each such a map);
        ``bytes_in`` and ``bytes_out`` (from and to clients); ``workers_by_state``
        (``idle``, ``busy``, ``leaving``); ``worker_starts`` and ``worker_exits``
        by cause (``normal``, ``signal``, ``crash``, ``setup_failure``,
        ``timeout``) of local workers; ``worker_memory`` (resident bytes of the
        local workers: ``sum``, ``max``); and the histograms ``latency`` (from a
        request read to its end), ``handler_time`` (the handler's own run time)
        and ``queue_wait`` (from read to a worker's start), each ``count``,
        ``sum`` (seconds) and cumulative ``buckets`` of [upper bound, count].
        docs/observability.md says more.
        """
        server, dispatcher = self._server, self._dispatcher
        outcomes = dict.fromkeys((s.name.lower() for s in Status), 0)
        empty = metrics.Histogram().snapshot()
        result: dict[str, Any] = {
            "requests": dict(outcomes),
            "queued": 0,
            "in_flight": 0,
            "workers": 0,
            "batches": 0,
            "connections": 0,
            "requests_by_protocol": {"v1": dict(outcomes), "v2": dict(outcomes)},
            "bytes_in": 0,
            "bytes_out": 0,
            "workers_by_state": dict.fromkeys(metrics.WORKER_STATES, 0),
            "worker_starts": self._starts,
            "worker_exits": dict(self._exits),
            "worker_memory": {"sum": 0, "max": 0},
            "latency": empty,
            "handler_time": empty,
            "queue_wait": empty,
        }
        if server is not None:
            result["requests"] = server.requests
            result["requests_by_protocol"] = {"v1": dict(server.v1), "v2": dict(server.v2)}
            result["connections"] = len(server.connections)
            result["bytes_in"] = server.bytes_in
            result["bytes_out"] = server.bytes_out
        if dispatcher is not None:
            result.update(dispatcher.stats())
            result["workers_by_state"] = dispatcher.worker_states()
            result["latency"] = dispatcher.latency.snapshot()
            result["handler_time"] = dispatcher.handler_time.snapshot()
            result["queue_wait"] = dispatcher.queue_wait.snapshot()
            if self._local is not None:
                sizes = [metrics.resident_bytes(p) for p in dispatcher.link_pids(self._local)]
                known = [size for size in sizes if size is not None]
                result["worker_memory"] = {"sum": sum(known), "max": max(known, default=0)}
        if self.worker_bind is not None:
            remote = self._remote
            result["remote_hosts"] = remote.hosts if remote is not None else 0
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
            self._notify_ready()
            await self._stop_event.wait()
            self.state = STOPPING
            grace = self.grace if self._stop_grace is None else self._stop_grace
            self._notify_stopping(grace)
            await self._drain(grace)
        finally:
            await self._teardown(link)

    async def _boot(self, loop: asyncio.AbstractEventLoop, link: SupervisorLink | None) -> None:
        import asyncio

        from .dispatcher import Dispatcher
        from .links import LocalLink
        from .server import Server

        boot_failed: list[str] = []
        dispatcher = Dispatcher(timeout=self.timeout, max_queue=self.max_queue)
        self._dispatcher = dispatcher
        if link is not None:
            local = LocalLink(dispatcher, kill=link.kill, max_reply=MAX_LENGTH)
            self._local = local

            def on_setup_failed(pid: int, backoff: float, error: str) -> None:
                if self.state == STARTING:
                    # Its "exited" follows, and wakes the wait below.
                    boot_failed.append(f"worker {pid}: setup() failed: {error}")
                elif self.state == RUNNING:
                    log.error(
                        "worker %d: setup() failed: %s; next attempt in %.3gs",
                        pid,
                        error,
                        backoff,
                        extra={"worker": pid},
                    )

            def on_spawned(pid: int, sock: socket.socket) -> None:
                self._starts += 1
                local.add(pid, sock)

            def on_exited(pid: int, code: int) -> None:
                timed_out = pid in self._timeout_killed
                self._timeout_killed.discard(pid)
                self._exits[metrics.exit_cause(code, timed_out)] += 1
                # During start-up any death is a failure of it: a worker that
                # crashes (not raises) in setup() would otherwise be replaced for ever.
                # Code 0 is a worker that recycled itself (max_requests), not a death.
                if self.state == STARTING and not boot_failed and code != 0:
                    boot_failed.append(f"worker {pid} {describe_exit(code)} during start-up")
                local.exited(pid, code)
                dispatcher.notify()  # the wait below may be for this

            def on_timeout_kill(slot: WorkerSlot) -> None:
                if slot.link is local:
                    self._timeout_killed.add(slot.pid)

            dispatcher.on_timeout_kill = on_timeout_kill
            link.on_spawned = on_spawned
            link.on_setup_failed = on_setup_failed
            link.on_exited = on_exited
            link.on_lost = self._supervisor_died
            self._manage_workers(local, link)
            link.attach(loop)
        self._server = Server(dispatcher, self.limits)
        self._server.access_log = self.access_log
        self._server.stats = self.stats
        try:
            self.address = await self._server.listen(self.host, self.port, sock=self._inherited)
        except OSError as exc:
            where = format_address(self.host, self.port)
            if self._inherited is not None:
                where = "the socket systemd passed"
            raise StartupError(f"cannot listen on {where}: {exc}") from exc
        if self.metrics_port is not None:
            self._metrics = await metrics.serve_metrics(
                self.stats, self.metrics_host, self.metrics_port
            )
            self.metrics_address = self._metrics.address
        if self.worker_bind is not None:
            self._bind_workers(dispatcher)
        if link is not None:
            link.go()
        want = self.processes
        remote = self._remote

        def local_ready() -> int:
            # Worker hosts may join meanwhile: start-up waits for the local workers.
            return dispatcher.ready_workers - (remote.workers if remote is not None else 0)

        assert self._stop_event is not None
        waits = {
            asyncio.ensure_future(
                dispatcher.wait_for(lambda: local_ready() >= want or bool(boot_failed), None)
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
        if local_ready() < want:
            raise StartupError(STOPPED_EARLY)
        log.info(
            "listening on %s with %d workers%s (pid %d)",
            format_address(*self.address),
            want,
            f", worker hosts joining at {remote.endpoint}" if remote is not None else "",
            os.getpid(),
        )

    # -- systemd -----------------------------------------------------------------

    def _adopt_socket(self) -> None:
        """Serve on the listening socket systemd passed to this process, if it passed one.

        Socket activation is automatic, as in most daemons: with LISTEN_PID
        naming this process, the producer takes the socket (host and port then
        only describe it) instead of binding one.  It happens before the
        supervisor is forked, and every forked child closes the socket at
        once (_close_adopted): no worker holds the client port.
        """
        inherited = listen_fds_with_names()
        if not inherited:
            return
        if len(inherited) > 1:
            for _, extra in inherited:
                extra.close()
            raise StartupError(
                f"systemd passed {len(inherited)} sockets (LISTEN_FDS); gaspar serves on one:"
                " give its socket unit a single ListenStream="
            )
        name, sock = inherited[0]
        _adopt(sock)
        self._inherited = sock
        if (
            sock.type != socket.SOCK_STREAM
            or sock.family not in (socket.AF_INET, socket.AF_INET6)
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        ):
            raise StartupError(
                f"the socket systemd passed ({name}) is not a listening TCP socket:"
                " use ListenStream= with Accept=no"
            )
        where = sock.getsockname()
        log.info(
            "serving on %s, the socket systemd passed (%s); host and port are not bound",
            format_address(where[0], where[1]),
            name,
        )

    def _notify_ready(self) -> None:
        """Tell systemd (Type=notify) that the port is bound and every worker is ready."""
        if self.address is not None:
            notify(
                f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving on "
                f"{format_address(*self.address)} with {self.processes} workers"
            )

    def _notify_stopping(self, grace: float) -> None:
        """Tell systemd that the stop has begun (before the grace period, not after it)."""
        outstanding = self._dispatcher.outstanding if self._dispatcher is not None else 0
        notify(f"STOPPING=1\nSTATUS=stopping: {outstanding} requests in flight, {grace:g}s grace")

    def _bind_workers(self, dispatcher: Dispatcher) -> None:
        """Bind the endpoint that worker hosts join (gaspar/link_zmq.py)."""
        import zmq

        from .link_zmq import ZmqLink
        from .security import INSECURE_WARNING

        assert self.worker_bind is not None
        try:
            self._remote = ZmqLink(
                dispatcher,
                self.worker_bind,
                heartbeat=self.heartbeat,
                keys=self._worker_keys,
                max_reply=MAX_LENGTH,
            )
        except zmq.ZMQError as exc:
            where = self.worker_bind
            raise StartupError(f"cannot bind the worker endpoint {where}: {exc}") from exc
        if self._worker_keys is None and self.worker_bind.startswith("tcp://"):
            log.warning(INSECURE_WARNING, self._remote.endpoint)

    def _manage_workers(self, local: LocalLink, link: SupervisorLink) -> None:
        """Wire reload, scaling and liveness: the supervisor retires, the link watches."""
        link.on_retire = local.retire
        local.on_ready = link.ready
        local.watch(self.worker_limits.liveness or DEFAULTS["liveness_timeout"])

    async def _drain(self, grace: float) -> None:
        server, dispatcher = self._server, self._dispatcher
        assert server is not None and dispatcher is not None
        server.stop_accepting()
        log.info("stopping: %d requests in flight, %.3gs grace", dispatcher.awaited, grace)
        # Jobs whose client has gone run on for nobody: the stop does not wait for them
        # (their workers are killed at teardown).
        finished = await dispatcher.wait_for(lambda: dispatcher.awaited == 0, grace)
        if not finished:
            log.warning("grace period over; failing %d requests", dispatcher.awaited)
            dispatcher.fail_all(Status.SHUTTING_DOWN, b"server stopping")
        # Replies are written; give them a bounded moment to reach the clients.
        if not await server.wait_closed(self.limits.write_timeout):
            server.abort_all()

    async def _teardown(self, link: SupervisorLink | None) -> None:
        # From here the supervisor's exit and the workers' are expected.
        if link is not None:
            link.on_lost = _nothing
            link.on_setup_failed = _ignore_setup_failure
        if self._metrics is not None:
            await self._metrics.close()
        if self._server is not None:
            self._server.stop_accepting()
            self._server.abort_all()
            self._server.close()
        if self._dispatcher is not None:
            # Workers still running a request (its client has its answer by
            # now: shutting_down) are killed; the others leave at EOF on their links.
            if self._local is not None and link is not None:
                for pid in self._dispatcher.busy_pids(self._local):
                    link.kill(pid)
            self._dispatcher.fail_all(Status.SHUTTING_DOWN, b"server stopping")
            self._dispatcher.retire()
            self._dispatcher.close()
        if link is not None:
            code = await link.stop(term_timeout=5.0)
            if code != 0:
                log.warning("supervisor exited with code %d", code)
            link.close()
        if self._inherited is not None:
            self._inherited.close()  # unless the server has (a listen that failed)
        log.info("stopped")

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
import threading
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

if TYPE_CHECKING:
    import asyncio

    from .dispatcher import Dispatcher
    from .link_zmq import ZmqLink
    from .links import LocalLink
    from .security import ServerKeys
    from .server import Server

log = logging.getLogger("gaspar.producer")

NEW, STARTING, RUNNING, STOPPING, STOPPED = "new", "starting", "running", "stopping", "stopped"
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
        worker_bind: str | None = DEFAULTS["worker_bind"],
        key: str | None = DEFAULTS["key"],
        allow: str | None = DEFAULTS["allow"],
        heartbeat: float = DEFAULTS["heartbeat"],
        insecure_workers: bool = DEFAULTS["insecure_workers"],
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
        self.limits = Limits(
            o["max_message_size"],
            o["max_connections"],
            o["read_timeout"],
            o["write_timeout"],
            max_pipeline=o["max_pipeline"],
            idle_timeout=o["idle_timeout"],
        )
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

    # -- public ----------------------------------------------------------------

    def start(self, blocking: bool = True) -> None:
        """Serve; block until stopped, or with blocking=False return once ready."""
        with self._lock:
            if self.state != NEW:
                raise RuntimeError(f"producer already {self.state}")
            self.state = STARTING
        try:
            if self.processes:  # a front end for worker hosts alone forks nothing
                self._link = SupervisorLink.fork(
                    self.consumer, self.processes, wp.max_job_body(self.limits.max_message_size)
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
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, self._on_signal, sig)
            loop.run_until_complete(self._main())
        except BaseException as exc:
            if self._startup_error is None and not self._ready.is_set():
                self._startup_error = exc
            else:
                log.exception("producer event loop failed")
        finally:
            if install_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
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
        if self._stop_event is not None and self._stop_event.is_set():
            log.warning("%s again: failing requests in flight now", signal.Signals(sig).name)
            if self._dispatcher is not None:
                self._dispatcher.fail_all(Status.SHUTTING_DOWN, b"server stopping")
            return
        log.info("%s: stopping", signal.Signals(sig).name)
        self._request_stop(None)

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

    async def _main(self) -> None:
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
            self._ready.set()
            await self._stop_event.wait()
            self.state = STOPPING
            grace = self.grace if self._stop_grace is None else self._stop_grace
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
            link.attach(loop)
        self._server = Server(dispatcher, self.limits)
        try:
            self.address = await self._server.listen(self.host, self.port)
        except OSError as exc:
            where = format_address(self.host, self.port)
            raise StartupError(f"cannot listen on {where}: {exc}") from exc
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

    async def _teardown(self, link: SupervisorLink | None) -> None:
        # From here the supervisor's exit and the workers' are expected.
        if link is not None:
            link.on_lost = _nothing
            link.on_setup_failed = _ignore_setup_failure
        if self._server is not None:
            self._server.stop_accepting()
            self._server.abort_all()
            self._server.close()
        if self._dispatcher is not None:
            self._dispatcher.fail_all(Status.SHUTTING_DOWN, b"server stopping")
            self._dispatcher.retire()
        if link is not None:
            code = await link.stop(term_timeout=5.0)
            if code != 0:
                log.warning("supervisor exited with code %d", code)
            link.close()
        if self._dispatcher is not None:
            self._dispatcher.close()
        log.info("stopped")

"""Worker lifecycle, in one place: fork, death, replacement, timeout kill, shutdown.

The producer forks one supervisor process first, before it creates an event
loop, a thread or a ZeroMQ context, so that the supervisor holds none of them.
The supervisor is single-threaded; every worker is forked from it, and so
inherits the handler (a lambda typed at a prompt works) and nothing else of
the producer's machinery.  Nothing else in gaspar forks or reaps.

    producer (event loop, dispatcher, TCP)
      └─ supervisor (this module's Supervisor.run)
           ├─ worker
           └─ worker ...

The producer and the supervisor talk over a Unix socket pair, one ASCII line a
message:

    producer -> supervisor   go | kill PID | stop SECONDS | ready PID | reload | scale N
    supervisor -> producer   spawned PID | setup-failed PID BACKOFF ERROR | exited PID CODE
                             | retire PID

"spawned PID" carries (SCM_RIGHTS) the producer's end of the new worker's
link: a socket pair the supervisor makes just before the fork, whose other end
the worker keeps (gaspar/links.py); the supervisor closes both of its copies
once it has sent that line, so no other process holds them.  CODE is the exit
code, or minus the signal number that ended the worker.  A worker whose
setup() raised writes "TypeName: message" to a pipe of its own before it
exits with EXIT_BOOT_ERROR; the supervisor passes it on as ERROR (one line,
UTF-8) with the seconds it will wait before the next attempt, just before that
worker's "exited" line; the producer decides what to say of it.

Each side notices the other's death by EOF on that socket; workers notice the
supervisor's death by a parent-death signal (Linux), and the producer's by EOF
on their links.  Neither the supervisor nor a local worker loads ZeroMQ.

Reload and scale: "ready PID" tells the supervisor that a worker said READY;
"reload" re-imports the handler's module (when the producer was given its
MODULE:ATTR) and replaces every worker, one at a time: a new worker is forked
first, and only once it is ready is an old one retired; "scale N" sets the
number of workers.  To retire a worker the supervisor says "retire PID": the
producer sends that worker nothing more and ends its link once it has answered
what it holds; the worker leaves at EOF and is reaped as a normal exit.  Every
worker has a small slot number (1, 2, ...: the smallest free one when it is
forked), for its process title.

Stop: the producer ends the links of idle workers and has busy ones killed
(their requests have been answered or failed by then), then says "stop S";
the supervisor waits S seconds for its workers to leave, then SIGKILLs the
rest.  Signals sent to the whole process group (TERM, INT, QUIT, HUP, TTIN,
TTOU) are the producer's to act on: the supervisor and its workers let them
pass, so that a running job finishes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .consumer import Consumer
from .exitcodes import EXIT_BOOT_ERROR, EXIT_ERROR, MAX_SETUP_ERROR
from .proctitle import set_title
from .worker import GROUP_SIGNALS, WorkerLimits

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("gaspar.supervisor")

# Backoff between attempts to replace a worker whose setup() failed.
BOOT_BACKOFF_MIN = 0.5
BOOT_BACKOFF_MAX = 30.0
PR_SET_PDEATHSIG = 1
# Descriptors one read of the control socket takes (one per "spawned" line).
MAX_FDS = 64


class Child:
    """What the supervisor knows of one worker."""

    __slots__ = ("generation", "number", "ready", "retiring")

    def __init__(self, number: int, generation: int) -> None:
        self.number = number  # its slot number, for its title
        self.generation = generation  # reloads before its fork: older ones are replaced
        self.ready = False  # it said READY (the producer told us)
        self.retiring = False  # asked to leave; no longer counted


def reimport(target: str) -> Consumer:
    """Import MODULE:ATTR afresh (a new module object) and resolve it to a Consumer.

    The old module stays as it was for the workers that still use it; if the
    import fails, sys.modules is left as before and the error propagates.
    """
    import importlib

    from .cli import load_target

    module_name = target.partition(":")[0]
    old = sys.modules.pop(module_name, None)
    importlib.invalidate_caches()
    try:
        return load_target(target)
    except BaseException:
        if old is not None:
            sys.modules[module_name] = old
        else:
            sys.modules.pop(module_name, None)
        raise


class Supervisor:
    """The supervisor process's main loop, in the spirit of gunicorn's arbiter."""

    def __init__(
        self,
        consumer: Consumer,
        processes: int,
        control: socket.socket,
        max_job: int,
        *,
        target: str | None = None,
        limits: WorkerLimits = WorkerLimits(),  # noqa: B008 (immutable)
    ) -> None:
        self.consumer = consumer
        self.processes = processes
        self.control = control
        self.max_job = max_job  # the bound on a job frame's body, for each worker
        self.target = target  # MODULE:ATTR to re-import on reload, if known
        self.limits = limits
        self.workers: dict[int, Child] = {}
        self.generation = 0
        # The read end of each worker's pipe for its setup() error.
        self.reports: dict[int, int] = {}
        self.stopping = False
        self.term_timeout = 5.0
        self.backoff = 0.0
        self.next_spawn = 0.0
        self._inbox = b""
        self._wake_r, self._wake_w = os.pipe()

    # -- main loop -------------------------------------------------------------

    def run(self) -> int:
        """Serve until told to stop or orphaned; return the process exit code."""
        self._install_signals()
        set_title("gaspar: supervisor")
        # The worker's code is loaded once here, so that every worker shares it.
        from . import worker  # noqa: F401

        if self._wait_for_go():
            self._serve()
        return 0

    def _serve(self) -> None:
        while not self.stopping:
            self.manage_workers()
            timeout = None
            if self._wanted() > len(self._active()):
                timeout = max(0.0, self.next_spawn - time.monotonic())
            ready, _, _ = select.select([self.control.fileno(), self._wake_r], [], [], timeout)
            if self._wake_r in ready:
                self._drain_wakeups()
                self.reap_workers()
            if self.control.fileno() in ready:
                self._read_control()
        self.shutdown()

    def manage_workers(self) -> None:
        """Reach `processes` workers of the current generation: fork, or retire the excess.

        A reload forks one worker more than `processes` while an old one is
        left; the excess is retired only from ready workers, oldest generation
        first, so that a new worker is ready before the old one it replaces
        leaves.  Forks wait out the backoff after a failed setup().
        """
        while len(self._active()) < self._wanted() and time.monotonic() >= self.next_spawn:
            self.spawn_worker()
        active = self._active()
        pending = sum(1 for child in active.values() if not child.ready)
        excess = len(active) - self.processes - pending
        if excess > 0:
            ready = [(c.generation, -c.number, pid) for pid, c in active.items() if c.ready]
            for _, _, pid in sorted(ready)[:excess]:
                self.retire_worker(pid)

    def _active(self) -> dict[int, Child]:
        """Workers not being retired."""
        return {pid: c for pid, c in self.workers.items() if not c.retiring}

    def _wanted(self) -> int:
        """How many active workers there should be now: one more while a reload has one to fork."""
        active = self._active().values()
        old = any(c.generation < self.generation for c in active)
        starting = any(not c.ready and c.generation == self.generation for c in active)
        return self.processes + (1 if old and not starting else 0)

    def reload(self) -> None:
        """Replace every worker; first re-import the handler's module, if it is known.

        A module that fails to import leaves the workers as they are, and says why.
        """
        if self.target is not None:
            try:
                self.consumer = reimport(self.target)
            except (Exception, SystemExit) as exc:
                log.error(
                    "reload: cannot import %s: %s; the old workers keep serving",
                    self.target,
                    " ".join(f"{type(exc).__name__}: {exc}".split()),
                )
                return
        self.generation += 1
        self.backoff = 0.0
        self.next_spawn = 0.0
        log.info("reload: replacing %d workers, one at a time", len(self._active()))

    def scale(self, processes: int) -> None:
        """Have `processes` workers (at least one)."""
        processes = max(1, processes)
        if processes != self.processes:
            log.info("workers: %d -> %d", self.processes, processes)
        self.processes = processes

    def retire_worker(self, pid: int) -> None:
        """Ask the producer to let worker `pid` finish what it holds and leave."""
        child = self.workers.get(pid)
        if child is None or child.retiring:
            return
        child.retiring = True
        log.debug("retiring worker %d", pid)
        self._tell(f"retire {pid}")

    def _free_number(self) -> int:
        taken = {child.number for child in self.workers.values()}
        number = 1
        while number in taken:
            number += 1
        return number

    def spawn_worker(self) -> None:
        """Fork one worker; the child never returns from here."""
        number = self._free_number()
        # Objects that exist now stay out of the collector's passes, in the
        # worker and here, so that those passes do not copy the pages they share.
        gc.freeze()
        report_r, report_w = os.pipe()
        worker_end, producer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The group's signals wait until the child has its own handlers: one sent
        # to a worker that has just been forked must not be taken as ours.
        signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
        pid = -1
        try:
            pid = os.fork()
        except OSError:
            for fd in (report_r, report_w):
                os.close(fd)
            worker_end.close()
            producer_end.close()
            raise
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
        if pid == 0:
            code = EXIT_ERROR
            try:
                os.close(report_r)
                producer_end.close()
                self._become_worker()
                from . import worker

                code = worker.main(
                    self.consumer,
                    worker_end,
                    self.max_job,
                    report_w,
                    number=number,
                    limits=self.limits,
                )
            except BaseException:
                log.exception("worker %d crashed", os.getpid())
            finally:
                _flush_and_exit(code)
        os.close(report_w)
        worker_end.close()
        self.reports[pid] = report_r
        self.workers[pid] = Child(number, self.generation)
        try:
            self._tell(f"spawned {pid}", producer_end.fileno())
        finally:
            producer_end.close()
        log.debug("spawned worker %d (number %d)", pid, number)

    def kill_worker(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one of our workers; a pid that is not ours is ignored."""
        if pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reap_workers(self) -> None:
        """Collect every exited worker, report it, and schedule its replacement."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.workers.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            error = self._take_report(pid)
            if code == EXIT_BOOT_ERROR:
                self.backoff = min(BOOT_BACKOFF_MAX, max(BOOT_BACKOFF_MIN, self.backoff * 2))
                self.next_spawn = time.monotonic() + self.backoff
                self._tell(f"setup-failed {pid} {self.backoff} {error or 'unknown error'}")
            else:
                self.backoff = 0.0
                if code == 0:  # retired, or recycled itself: not a crash
                    log.debug("worker %d left", pid)
            self._tell(f"exited {pid} {code}")

    def _take_report(self, pid: int) -> str:
        """What worker `pid` wrote to its pipe (its setup() error), as one line."""
        fd = self.reports.pop(pid, None)
        if fd is None:
            return ""
        try:
            os.set_blocking(fd, False)
            data = os.read(fd, MAX_SETUP_ERROR)
        except OSError:  # BlockingIOError: nothing was written
            data = b""
        finally:
            os.close(fd)
        return " ".join(data.decode("utf-8", "replace").split())

    def shutdown(self) -> None:
        """Wait term_timeout for the workers to leave (their links end), SIGKILL the rest.

        A worker not ready yet has nothing to finish: it is killed at once.
        """
        for pid, child in list(self.workers.items()):
            if not child.ready:
                self.kill_worker(pid)
        deadline = time.monotonic() + self.term_timeout
        while self.workers:
            self.reap_workers()
            left = deadline - time.monotonic()
            if not self.workers:
                break
            if left <= 0:
                for pid in list(self.workers):
                    log.warning("worker %d still there at stop; killing it", pid)
                    self.kill_worker(pid)
                deadline = float("inf")
                left = 1.0
            with contextlib.suppress(InterruptedError):
                select.select([self._wake_r], [], [], min(left, 0.1))
            self._drain_wakeups()

    # -- plumbing --------------------------------------------------------------

    def _install_signals(self) -> None:
        # The group's signals are the producer's to act on (see the module's text).
        for sig in GROUP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    def _wait_for_go(self) -> bool:
        while not self.stopping:
            ready, _, _ = select.select([self.control.fileno(), self._wake_r], [], [])
            self._drain_wakeups()
            if self.control.fileno() in ready and self._read_control():
                return True
        return False

    def _read_control(self) -> bool:
        """Act on the producer's lines; return True if one of them was "go"."""
        try:
            data = self.control.recv(4096)
        except InterruptedError:
            return False
        except OSError:
            data = b""
        if not data:
            log.debug("producer gone; supervisor stopping")
            self.stopping = True
            return False
        self._inbox += data
        go = False
        while b"\n" in self._inbox:
            line, self._inbox = self._inbox.split(b"\n", 1)
            cmd, _, arg = line.decode("ascii").partition(" ")
            if cmd == "go":
                go = True
            elif cmd == "kill":
                self.kill_worker(int(arg))
            elif cmd == "stop":
                self.term_timeout = float(arg)
                self.stopping = True
            elif cmd == "ready":
                child = self.workers.get(int(arg))
                if child is not None:
                    child.ready = True
            elif cmd == "reload":
                self.reload()
            elif cmd == "scale":
                self.scale(int(arg))
        return go

    def _tell(self, line: str, fd: int | None = None) -> None:
        data = line.encode("utf-8") + b"\n"
        with contextlib.suppress(OSError):
            if fd is None:
                self.control.sendall(data)
            else:
                sent = socket.send_fds(self.control, [data], [fd])
                self.control.sendall(data[sent:])

    def _become_worker(self) -> None:
        """Shed the supervisor's descriptors and signal set-up in a new worker."""
        from .worker import ignore_group_signals

        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ignore_group_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
        for fd in (self._wake_r, self._wake_w, *self.reports.values()):
            os.close(fd)
        self.reports.clear()
        self.control.close()
        _die_with_parent()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the supervisor) dies."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        _flush_and_exit(EXIT_ERROR)


def _flush_and_exit(code: int) -> None:
    """Leave a forked child without running the parent's atexit handlers."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


class SupervisorLink:
    """The producer's side: forks the supervisor, then talks to it from the event loop."""

    def __init__(self, pid: int, control: socket.socket) -> None:
        self.pid = pid
        self.control = control
        self._inbox = b""
        self._exit_code: int | None = None
        self._gone: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: list[int] = []  # descriptors received, each for its "spawned" line
        self.on_spawned: Callable[[int, socket.socket], None] = lambda pid, sock: sock.close()
        self.on_setup_failed: Callable[[int, float, str], None] = lambda pid, backoff, error: None
        self.on_exited: Callable[[int, int], None] = lambda pid, code: None
        self.on_retire: Callable[[int], None] = lambda pid: None
        self.on_lost: Callable[[], None] = lambda: None

    @classmethod
    def fork(
        cls,
        consumer: Consumer,
        processes: int,
        max_job: int,
        *,
        target: str | None = None,
        limits: WorkerLimits = WorkerLimits(),  # noqa: B008 (immutable)
    ) -> SupervisorLink:
        """Fork the supervisor; it waits for :meth:`go` before forking workers.

        `max_job` bounds the body of a job frame a worker accepts; `target`
        (MODULE:ATTR) is what a reload re-imports; `limits` are the workers'.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The supervisor (and, after it, every worker) keeps what exists now out
        # of the collector's passes, which would otherwise copy the pages it
        # shares with us; here they are collected as before, unless the caller
        # had frozen some itself (unfreeze cannot tell theirs from ours).
        caller_froze = gc.get_freeze_count() > 0
        gc.freeze()
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0 and not caller_froze:
                gc.unfreeze()
        if pid == 0:
            code = 1
            try:
                ours.close()
                code = Supervisor(
                    consumer, processes, theirs, max_job, target=target, limits=limits
                ).run()
            except BaseException:
                log.exception("supervisor crashed")
            finally:
                _flush_and_exit(code)
        theirs.close()
        return cls(pid, ours)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the supervisor's reports on `loop`."""
        self.control.setblocking(False)
        self._loop = loop
        self._gone = loop.create_future()
        loop.add_reader(self.control.fileno(), self._on_readable)

    def go(self) -> None:
        """Let the supervisor fork its workers (the dispatcher is bound by now)."""
        self._send("go")

    def kill(self, pid: int) -> None:
        """Have the supervisor SIGKILL one worker (a request ran past its timeout)."""
        self._send(f"kill {pid}")

    def ready(self, pid: int) -> None:
        """Worker `pid` said READY (a reload waits for it before retiring an old one)."""
        self._send(f"ready {pid}")

    def reload(self) -> None:
        """Have every worker replaced, one at a time, after re-importing the target."""
        self._send("reload")

    def scale(self, processes: int) -> None:
        """Have `processes` workers."""
        self._send(f"scale {processes}")

    async def stop(self, term_timeout: float) -> int:
        """Retire all workers and the supervisor; return the supervisor's exit code."""
        import asyncio

        self._send(f"stop {term_timeout}")
        if self._gone is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._gone), term_timeout + 5.0)
        return self.reap(wait=True)

    def reap(self, wait: bool) -> int:
        """Collect the supervisor's exit status, SIGKILLing it if it will not go."""
        if self._exit_code is not None:
            return self._exit_code
        if self._gone is None or not self._gone.done():
            # Not yet exited on its own: it ignored "stop", or we are tearing down early
            # (it ignores SIGTERM, which is the process group's).
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 0
        self._exit_code = os.waitstatus_to_exitcode(status)
        return self._exit_code

    def close(self) -> None:
        """Stop reading and close our end of the control socket."""
        if self._loop is not None and self.control.fileno() >= 0:
            self._loop.remove_reader(self.control.fileno())
        self.control.close()
        while self._fds:
            os.close(self._fds.pop())

    def _send(self, line: str) -> None:
        try:
            self.control.sendall(line.encode("ascii") + b"\n")
        except BlockingIOError:
            # Lines are tiny; a full buffer means the supervisor is stuck.
            log.error("supervisor is not reading its control socket")
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                raise

    def _on_readable(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.control, 65536, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds, flags = b"", [], 0
        self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            log.error("the supervisor sent more worker links than a read takes")
        if not data:
            assert self._loop is not None
            self._loop.remove_reader(self.control.fileno())
            if self._gone is not None and not self._gone.done():
                self._gone.set_result(None)
            self.on_lost()
            return
        self._inbox += data
        while b"\n" in self._inbox:
            line, self._inbox = self._inbox.split(b"\n", 1)
            words = line.decode("utf-8", "replace").split(" ", 3)
            if words[0] == "spawned":
                if not self._fds:
                    log.error("worker %s came without its link", words[1])
                    continue
                sock = socket.socket(fileno=self._fds.pop(0))
                self.on_spawned(int(words[1]), sock)
            elif words[0] == "setup-failed":
                self.on_setup_failed(int(words[1]), float(words[2]), words[3])
            elif words[0] == "exited":
                self.on_exited(int(words[1]), int(words[2]))
            elif words[0] == "retire":
                self.on_retire(int(words[1]))

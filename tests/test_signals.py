"""Signals on `gaspar serve`, sent to its main process or to its whole process group,
and process titles. Real processes, real signals, bounded."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import gaspar
from gaspar import workerproto as wp
from gaspar.client import request
from gaspar.errors import RequestFailed
from gaspar.supervisor import Supervisor, _flush_and_exit
from tests import handlers
from tests.conftest import alive, child_pids, group_members, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTENING = re.compile(rb"listening on (\S+):(\d+) with (\d+) workers")


class Served:
    """`gaspar serve` in a session (and process group) of its own, its log read under deadlines."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gaspar", "serve", *args, "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
            bufsize=0,
            start_new_session=True,
        )
        self.pgid = self.proc.pid
        self.log: list[bytes] = []
        try:
            self.port = int(self.wait_for_line(LISTENING).group(2))
        except BaseException:
            self.kill()
            raise
        self.address = ("127.0.0.1", self.port)

    def wait_for_line(self, pattern: re.Pattern[bytes], timeout: float = 20) -> re.Match[bytes]:
        """The first line from now on (or already read) that matches `pattern`."""
        for line in self.log:
            if (match := pattern.search(line)) is not None:
                return match
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], deadline - time.monotonic())
            if not ready:
                break
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if (match := pattern.search(line)) is not None:
                return match
        raise AssertionError(f"no line matching {pattern.pattern!r} in {self.log!r}")

    @property
    def supervisor(self) -> int:
        (pid,) = child_pids(self.proc.pid)
        return pid

    def workers(self) -> set[int]:
        return child_pids(self.supervisor)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.pgid, sig)

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        self.log.extend(self.proc.stderr.read().splitlines(keepends=True))
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(10)
        for pid in group_members(self.pgid):  # a worker orphaned by the SIGKILL
            os.kill(pid, signal.SIGKILL)


def serving() -> Iterator[Callable[..., Served]]:
    """The `served` fixture: start `gaspar serve` processes; kill each after the test."""
    started: list[Served] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Served:
        srv = Served(*args, env=env)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.kill()


served = pytest.fixture(serving, name="served")


class Load:
    """Threads sending requests in a loop (v1, and v2 through one Client) until stopped."""

    def __init__(
        self, address: tuple[str, int], message: bytes = b"pid", v1: int = 1, v2: int = 1
    ) -> None:
        self.address = address
        self.message = message
        self.replies: list[bytes] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._client = gaspar.Client(address, timeout=30)
        self.threads = [threading.Thread(target=self._v1) for _ in range(v1)]
        self.threads += [threading.Thread(target=self._v2) for _ in range(v2)]
        for thread in self.threads:
            thread.start()

    def _loop(self, send: Callable[[], bytes]) -> None:
        while not self._stop.is_set():
            try:
                self.replies.append(send())
            except Exception as exc:  # recorded for the assertions
                self.failures.append(exc)

    def _v1(self) -> None:
        self._loop(lambda: request(self.address, self.message, timeout=30))

    def _v2(self) -> None:
        self._loop(lambda: self._client.request(self.message))

    def wait_for(self, n: int, timeout: float = 20) -> bool:
        """Wait until `n` more replies have come."""
        target = len(self.replies) + n
        return wait_until(lambda: len(self.replies) >= target or bool(self.failures), timeout)

    def stop(self) -> list[BaseException]:
        self._stop.set()
        for thread in self.threads:
            thread.join(40)
        self._client.close()
        return self.failures


class Call:
    """One request in a thread of its own; `result()` is its reply or its exception."""

    def __init__(self, address: tuple[str, int], message: bytes) -> None:
        self.outcome: list[bytes | BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(address, message))
        self.thread.start()

    def _run(self, address: tuple[str, int], message: bytes) -> None:
        try:
            self.outcome.append(request(address, message, timeout=60))
        except RequestFailed as exc:
            self.outcome.append(exc)

    def result(self, timeout: float = 30) -> bytes | BaseException:
        self.thread.join(timeout)
        assert self.outcome, "the request did not end"
        return self.outcome[0]


def behave(message: bytes) -> bytes | str:
    """tests.handlers.behave, and `marksleep:SECONDS:PATH`: make PATH, then sleep SECONDS."""
    verb, _, arg = message.partition(b":")
    if verb == b"marksleep":
        seconds, _, path = arg.partition(b":")
        with open(path, "w"):
            pass
        time.sleep(float(seconds))  # handler: simulated work that tells the test it began
        return b"slept:" + seconds
    return handlers.behave(message)


SERVE = "tests.test_signals:behave"


def start_long(address: tuple[str, int], marker: os.PathLike[str], seconds: float = 60) -> Call:
    """A request whose handler is running once this returns (it made `marker`)."""
    call = Call(address, b"marksleep:%g:%s" % (seconds, os.fsencode(marker)))
    assert wait_until(lambda: os.path.exists(marker), timeout=20)
    return call


def title_of(pid: int) -> tuple[str, str]:
    """(/proc/PID/cmdline as one line, /proc/PID/comm)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return "", ""
    return cmdline, comm


def is_busy(pid: int) -> bool:
    cmdline, comm = title_of(pid)
    return cmdline.endswith(" busy") or comm.endswith(" busy")


def no_process_left(srv: Served) -> bool:
    return not group_members(srv.pgid)


def test_group_term_lets_the_running_request_finish_and_stops_promptly(served, tmp_path) -> None:
    """`kill -TERM -PGID` (systemd, `timeout`, a container runtime): the supervisor and the
    workers get it too, yet the 1 s request completes and the stop takes no 10 s."""
    srv = served(SERVE, "--workers", "2")
    workers = srv.workers()
    call = start_long(srv.address, tmp_path / "running", seconds=1)
    started = time.monotonic()
    srv.signal_group(signal.SIGTERM)
    assert call.result() == b"slept:1"
    assert srv.wait() == 0
    assert time.monotonic() - started < 6
    assert wait_until(lambda: no_process_left(srv), timeout=10)
    assert not any(alive(pid) for pid in workers)
    assert any(b"stopped" in line for line in srv.log)


def test_second_group_term_during_the_grace_stops_at_once(served, tmp_path) -> None:
    srv = served(SERVE, "--workers", "1", "--grace", "60")
    call = start_long(srv.address, tmp_path / "running")
    srv.signal_group(signal.SIGTERM)
    srv.wait_for_line(re.compile(rb"stopping: 1 requests in flight"))
    started = time.monotonic()
    srv.signal_group(signal.SIGTERM)
    assert srv.wait() == 0
    assert time.monotonic() - started < 10
    assert isinstance(call.result(), RequestFailed)
    assert wait_until(lambda: no_process_left(srv), timeout=10)


@pytest.mark.parametrize("to_group", [False, True], ids=["main", "group"])
def test_quit_stops_at_once(served, tmp_path, to_group: bool) -> None:
    srv = served(SERVE, "--workers", "2", "--grace", "60")
    call = start_long(srv.address, tmp_path / "running")
    started = time.monotonic()
    if to_group:
        srv.signal_group(signal.SIGQUIT)
    else:
        srv.proc.send_signal(signal.SIGQUIT)
    assert srv.wait() == 0
    assert time.monotonic() - started < 10
    assert isinstance(call.result(), RequestFailed)
    assert wait_until(lambda: no_process_left(srv), timeout=10)
    assert not any(b"core" in line.lower() for line in srv.log)


def test_titles_of_producer_supervisor_and_workers(served, tmp_path) -> None:
    srv = served(SERVE, "--workers", "2")
    has_setproctitle = _has_setproctitle()

    def titled(pid: int, title: str) -> bool:
        cmdline, comm = title_of(pid)
        if has_setproctitle:
            return cmdline == title
        return comm == title.removeprefix("gaspar: ")[:15]

    producer = f"gaspar: producer 127.0.0.1:{srv.port}"
    assert wait_until(lambda: titled(srv.proc.pid, producer), timeout=10), title_of(srv.proc.pid)
    assert titled(srv.supervisor, "gaspar: supervisor"), title_of(srv.supervisor)
    idle = {f"gaspar: worker {n} idle" for n in (1, 2)}
    assert wait_until(
        lambda: {t for t in idle for pid in srv.workers() if titled(pid, t)} == idle, timeout=10
    ), [title_of(pid) for pid in srv.workers()]
    call = start_long(srv.address, tmp_path / "running")
    (busy,) = [pid for pid in srv.workers() if is_busy(pid)]
    assert re.fullmatch(
        r"gaspar: worker [12] busy|worker [12] busy", title_of(busy)[0 if has_setproctitle else 1]
    )
    os.kill(busy, signal.SIGKILL)  # ends the 60 s request
    assert isinstance(call.result(), RequestFailed)


def _has_setproctitle() -> bool:
    try:
        import setproctitle  # noqa: F401
    except ImportError:
        return False
    return True


def test_without_setproctitle_the_command_name_is_set() -> None:
    """prctl(PR_SET_NAME): the title less its prefix, cut to the kernel's 15 bytes."""
    code = (
        "import sys; sys.modules['setproctitle'] = None\n"
        "from gaspar.proctitle import set_title\n"
        "set_title('gaspar: worker 3 busy'); print(open('/proc/self/comm').read().strip())\n"
        "set_title('gaspar: producer 127.0.0.1:10123'); print(open('/proc/self/comm').read())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=30, cwd=ROOT, text=True
    )
    assert out.stdout.split("\n")[:2] == ["worker 3 busy", "producer 127.0."]


def test_group_signals_do_not_disturb_a_running_job(served, tmp_path) -> None:
    """HUP, TTIN and TTOU sent to the whole group: the job in flight finishes; nothing dies
    of a default action (HUP terminates, TTIN/TTOU stop a process by default)."""
    srv = served(SERVE, "--workers", "2")
    supervisor = srv.supervisor
    call = start_long(srv.address, tmp_path / "running", seconds=1.5)
    for sig in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP):
        srv.signal_group(sig)
    assert call.result() == b"slept:1.5"
    assert alive(supervisor) and srv.proc.poll() is None
    srv.wait_for_line(re.compile(rb"SIGHUP: reloading"))
    assert request(srv.address, b"echo:still", timeout=10) == b"still"
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait() == 0


class MiniProducer:
    """The producer's side of a supervisor's control socket, as little as it takes: it says
    "ready" for each worker's READY and ends a retired worker's link at once."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        control.settimeout(20)
        self.links: dict[int, socket.socket] = {}
        self.fds: list[int] = []
        self.inbox = b""
        self.exited: dict[int, int] = {}

    def next_line(self) -> list[str]:
        while b"\n" not in self.inbox:
            data, fds, _, _ = socket.recv_fds(self.control, 65536, 16)
            assert data, "the supervisor closed its control socket"
            self.fds.extend(fds)
            self.inbox += data
        line, self.inbox = self.inbox.split(b"\n", 1)
        words = line.decode().split(" ")
        pid = int(words[1])
        if words[0] == "spawned":
            link = socket.socket(fileno=self.fds.pop(0))
            link.settimeout(20)
            reader = wp.FrameReader(1 << 20)
            while (message := reader.next()) is None:
                n = link.recv_into(reader.get_buffer())
                assert n, "the worker left before READY"
                reader.feed(n)
            assert message[0] == wp.READY
            self.links[pid] = link
            self.control.sendall(b"ready %d\n" % pid)
        elif words[0] == "retire":
            self.links.pop(pid).close()
        elif words[0] == "exited":
            self.exited[pid] = int(words[2])
        return words

    def expect(self, *kinds: str) -> list[int]:
        """Read lines until one of each of `kinds` (in any order) came; their pids."""
        wanted, pids = list(kinds), []
        while wanted:
            words = self.next_line()
            if words[0] in wanted:
                wanted.remove(words[0])
                pids.append(int(words[1]))
        return pids


def test_a_supervisor_that_owns_its_signals() -> None:
    """The supervisor as a program's main process (what `gaspar worker` reuses): TTIN,
    TTOU, HUP and TERM, with each new worker ready before an old one is retired."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the supervisor
        code = 1
        try:
            ours.close()
            consumer = gaspar.Consumer(handlers.echo)
            code = Supervisor(consumer, 2, theirs, 1 << 20, own_signals=True, grace=5).run()
        finally:
            _flush_and_exit(code)
    theirs.close()
    producer = MiniProducer(ours)
    try:
        ours.sendall(b"go\n")
        first = set(producer.expect("spawned", "spawned"))
        os.kill(pid, signal.SIGTTIN)
        (third,) = producer.expect("spawned")
        os.kill(pid, signal.SIGTTOU)
        (retired,) = producer.expect("retire")
        assert retired == third  # the highest slot number goes first
        assert producer.expect("exited") == [third] and producer.exited[third] == 0
        os.kill(pid, signal.SIGHUP)
        kinds = []
        while len(producer.links) < 2 or set(producer.links) & first:
            kinds.append(producer.next_line()[0])
        # One at a time: each new worker is ready (we said so on "spawned") before an old
        # one is retired, and the next is forked only then.
        assert [kind for kind in kinds if kind != "exited"][:3] == ["spawned", "retire", "spawned"]
        last = set(producer.links)
        os.kill(pid, signal.SIGTERM)
        assert set(producer.expect("retire", "retire")) == last
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert all(code == 0 for code in producer.exited.values())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        for link in producer.links.values():
            link.close()
        ours.close()

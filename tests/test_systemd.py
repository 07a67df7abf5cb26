"""systemd's protocols as systemd speaks them: a fake NOTIFY_SOCKET, and inherited descriptors.

`gaspar serve` runs as a separate process, as under a unit: the test plays
systemd, receiving the notifications on a datagram socket of its own, and
passing a listening socket as descriptor 3 with LISTEN_PID, LISTEN_FDS and
LISTEN_FDNAMES set for the served process's own pid (an exec keeps it).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gaspar import systemd
from gaspar.client import request
from tests.conftest import child_pids, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = [sys.executable, "-m", "gaspar", "serve"]

# Exec the command after the first three arguments the way systemd starts a
# socket-activated service: the descriptors listed (comma-separated) become 3, 4,
# ...; LISTEN_PID is this process's pid ("self", which the exec keeps) or the one
# given; LISTEN_FDNAMES the names given ("-" for none).
ACTIVATE = r"""
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[2] == "self" else sys.argv[2]
os.environ["LISTEN_FDS"] = str(len(fds))
if sys.argv[3] != "-":
    os.environ["LISTEN_FDNAMES"] = sys.argv[3]
os.execv(sys.executable, [sys.executable, *sys.argv[4:]])
"""


def activated(
    socks: list[socket.socket], command: list[str], listen_pid: str = "self", names: str = "-"
) -> tuple[list[str], tuple[int, ...]]:
    """`command` (a Python command line) run with `socks` passed by socket activation,
    and the descriptors that Popen's pass_fds must let through to it."""
    fds = tuple(s.fileno() for s in socks)
    wrapper = [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), listen_pid, names]
    return [*wrapper, *command[1:]], fds


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a datagram socket at a path or an abstract name."""

    def __init__(self, directory: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.address = f"@gaspar-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + self.address[1:])
        else:
            self.address = str(directory / "notify")
            self.sock.bind(self.address)

    def receive(self, timeout: float = 30.0) -> dict[str, str]:
        """The next notification, as a dict of its variables."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self) -> None:
        self.sock.close()


class Served:
    """A `gaspar serve` (or any command) in a subprocess, its log in a file, always ended."""

    def __init__(
        self, command: list[str], directory: Path, passed: tuple[int, ...] = (), **env: str
    ) -> None:
        self.log = directory / "serve.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                pass_fds=passed,
            )

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    directory = tmp_path / "marks"
    directory.mkdir()
    return directory


@pytest.fixture
def processes() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait(10)


def socket_inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def holds(pid: int, inode: int) -> bool:
    """True if process `pid` has a descriptor for the socket of that inode."""
    target = f"socket:[{inode}]"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except FileNotFoundError:
            continue
    return False


def listener() -> socket.socket:
    """A listening TCP socket on a free loopback port, as a socket unit makes one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def served_port(ready: dict[str, str]) -> int:
    """The port in the READY notification's STATUS line ("serving on HOST:PORT with ...")."""
    return int(ready["STATUS"].split()[2].rsplit(":", 1)[1])


# -- notify ------------------------------------------------------------------------


def test_notify_without_notify_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    fake = FakeSystemd(tmp_path, abstract)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
        assert systemd.notify("READY=1\nSTATUS=up") is True
        assert fake.receive(5) == {"READY": "1", "STATUS": "up"}
    finally:
        fake.close()


def test_notify_to_nobody_is_false_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert systemd.notify("READY=1") is False
    assert "cannot notify systemd" in caplog.text
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_serve_is_ready_once_workers_are_and_says_stopping(
    tmp_path: Path, marks: Path, processes: list[Served], abstract: bool
) -> None:
    fake = FakeSystemd(tmp_path, abstract)
    try:
        command = [*SERVE, "tests.systemd_handlers:slow_setup", "--workers", "2", "--port", "0"]
        served = Served(command, tmp_path, NOTIFY_SOCKET=fake.address, GASPAR_TEST_MARKS=str(marks))
        processes.append(served)
        ready = fake.receive()  # the first notification of all
        # Every worker's setup() had ended, and the port answers at once.
        assert len(list(marks.iterdir())) == 2, served.text()
        assert ready["READY"] == "1" and ready["MAINPID"] == str(served.proc.pid)
        assert ready["STATUS"].endswith("with 2 workers")
        assert request(("127.0.0.1", served_port(ready)), b"hi", timeout=10) == b"hi"
        served.proc.send_signal(signal.SIGTERM)
        stopping = fake.receive()
        assert stopping["STOPPING"] == "1" and stopping["STATUS"].startswith("stopping")
        assert served.proc.wait(30) == 0
    finally:
        fake.close()


# -- socket activation -------------------------------------------------------------


def test_listen_fds_takes_what_is_passed_and_unsets_the_variables() -> None:
    script = (
        "import os, socket; from gaspar import systemd;"
        "found = systemd.listen_fds_with_names();"
        "print([(n, s.fileno(), s.type == socket.SOCK_STREAM, s.get_inheritable())"
        " for n, s in found]);"
        "print(sorted(k for k in os.environ if k.startswith('LISTEN_')));"
        "print(systemd.listen_fds())"
    )
    a, b = listener(), listener()
    try:
        command, fds = activated([a, b], [sys.executable, "-c", script], names="client:other")
        out = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=30, pass_fds=fds
        )
    finally:
        a.close()
        b.close()
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "[('client', 3, True, False), ('other', 4, True, False)]",
        "[]",  # unset: children do not inherit them
        "[]",  # and a second call finds nothing
    ]


def test_listen_fds_for_another_process_is_ignored_and_unset() -> None:
    script = (
        "import os; from gaspar import systemd;"
        "print(systemd.listen_fds(), [k for k in os.environ if k.startswith('LISTEN_')])"
    )
    sock = listener()
    try:
        command, fds = activated([sock], [sys.executable, "-c", script], listen_pid="1")
        out = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=30, pass_fds=fds
        )
    finally:
        sock.close()
    assert out.returncode == 0 and out.stdout.strip() == "[] []", out.stderr


def test_serve_accepts_on_the_socket_systemd_passes(
    tmp_path: Path, processes: list[Served]
) -> None:
    fake = FakeSystemd(tmp_path, abstract=False)
    sock = listener()
    port = sock.getsockname()[1]
    inode = socket_inode(sock)
    try:
        command = [*SERVE, "tests.systemd_handlers:steered", "--workers", "2", "--port", "1"]
        wrapped, fds = activated([sock], command, names="gaspar")
        served = Served(wrapped, tmp_path, fds, NOTIFY_SOCKET=fake.address)
        processes.append(served)
        ready = fake.receive()
        assert served_port(ready) == port  # not port 1: nothing was bound
        assert request(("127.0.0.1", port), b"echo:activated", timeout=10) == b"activated"
        log = served.text()
        assert f"serving on 127.0.0.1:{port}, the socket systemd passed (gaspar)" in log
        # The producer holds the port; its supervisor and workers do not, nor do
        # they inherit the variables.
        producer = served.proc.pid
        assert holds(producer, inode)
        (supervisor,) = child_pids(producer)
        assert wait_until(lambda: len(child_pids(supervisor)) == 2)
        for pid in (supervisor, *child_pids(supervisor)):
            assert not holds(pid, inode), f"process {pid} holds the client port"
        assert request(("127.0.0.1", port), b"env", timeout=10) == b""
        # The socket is set up as a bound one (our descriptor shares it): accepted
        # connections start abortive (SO_LINGER on, 0 s), and wake the loop with data.
        linger = sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        assert struct.unpack("ii", linger) == (1, 0)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        assert served.stop() == 0
    finally:
        sock.close()
        fake.close()


def test_a_producer_from_python_takes_the_socket_too() -> None:
    script = (
        "import gaspar; from gaspar.client import request;"
        "p = gaspar.Producer(lambda m: m[::-1], 0, processes=1); p.start(blocking=False);"
        "print(p.address[1], request(p.address, b'olleh', timeout=10).decode()); p.stop()"
    )
    sock = listener()
    try:
        command, fds = activated([sock], [sys.executable, "-c", script])
        out = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=30, pass_fds=fds
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(sock.getsockname()[1]), "hello"]
    finally:
        sock.close()


def test_serve_ignores_sockets_passed_to_another_process(
    tmp_path: Path, processes: list[Served]
) -> None:
    fake = FakeSystemd(tmp_path, abstract=False)
    sock = listener()
    try:
        command = [*SERVE, "tests.systemd_handlers:steered", "--workers", "1", "--port", "0"]
        wrapped, fds = activated([sock], command, listen_pid=str(os.getpid()))
        served = Served(wrapped, tmp_path, fds, NOTIFY_SOCKET=fake.address)
        processes.append(served)
        ready = fake.receive()
        port = served_port(ready)
        assert port != sock.getsockname()[1]  # it bound a port of its own
        assert request(("127.0.0.1", port), b"echo:own", timeout=10) == b"own"
        assert request(("127.0.0.1", port), b"env", timeout=10) == b""
        assert served.stop() == 0
    finally:
        sock.close()
        fake.close()


def test_serve_refuses_several_sockets_or_one_that_is_not_listening(tmp_path: Path) -> None:
    a, b = listener(), listener()
    unconnected = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        command = [*SERVE, "tests.handlers:behave", "--workers", "1"]
        for socks, cause in (
            ([a, b], "systemd passed 2 sockets"),
            ([unconnected], "is not a listening TCP socket"),
        ):
            wrapped, fds = activated(socks, command)
            out = subprocess.run(
                wrapped,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=30,
                pass_fds=fds,
            )
            assert out.returncode == 1 and cause in out.stderr, out.stderr
            assert "Traceback" not in out.stderr
    finally:
        for sock in (a, b, unconnected):
            sock.close()

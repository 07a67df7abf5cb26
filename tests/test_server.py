"""The server's bounds against clients that misbehave, over real sockets.

Clients that stop reading (write_timeout, back-pressure), floods of refused
frames, a producer killed mid-request, connection slots held by idle v2
clients, the file-descriptor limit, and the throttle on client-error logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gaspar
from tests import handlers
from tests.conftest import connect, read_to_eof, wait_until

PREAMBLE = b"\xffGS\x02"
ROOT = Path(__file__).resolve().parent.parent
OK, OVERLOADED = 0, 4


def v2_socket(address: tuple[str, int], rcvbuf: int | None = None) -> socket.socket:
    """A v2 connection whose preamble has been answered (so the server has accepted it)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(address)
    sock.sendall(PREAMBLE)
    got = b""
    while len(got) < 4:
        chunk = sock.recv(4 - len(got))
        assert chunk, "closed before the preamble"
        got += chunk
    assert got == PREAMBLE
    return sock


def frame(request_id: int, payload: bytes) -> bytes:
    return struct.pack("!II", request_id, len(payload)) + payload


def vmrss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- clients that stop reading -------------------------------------------------------


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_write_timeout_drops_a_client_that_stops_reading(serve, protocol: str) -> None:
    producer = serve(
        handlers.behave, processes=1, write_timeout=0.5, idle_timeout=0.5, read_timeout=5
    )
    big = b"echo:" + b"r" * (8 << 20)
    if protocol == "v1":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(producer.address)
        sock.sendall(struct.pack("!I", len(big)) + big)
    else:
        sock = v2_socket(producer.address, rcvbuf=4096)
        for i in range(3):
            sock.sendall(frame(i, big))
    try:
        assert wait_until(lambda: producer.stats()["requests"]["ok"] >= 1, 20)
        # The client reads nothing: the server must give up within write_timeout
        # (plus a sweep), abort, and free the slot.
        assert wait_until(lambda: producer.stats()["connections"] == 0, 10)
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)
    finally:
        sock.close()


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_v1_large_reply_survives_a_late_half_close(serve, use_uvloop: bool) -> None:
    pytest.importorskip("uvloop") if use_uvloop else None
    producer = serve(handlers.behave, processes=1, use_uvloop=use_uvloop)
    body = bytes(range(256)) * (32 << 10)  # 8 MiB: the reply outlasts the kernel's buffers
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.settimeout(20)
    sock.connect(producer.address)
    try:
        sock.sendall(struct.pack("!I", len(body) + 5) + b"echo:" + body)
        first = sock.recv(65536)
        assert first
        sock.shutdown(socket.SHUT_WR)  # while the reply is being written
        assert first + read_to_eof(sock) == body
    finally:
        sock.close()


def test_v2_back_pressure_stops_reading_until_replies_drain(serve) -> None:
    producer = serve(handlers.behave, processes=1, write_timeout=30)
    payload = b"echo:" + b"p" * (1 << 20)
    count = 64
    sock = v2_socket(producer.address, rcvbuf=65536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sent = threading.Event()

    def send() -> None:
        for i in range(count):
            sock.sendall(frame(i, payload))
        sent.set()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        # The server stops reading once its replies back up: the sender blocks.
        assert wait_until(lambda: producer.stats()["requests"]["ok"] >= 2, 20)
        assert not sent.wait(2.0)
        answered = producer.stats()["requests"]["ok"]
        assert answered < count
        # Reading the replies lets everything through, each reply whole.
        seen = set()
        buf = b""
        while len(seen) < count:
            while len(buf) < 9:
                buf += sock.recv(1 << 20)
            rid, status, length = struct.unpack("!IBI", buf[:9])
            while len(buf) < 9 + length:
                buf += sock.recv(1 << 20)
            assert status == OK and buf[9 : 9 + length] == payload[5:]
            buf = buf[9 + length :]
            seen.add(rid)
        assert sent.wait(10)
    finally:
        sock.close()
        sender.join(10)


def test_refused_frames_from_a_client_that_does_not_read_stay_bounded(serve) -> None:
    producer = serve(handlers.behave, processes=1, max_pipeline=1, write_timeout=3)
    sock = v2_socket(producer.address, rcvbuf=4096)
    sock.sendall(frame(0, b"sleep:30"))  # fills the pipeline: what follows is refused
    assert wait_until(lambda: producer.stats()["in_flight"] == 1, 10)
    flood = b"".join(frame(i, b"") for i in range(1, 8193))  # 64 KiB of empty frames
    before = vmrss_kib()
    sent = 0
    sock.settimeout(2.0)
    try:
        while sent < 64 << 20:
            try:
                sock.sendall(flood)
            except TimeoutError:
                break  # the server stopped reading: what we want
            sent += len(flood)
        grown = vmrss_kib() - before
        refused = producer.stats()["requests"]["overloaded"]
        # Every refusal costs 36 bytes of reply: the server must not have taken
        # more frames than a bounded backlog of them.
        assert sent < 32 << 20, f"the server read {sent} bytes of frames it could not answer"
        assert refused * 36 < 16 << 20
        assert grown < 48 << 10, f"producer grew by {grown} KiB"
        # And it gives up on a client that never reads.
        assert wait_until(lambda: producer.stats()["connections"] == 0, 15)
    finally:
        sock.close()


# -- a producer killed mid-request ---------------------------------------------------

KILLED_PRODUCER = textwrap.dedent(
    """
    import sys, time
    import gaspar
    from tests import handlers
    producer = gaspar.Producer(handlers.behave, 0, processes=1, use_uvloop={uvloop})
    producer.start(blocking=False)
    print(producer.address[1], flush=True)
    sys.stdin.readline()  # the test has sent its request
    deadline = time.monotonic() + 20
    while producer.stats()["in_flight"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # poll, bounded by the deadline
    print("busy", flush=True)
    time.sleep(60)  # until the test kills us
    """
)


@pytest.fixture
def subprocess_group(tmp_path) -> Iterator[list[subprocess.Popen[str]]]:
    """Popen objects to kill (whole process group) after the test."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("gaspar-")]
    for name in leftovers:  # the producer's private directory, left by the SIGKILL
        shutil.rmtree(tmp_path / name, ignore_errors=True)


def spawn(code: str, tmp_path: Path, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    procs.append(proc)
    return proc


@pytest.mark.parametrize(
    ("protocol", "use_uvloop"), [("v1", False), ("v1", True), ("v2", False), ("v2", True)]
)
def test_client_sees_a_reset_when_the_producer_is_killed(
    tmp_path, subprocess_group, protocol: str, use_uvloop: bool
) -> None:
    """Not an end of stream, which a v1 client would read as an empty reply."""
    pytest.importorskip("uvloop") if use_uvloop else None
    proc = spawn(KILLED_PRODUCER.format(uvloop=use_uvloop), tmp_path, subprocess_group)
    assert proc.stdout is not None and proc.stdin is not None
    port = int(proc.stdout.readline())
    with connect(("127.0.0.1", port)) as sock:
        if protocol == "v1":
            sock.sendall(struct.pack("!I", 8) + b"sleep:30")
        else:
            sock.sendall(PREAMBLE + frame(1, b"sleep:30"))
        proc.stdin.write("sent\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "busy"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)


# -- connection slots ----------------------------------------------------------------


def test_idle_v2_connections_make_room_oldest_first(serve) -> None:
    producer = serve(handlers.behave, processes=1, max_connections=3)
    idle = [v2_socket(producer.address) for _ in range(3)]
    try:
        # A fourth client gets in: the oldest idle v2 connection is closed for it.
        with connect(producer.address) as sock:
            sock.sendall(struct.pack("!I", 7) + b"echo:in")
            assert read_to_eof(sock) == b"in"
        idle[0].settimeout(5)
        assert idle[0].recv(10) == b""
        # The others still work.
        for sock in idle[1:]:
            sock.sendall(frame(5, b"echo:x"))
            assert sock.recv(100) == struct.pack("!IBI", 5, OK, 1) + b"x"
    finally:
        for sock in idle:
            sock.close()


def test_busy_v2_connections_keep_their_slots(serve) -> None:
    producer = serve(handlers.behave, processes=1, max_connections=2, max_queue=10)
    busy = [v2_socket(producer.address) for _ in range(2)]
    try:
        for sock in busy:
            sock.sendall(frame(1, b"sleep:3"))
        assert wait_until(lambda: producer.stats()["queued"] + producer.stats()["in_flight"] == 2)
        with connect(producer.address) as sock:
            sock.sendall(struct.pack("!I", 7) + b"echo:in")
            with pytest.raises(ConnectionResetError):
                read_to_eof(sock)
        for sock in busy:
            sock.settimeout(10)
            assert sock.recv(9)[:4] == struct.pack("!I", 1)
    finally:
        for sock in busy:
            sock.close()


FD_LIMITED_PRODUCER = textwrap.dedent(
    """
    import logging, os, resource, sys, time
    import gaspar
    from tests import handlers
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    producer = gaspar.Producer(
        handlers.echo, 0, processes=1, use_uvloop={uvloop}, read_timeout=1.0
    )
    producer.start(blocking=False)
    opened = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 6, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))
    print(producer.address[1], flush=True)
    time.sleep(60)  # until the test kills us
    """
)


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_accept_failing_at_the_fd_limit_is_logged(
    tmp_path, subprocess_group, use_uvloop: bool
) -> None:
    pytest.importorskip("uvloop") if use_uvloop else None
    proc = spawn(FD_LIMITED_PRODUCER.format(uvloop=use_uvloop), tmp_path, subprocess_group)
    assert proc.stdout is not None and proc.stderr is not None
    port = int(proc.stdout.readline())
    socks = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(PREAMBLE)
            socks.append(sock)
        lines: list[str] = []

        def read_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        assert wait_until(lambda: any("file descriptors" in line for line in lines), 15), lines
        found = [line for line in lines if "file descriptors" in line]
        assert "max_connections=1024" in found[0]
    finally:
        for sock in socks:
            sock.close()


# -- logs ----------------------------------------------------------------------------


def test_client_errors_are_logged_throttled_with_the_address(serve, caplog) -> None:
    producer = serve(handlers.echo, processes=1, host="::1")
    caplog.set_level(logging.INFO, logger="gaspar.server")
    for _ in range(40):
        with socket.create_connection(producer.address, timeout=10) as sock:
            sock.sendall(PREAMBLE[:3] + b"\x01" + b"junk" * 2)  # a v1 length past the limit
            with pytest.raises(ConnectionResetError):
                read_to_eof(sock)
    assert wait_until(lambda: producer.stats()["requests"]["too_large"] == 40)
    lines = [r.getMessage() for r in caplog.records if r.name == "gaspar.server"]
    assert 1 <= len(lines) <= 5, lines
    assert "[::1]:" in lines[0]


def test_throttled_counts_what_it_did_not_print(caplog) -> None:
    from gaspar.server import Throttled

    caplog.set_level(logging.INFO, logger="gaspar.server")
    say = Throttled(logging.INFO, "event %s", interval=60.0)
    for i in range(5):
        say(i)
    assert [r.getMessage() for r in caplog.records] == ["event 0 (1 since the last report)"]
    assert say.count == 4


def test_gaspar_stops_at_once_with_v2_clients_that_do_not_read() -> None:
    producer = gaspar.Producer(handlers.behave, 0, processes=1, write_timeout=1.0)
    producer.start(blocking=False)
    sock = v2_socket(producer.address, rcvbuf=4096)
    try:
        sock.sendall(frame(1, b"echo:" + b"z" * (4 << 20)))
        assert wait_until(lambda: producer.stats()["requests"]["ok"] == 1, 20)
        started = time.monotonic()
        producer.stop(grace=1.0)
        assert time.monotonic() - started < 15
    finally:
        sock.close()

"""Shared fixtures: producers that always stop, raw sockets, process checks."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import gaspar
from gaspar.protocol import pack


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Producers of this run, here and in subprocesses, put their directories in one
    place of the run's own; a `gaspar-*` left there at the end fails the run."""
    base = tmp_path_factory.mktemp("tmpdir")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(base)
    tempfile.tempdir = None  # read TMPDIR again
    yield
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]

    def left() -> list[str]:
        return sorted(path.name for path in base.glob("gaspar-*"))

    # A supervisor whose producer was killed removes its directory as it leaves.
    wait_until(lambda: not left(), timeout=10)
    assert not left(), f"the run left these behind in {base}: {left()}"


@pytest.fixture
def serve() -> Iterator[Callable[..., gaspar.Producer]]:
    """Start producers in the background; stop every one after the test."""
    started: list[gaspar.Producer] = []

    def start(handler: Any, processes: int = 2, **options: Any) -> gaspar.Producer:
        producer = gaspar.Producer(handler, 0, processes=processes, **options)
        producer.start(blocking=False)
        started.append(producer)
        return producer

    yield start
    for producer in started:
        producer.stop(grace=5)


def connect(address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def read_to_eof(sock: socket.socket) -> bytes:
    """Read a v1 reply; a reset propagates as ConnectionResetError."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def raw_request(address: tuple[str, int], payload: bytes, timeout: float = 10.0) -> bytes:
    """The original client's logic: sendall(pack(msg)), then read to EOF."""
    with connect(address, timeout) as sock:
        sock.sendall(pack(payload))
        return read_to_eof(sock)


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped while being read
        return False


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)  # poll interval, bounded by the deadline above
    return predicate()


def _live_where(field: int, value: int) -> set[int]:
    """Live (not zombie) processes whose /proc stat field `field`, counted after the
    name (1: parent pid, 2: process group), is `value`."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[field]) == value and fields[0] != "Z":
                found.add(int(entry))
    return found


def child_pids(pid: int) -> set[int]:
    """Direct children of `pid`, from /proc."""
    return _live_where(1, pid)


def group_members(pgid: int) -> set[int]:
    """Live processes of process group `pgid`, from /proc."""
    return _live_where(2, pgid)


def in_thread(fn: Callable[..., Any], *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Run fn(*args) (a blocking client call) in a thread; its result or exception lands
    in the returned list."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn(*args))
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box

"""Stopping: in-flight requests finish within the grace period; nothing is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import gaspar
from gaspar.client import request
from tests import handlers
from tests.conftest import alive, wait_until


class Requests:
    """Send `messages` concurrently from threads; `join()` returns each outcome."""

    def __init__(self, address: tuple[str, int], messages: list[bytes]) -> None:
        self.results: list[bytes | Exception] = [b""] * len(messages)
        self.threads = [
            threading.Thread(target=self._one, args=(address, i, m)) for i, m in enumerate(messages)
        ]
        for t in self.threads:
            t.start()

    def _one(self, address: tuple[str, int], i: int, message: bytes) -> None:
        try:
            self.results[i] = request(address, message, timeout=30)
        except Exception as exc:  # recorded for the assertions
            self.results[i] = exc

    def join(self) -> list[bytes | Exception]:
        for t in self.threads:
            t.join(60)
        return self.results


def wait_outstanding(producer: gaspar.Producer, n: int) -> None:
    def outstanding() -> int:
        stats = producer.stats()
        return int(stats["queued"] + stats["in_flight"])

    assert wait_until(lambda: outstanding() >= n, timeout=10)


def test_stop_lets_in_flight_and_queued_requests_finish() -> None:
    producer = gaspar.Producer(handlers.behave, 0, processes=2)
    producer.start(blocking=False)
    supervisor, workers = producer.supervisor_pid, producer.worker_pids()
    address = producer.address
    messages = [b"sleep:0.4"] * 4  # two running, two queued
    requests = Requests(address, messages)
    wait_outstanding(producer, 4)
    started = time.monotonic()
    producer.stop(grace=10)
    elapsed = time.monotonic() - started
    assert requests.join() == [b"slept:0.4"] * 4
    assert elapsed < 5
    assert not alive(supervisor) and not any(alive(p) for p in workers)
    with pytest.raises(gaspar.ConnectionFailed):
        request(address, b"late", timeout=5)


def test_grace_period_bounds_the_stop() -> None:
    producer = gaspar.Producer(handlers.behave, 0, processes=1)
    producer.start(blocking=False)
    workers = producer.worker_pids()
    requests = Requests(producer.address, [b"sleep:30"])
    wait_outstanding(producer, 1)
    started = time.monotonic()
    producer.stop(grace=0.5)
    assert time.monotonic() - started < 10
    (result,) = requests.join()
    assert isinstance(result, gaspar.RequestFailed)
    assert not any(alive(p) for p in workers)


def test_stop_does_not_wait_for_a_request_whose_client_has_gone() -> None:
    """A running request whose client reset its connection runs for nobody: the stop
    takes none of its grace for it, and its worker is killed."""
    import socket
    import struct

    producer = gaspar.Producer(handlers.behave, 0, processes=1)
    producer.start(blocking=False)
    workers = producer.worker_pids()
    sock = socket.create_connection(producer.address, timeout=10)
    sock.sendall(struct.pack("!I", 8) + b"sleep:30")
    wait_outstanding(producer, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset: the server cancels the request, which runs on in its worker
    assert wait_until(lambda: producer.stats()["connections"] == 0, timeout=10)
    started = time.monotonic()
    producer.stop(grace=20)
    assert time.monotonic() - started < 5
    assert not any(alive(p) for p in workers)


def test_stop_is_idempotent_and_safe_before_start() -> None:
    producer = gaspar.Producer(handlers.echo, 0, processes=1)
    producer.stop()
    producer.start(blocking=False)
    producer.stop()
    producer.stop()
    assert producer.state == "stopped"


def test_stop_from_another_thread_ends_blocking_start() -> None:
    producer = gaspar.Producer(handlers.echo, 0, processes=1)
    done = threading.Event()

    def serve() -> None:
        producer.start()
        done.set()

    thread = threading.Thread(target=serve)
    thread.start()
    assert wait_until(lambda: producer.state == "running", timeout=20)
    producer.stop()
    assert done.wait(20)
    thread.join(20)


SERVER = """
import sys
import gaspar
from tests import handlers
producer = gaspar.Producer(handlers.behave, 0, processes=2)
producer.start(blocking=False)
print(producer.address[1], producer.supervisor_pid, *producer.worker_pids(), flush=True)
sys.stdin.read()  # hold until the test kills us
"""


def test_workers_do_not_outlive_a_killed_producer(tmp_path) -> None:
    """SIGKILL the producer: its supervisor and workers notice and leave, and nothing is
    left on disk (the workers' links are socket pairs)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        env=dict(os.environ, TMPDIR=str(tmp_path)),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        port, supervisor, *workers = (int(x) for x in line)
        assert request(("127.0.0.1", port), b"echo:up", timeout=10) == b"up"
        assert list(tmp_path.iterdir()) == []
        proc.kill()
        proc.wait(10)
        assert wait_until(lambda: not alive(supervisor), timeout=20)
        assert wait_until(lambda: not any(alive(p) for p in workers), timeout=20)
        assert list(tmp_path.iterdir()) == []
    finally:
        proc.kill()
        proc.wait(10)


def test_workers_do_not_outlive_a_killed_supervisor(serve) -> None:
    producer = serve(handlers.behave, processes=2)
    workers = producer.worker_pids()
    os.kill(producer.supervisor_pid, signal.SIGKILL)
    assert wait_until(lambda: not any(alive(p) for p in workers), timeout=20)
    # The producer notices and stops rather than accepting work it cannot do.
    assert wait_until(lambda: producer.state == "stopped", timeout=20)

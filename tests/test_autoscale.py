"""Autoscaling: worker hosts come and go under continuous load, and no request fails.

Issue 11 item 4: a second `gaspar worker` host joins a producer that is
serving (its slots join the pool: ``stats()["workers"]`` grows), then one
host is stopped with SIGTERM: it says goodbye, so its slots leave the pool at
once, long before the heartbeat deadline (the heartbeat here is 5 s, so the
deadline is 15 s), and every request of the run ends OK.  Loopback only.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import gaspar
from gaspar.client import Client
from gaspar.errors import RequestFailed
from tests.conftest import wait_until
from tests.test_partition import GASPAR, Proc, make_keys, process_tree, worker_command_missing

HEARTBEAT = 5.0
JOB = b"work:0.02"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Load:
    """Threads that keep requests in flight and count what each ended with."""

    def __init__(self, address: tuple[str, int], concurrency: int) -> None:
        self.outcomes: Counter[str] = Counter()
        self.pids: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._client = Client(address, timeout=10.0, pool_size=concurrency)
        self._threads = [threading.Thread(target=self._loop) for _ in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                pid = int(self._client.request(JOB))
                outcome = "ok"
            except RequestFailed as exc:
                pid, outcome = 0, type(exc).__name__
            with self._lock:
                self.outcomes[outcome] += 1
                self.pids[pid] += 1

    def served_by(self, pids: set[int]) -> int:
        with self._lock:
            return sum(n for pid, n in self.pids.items() if pid in pids)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self._client.close()
        assert not any(thread.is_alive() for thread in self._threads), "a request hung"


def test_hosts_join_and_leave_under_load_with_no_failure(
    serve: Callable[..., gaspar.Producer], tmp_path: Path
) -> None:
    missing = worker_command_missing()
    if missing:
        import pytest

        pytest.skip(missing)
    from tests.test_partition import work

    keys = make_keys(tmp_path)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    producer = serve(
        work,
        processes=1,
        worker_bind=endpoint,
        key=str(keys["producer_secret"]),
        allow=str(keys["allow"]),
        heartbeat=HEARTBEAT,
    )
    assert producer.address is not None

    def host() -> Proc:
        return Proc(
            [GASPAR, "worker", endpoint, "tests.test_partition:work", "--processes", "2"]
            + ["--heartbeat", str(HEARTBEAT), "--key", str(keys["host_secret"])]
            + ["--server-key", str(keys["producer_public"])]
        )

    def workers() -> int:
        count: int = producer.stats()["workers"]
        return count

    first = host()
    second: Proc | None = None
    load: Load | None = None
    try:
        assert wait_until(lambda: workers() == 3, 30), first.log()
        load = Load(producer.address, 6)
        first_pids = process_tree(first.pid) - {first.pid}
        assert wait_until(lambda: load.served_by(first_pids) > 0, 10)

        second = host()  # the pool grows, under load
        assert wait_until(lambda: workers() == 5, 30), second.log()
        second_pids = process_tree(second.pid) - {second.pid}
        assert wait_until(lambda: load.served_by(second_pids) > 0, 10)

        stopped = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)  # the pool shrinks, under load
        assert wait_until(lambda: workers() == 3, HEARTBEAT), "its slots stayed: no goodbye?"
        left = time.monotonic() - stopped
        assert first.proc.wait(15) == 0, first.log()
        assert not any(os.path.exists(f"/proc/{pid}") for pid in first_pids)
        served = load.served_by(second_pids)
        assert wait_until(lambda: load.served_by(second_pids) > served + 10, 10)
        load.stop()
        outcomes, load = load.outcomes, None
        assert set(outcomes) == {"ok"}, outcomes
        print(f"\nautoscale: {outcomes['ok']} requests OK; a host's slots left {left:.2f} s")
    finally:
        if load is not None:
            load.stop()
        for proc in (second, first):
            if proc is not None:
                proc.stop()

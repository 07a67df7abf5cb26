"""Worker recycling (max_requests with jitter, max_worker_memory) under load with no request
failed, and liveness: a worker that hangs while idle is noticed and replaced."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import threading
import time
from collections import Counter

import pytest

import gaspar
from gaspar.client import request
from tests import handlers
from tests.conftest import wait_until
from tests.test_signals import Load, alive

_leak: list[bytes] = []


def leaky(message: bytes) -> bytes | str:
    """`grow:MIB` keeps MIB more MiB (touched) and answers its pid; else tests.handlers.behave."""
    verb, _, arg = message.partition(b":")
    if verb == b"grow":
        _leak.append(b"\1" * (int(arg) << 20))
        return str(os.getpid())
    return handlers.behave(message)


def _hold_the_gil() -> None:
    # A C call made through PyDLL keeps the GIL for its whole length: here, 60 s of sleep(3).
    ctypes.PyDLL(None).sleep(60)


def hanging(message: bytes) -> bytes | str:
    """`hang`: answer, then (a moment later, once idle) a thread takes the GIL and keeps it."""
    if message == b"hang":
        threading.Timer(0.3, _hold_the_gil).start()
        return str(os.getpid())
    return handlers.behave(message)


def resident_mib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


@pytest.mark.parametrize("jitter", [0, 3])
def test_max_requests_recycles_workers_with_no_request_failed(serve, jitter: int) -> None:
    producer = serve(handlers.behave, processes=2, max_requests=5, max_requests_jitter=jitter)
    first = set(producer.worker_pids())
    load = Load(producer.address, b"pid", v1=2, v2=1)
    try:
        assert load.wait_for(80, timeout=30)
    finally:
        failures = load.stop()
    assert failures == []
    served = Counter(int(reply) for reply in load.replies)
    assert len(served) >= len(load.replies) // (5 + jitter) - 2
    assert not first & set(producer.worker_pids())
    # Each worker served at most its limit (plus the rest of a batch, if one was under way).
    assert max(served.values()) <= 5 + jitter + (
        gaspar.dispatcher.BATCH_MAX if producer.stats()["batches"] else 0
    )
    stats = producer.stats()
    assert stats["requests"]["worker_lost"] == 0 and stats["requests"]["ok"] == len(load.replies)
    assert wait_until(lambda: producer.stats()["workers"] == 2, timeout=10)


def test_max_worker_memory_replaces_a_growing_worker(serve) -> None:
    # A forked worker starts with about this process's resident memory.
    limit = resident_mib() + 40
    producer = serve(leaky, processes=1, max_worker_memory=limit)
    (first,) = producer.worker_pids()
    pids = [int(request(producer.address, b"grow:8", timeout=10))]
    # Its own resident memory after one request (a fork's differs from this process's).
    with open(f"/proc/{first}/statm") as f:
        after_one = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    pids += [int(request(producer.address, b"grow:8", timeout=10)) for _ in range(19)]
    assert pids[0] == first and len(set(pids)) >= 2
    # The first worker served until it passed the bound, and not long after: each
    # request keeps 8 MiB more, and the one that passes the bound is its last.
    expected = 1 + max(0, -(-(limit - after_one) // 8))
    assert expected - 1 <= pids.count(first) <= expected + 1, (after_one, limit)
    assert producer.stats()["requests"]["worker_lost"] == 0
    assert wait_until(lambda: not alive(first), timeout=10)


def test_an_idle_worker_that_is_stopped_is_replaced(serve) -> None:
    producer = serve(handlers.behave, processes=2, liveness_timeout=1.0)
    victim, other = producer.worker_pids()
    os.kill(victim, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert wait_until(lambda: victim not in producer.worker_pids(), timeout=10)
        assert time.monotonic() - started < 5
        assert wait_until(lambda: len(producer.worker_pids()) == 2, timeout=10)
        assert wait_until(lambda: not alive(victim), timeout=10)
    finally:
        if alive(victim):
            os.kill(victim, signal.SIGKILL)
    assert other in producer.worker_pids()
    assert request(producer.address, b"echo:ok", timeout=10) == b"ok"


def test_an_idle_worker_whose_thread_holds_the_gil_is_replaced(serve) -> None:
    producer = serve(hanging, processes=1, liveness_timeout=1.0)
    victim = int(request(producer.address, b"hang", timeout=10))
    assert wait_until(lambda: victim not in producer.worker_pids(), timeout=10)
    assert wait_until(lambda: len(producer.worker_pids()) == 1, timeout=10)
    assert int(request(producer.address, b"pid", timeout=10)) != victim
    assert producer.stats()["requests"]["worker_lost"] == 0


def test_a_busy_worker_is_not_taken_for_a_hung_one(serve) -> None:
    """Liveness covers idle workers only: a request longer than the timeout completes."""
    producer = serve(handlers.behave, processes=1, liveness_timeout=0.5)
    assert request(producer.address, b"sleep:2", timeout=10) == b"slept:2"
    assert producer.stats()["requests"]["worker_lost"] == 0


def recycle_in_batches(producer: gaspar.Producer) -> None:
    """Bursts of 400 tiny requests until batches form, workers leaving every 3 requests:
    none fails, and many workers answered."""

    async def burst() -> list[bytes]:
        async with gaspar.AsyncClient(producer.address, timeout=30) as client:
            return await asyncio.gather(*(client.request(b"pid") for _ in range(400)))

    replies: list[bytes] = []
    for _ in range(5):
        replies += asyncio.run(burst())
        if producer.stats()["batches"]:
            break
    stats = producer.stats()
    assert stats["batches"] > 0, "no batch was made: the test proves nothing"
    assert stats["requests"]["ok"] == len(replies) and stats["requests"]["worker_lost"] == 0
    assert len(set(replies)) >= 10


def test_max_requests_mid_batch_fails_nothing(serve) -> None:
    """Many tiny requests in flight at once make batches: a worker whose limit falls inside
    one says GOODBYE there, answers the rest of its batch, and only then leaves."""
    producer = serve(handlers.behave, processes=2, max_requests=3)
    recycle_in_batches(producer)

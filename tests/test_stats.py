"""Producer.stats(): plain numbers, checked against what the test made happen."""

from __future__ import annotations

import threading

import pytest

import gaspar
from gaspar.protocol import Status
from tests import handlers
from tests.conftest import wait_until

OUTCOMES = {s.name.lower() for s in Status}


def test_stats_before_start_are_zero_and_complete() -> None:
    stats = gaspar.Producer(handlers.echo, 0, processes=1).stats()
    assert set(stats["requests"]) == OUTCOMES and not any(stats["requests"].values())
    # The keys that stats() has always had (the metrics' keys are checked in test_metrics.py).
    assert {k: stats[k] for k in ("queued", "in_flight", "workers", "batches", "connections")} == {
        "queued": 0,
        "in_flight": 0,
        "workers": 0,
        "batches": 0,
        "connections": 0,
    }


@pytest.mark.timeout(60)
def test_stats_count_each_outcome_over_v2(serve) -> None:
    producer = serve(handlers.behave, processes=1, timeout=1.0, max_queue=1)
    assert producer.stats()["workers"] == 1
    with gaspar.Client(producer.address, timeout=20) as client:
        assert client.request(b"echo:a") == b"a"
        assert producer.stats()["connections"] == 1  # the client's pooled connection
        with pytest.raises(gaspar.HandlerError):
            client.request(b"raise:x")
        with pytest.raises(gaspar.RequestTimeout):
            client.request(b"spin")
        assert wait_until(lambda: producer.stats()["workers"] == 1, timeout=20)
        with pytest.raises(gaspar.WorkerLost):
            client.request(b"exit")
        assert wait_until(lambda: producer.stats()["workers"] == 1, timeout=20)

    # One request running and one queued fill max_queue=1: the next is refused.
    results: list[bytes | BaseException] = []

    def hold() -> None:
        with gaspar.Client(producer.address, timeout=20) as one:
            try:
                results.append(one.request(b"sleep:0.5"))
            except gaspar.RequestFailed as exc:  # recorded for the assertion
                results.append(exc)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    try:
        assert wait_until(lambda: producer.stats()["in_flight"] == 1, timeout=10)
        assert wait_until(lambda: producer.stats()["queued"] == 1, timeout=10)
        with (
            gaspar.Client(producer.address, timeout=20) as client,
            pytest.raises(gaspar.Overloaded),
        ):
            client.request(b"echo:refused")
    finally:
        for t in holders:
            t.join(30)
    assert results == [b"slept:0.5"] * 2
    stats = producer.stats()
    assert stats["requests"] == {
        "ok": 3,
        "handler_error": 1,
        "timeout": 1,
        "worker_lost": 1,
        "overloaded": 1,
        "too_large": 0,
        "bad_request": 0,
        "shutting_down": 0,
        "cancelled": 0,
    }
    assert (stats["queued"], stats["in_flight"], stats["workers"]) == (0, 0, 1)
    assert wait_until(lambda: producer.stats()["connections"] == 0, timeout=10)

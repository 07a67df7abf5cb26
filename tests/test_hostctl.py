"""Process control of `gaspar worker`: HUP reloads, TTIN/TTOU scale, max-requests recycles,
QUIT stops at once, and the host's process title; real hosts under real load over loopback."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import gaspar
from gaspar.proctitle import short_name
from tests.conftest import wait_until
from tests.test_recycle import recycle_in_batches
from tests.test_reload import versions, write_module
from tests.test_remote import (
    alive,
    ask,
    front,
    hosts,
    in_thread,
    keys,
    secure_args,
    workers_are,
)
from tests.test_signals import Load, title_of

__all__ = ["hosts", "keys"]  # fixtures, used by name


def titled(pid: int, title: str) -> bool:
    """`pid` has `title`: its command line with setproctitle, else its short name."""
    cmdline, comm = title_of(pid)
    try:
        import setproctitle  # noqa: F401
    except ImportError:
        return comm == short_name(title).decode()
    return cmdline == title


def module_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hosts started from here import modules from `tmp_path` (never from stale bytecode)."""
    path = [str(tmp_path), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")


@pytest.mark.timeout(90)
def test_hup_replaces_every_remote_worker_with_new_code_and_no_failure(
    serve, hosts, keys, tmp_path, monkeypatch
) -> None:
    module_path(monkeypatch, tmp_path)
    write_module(tmp_path, "one")
    producer = front(serve, keys)
    host = hosts(producer.worker_endpoint, *secure_args(keys), target="reloaded_app:handle")
    assert workers_are(producer, 2)
    old = host.workers()
    load = Load(producer.address, b"x", v1=1, v2=1)
    try:
        assert load.wait_for(20)
        assert {v for v, _ in versions(load.replies)} == {"one"}
        write_module(tmp_path, "two")
        os.killpg(host.pid, signal.SIGHUP)  # the whole group: supervisor and workers too
        assert wait_until(lambda: not (host.workers() & old) and len(host.workers()) == 2, 30)
        assert workers_are(producer, 2)
        replaced_at = len(load.replies)
        assert load.wait_for(20)
    finally:
        failures = load.stop()
    assert failures == []
    seen = versions(load.replies)
    new = {pid for version, pid in seen if version == "two"}
    assert new == host.workers() and not new & old
    assert {v for v, _ in seen[replaced_at + 2 :]} == {"two"}
    assert not any(alive(pid) for pid in old)
    assert producer.stats()["requests"]["worker_lost"] == 0
    assert "reload: replacing 2 workers" in host.text()


@pytest.mark.timeout(60)
def test_hup_with_a_broken_module_leaves_the_old_remote_workers_serving(
    serve, hosts, keys, tmp_path, monkeypatch
) -> None:
    module_path(monkeypatch, tmp_path)
    write_module(tmp_path, "one")
    producer = front(serve, keys)
    host = hosts(producer.worker_endpoint, *secure_args(keys), target="reloaded_app:handle")
    assert workers_are(producer, 2)
    old = host.workers()
    write_module(tmp_path, "broken")
    os.kill(host.pid, signal.SIGHUP)
    why = "reload: cannot import reloaded_app:handle: SyntaxError"
    assert wait_until(lambda: why in host.text(), timeout=20), host.text()
    load = Load(producer.address, b"x", v1=1, v2=1)
    try:
        assert load.wait_for(10)
    finally:
        failures = load.stop()
    assert failures == [] and {v for v, _ in versions(load.replies)} == {"one"}
    assert host.workers() == old and producer.stats()["workers"] == 2


@pytest.mark.timeout(60)
def test_ttin_and_ttou_change_the_producers_worker_count(serve, hosts, keys) -> None:
    producer = front(serve, keys)
    host = hosts(producer.worker_endpoint, *secure_args(keys))
    assert workers_are(producer, 2)
    load = Load(producer.address, b"pid", v1=1, v2=1)
    try:
        os.kill(host.pid, signal.SIGTTIN)
        assert workers_are(producer, 3)
        assert load.wait_for(10)
        for n in (2, 1, 1):  # one at a time (signals of a kind do not queue); never below one
            os.kill(host.pid, signal.SIGTTOU)
            assert workers_are(producer, n)
            assert wait_until(lambda: len(host.workers()) == n, timeout=20)  # noqa: B023
            assert load.wait_for(10)
    finally:
        failures = load.stop()
    assert failures == []
    assert producer.stats()["requests"]["worker_lost"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flags", "most"),
    [
        (("--max-requests", "3", "--max-requests-jitter", "1"), 4),
        (("--max-worker-memory", "1"), 1),  # every worker is past 1 MiB: one request each
    ],
    ids=["max-requests", "max-worker-memory"],
)
def test_recycling_replaces_remote_workers_without_a_failure(
    serve, hosts, keys, flags: tuple[str, ...], most: int
) -> None:
    producer = front(serve, keys)
    host = hosts(producer.worker_endpoint, *secure_args(keys), *flags)
    assert workers_are(producer, 2)
    first = host.workers()
    load = Load(producer.address, b"pid", v1=1, v2=1)
    try:
        assert load.wait_for(30, timeout=40)
    finally:
        failures = load.stop()
    assert failures == []
    served = [int(reply) for reply in load.replies]
    # No worker answered more than its limit, and new ones took over.
    assert max(served.count(pid) for pid in set(served)) <= most
    assert len(set(served)) >= len(served) // most and not first & host.workers()
    assert producer.stats()["requests"]["worker_lost"] == 0
    assert workers_are(producer, 2)


@pytest.mark.timeout(60)
def test_quit_stops_the_host_at_once_and_its_title_names_the_endpoint(serve, hosts, keys) -> None:
    producer = front(serve, keys)
    endpoint = producer.worker_endpoint
    # A long grace: only QUIT's "at once" can make the stop prompt.
    host = hosts(endpoint, *secure_args(keys), "--grace", "60")
    assert workers_are(producer, 2)
    title = f"gaspar: worker host {endpoint}"
    assert wait_until(lambda: titled(host.pid, title), timeout=10), title_of(host.pid)
    processes = host.processes()
    assert len(processes) == 4  # the host, its supervisor, two workers
    job, outcome = in_thread(ask, producer, b"sleep:30")
    assert wait_until(lambda: producer.stats()["in_flight"] == 1, timeout=10)
    started = time.monotonic()
    os.kill(host.pid, signal.SIGQUIT)
    assert host.proc.wait(20) == 0
    # At once: neither the grace nor the supervisor's wait for workers to leave (5 s).
    assert time.monotonic() - started < 4
    assert wait_until(lambda: not any(alive(p) for p in processes), 10)
    job.join(20)
    assert len(outcome) == 1 and isinstance(outcome[0], gaspar.WorkerLost), outcome
    assert workers_are(producer, 0)


@pytest.mark.timeout(60)
def test_max_requests_inside_a_batch_fails_nothing_on_a_host(serve, hosts, keys) -> None:
    """A remote worker whose limit falls inside a batch says GOODBYE there; its host relays
    that before the rest of the batch's replies, and ends its link only after them."""
    producer = front(serve, keys)
    hosts(producer.worker_endpoint, *secure_args(keys), "--max-requests", "3")
    assert workers_are(producer, 2)
    recycle_in_batches(producer)
    assert workers_are(producer, 2)


@pytest.mark.timeout(60)
def test_an_idle_remote_worker_that_is_stopped_is_replaced(serve, hosts, keys) -> None:
    producer = front(serve, keys)
    host = hosts(producer.worker_endpoint, *secure_args(keys), "--liveness-timeout", "1")
    assert workers_are(producer, 2)
    victim, other = sorted(host.workers())
    os.kill(victim, signal.SIGSTOP)
    try:
        assert wait_until(lambda: victim not in producer.worker_pids(), timeout=10)
        assert wait_until(lambda: not alive(victim), timeout=10)
        assert wait_until(lambda: len(host.workers()) == 2, timeout=10)
        assert workers_are(producer, 2)
    finally:
        if alive(victim):
            os.kill(victim, signal.SIGKILL)
    assert other in producer.worker_pids()
    assert "said nothing for 1s while idle" in host.text()
    # A busy worker is not taken for a hung one: a request longer than the timeout completes.
    assert ask(producer, b"sleep:2") == b"slept:2"
    assert producer.stats()["requests"]["worker_lost"] == 0

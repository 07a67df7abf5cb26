"""Reload (SIGHUP, Producer.reload) and scaling (SIGTTIN/SIGTTOU, Producer.scale) under load:
every worker replaced, new code served, zero failed requests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import gaspar
from gaspar.client import request
from tests import handlers
from tests.conftest import wait_until
from tests.test_signals import ROOT, Load, alive, serving

served = pytest.fixture(serving, name="served")

MODULE = """
import os

def handle(message):
    return "{version} %d" % os.getpid()
"""


def write_module(directory: os.PathLike[str], version: str) -> None:
    path = os.path.join(directory, "reloaded_app.py")
    with open(path, "w") as f:
        f.write(MODULE.replace("{version}", version) if version != "broken" else "def (:\n")


def serve_env(tmp_path: os.PathLike[str]) -> dict[str, str]:
    path = [str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")]
    # No bytecode cache: a module rewritten within a second must be read again.
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONDONTWRITEBYTECODE="1")


def versions(replies: list[bytes]) -> list[tuple[str, int]]:
    out = []
    for reply in replies:
        version, pid = reply.split()
        out.append((version.decode(), int(pid)))
    return out


def test_hup_replaces_every_worker_and_serves_the_new_code(served, tmp_path) -> None:
    write_module(tmp_path, "one")
    srv = served("reloaded_app:handle", "--workers", "2", env=serve_env(tmp_path))
    old = srv.workers()
    load = Load(srv.address, b"x", v1=1, v2=1)
    try:
        assert load.wait_for(20)
        write_module(tmp_path, "two")
        srv.signal_group(signal.SIGHUP)  # the whole group: supervisor and workers too
        assert wait_until(lambda: versions(load.replies[-4:])[0][0] == "two", timeout=30)
        assert wait_until(lambda: not (srv.workers() & old) and len(srv.workers()) == 2, 30)
        replaced_at = len(load.replies)
        assert load.wait_for(20)
    finally:
        failures = load.stop()
    assert failures == []
    seen = versions(load.replies)
    new = {pid for version, pid in seen if version == "two"}
    assert not new & old and len(new) == 2
    # Old and new serve side by side during the reload; once the old workers are gone, only
    # the new code answers (but for the replies of the two clients' last old requests).
    assert {v for v, _ in seen[replaced_at + 2 :]} == {"two"}
    assert not any(alive(pid) for pid in old)
    srv.wait_for_line(re.compile(rb"reload: replacing 2 workers"))


def test_a_module_that_fails_to_import_leaves_the_old_workers_serving(served, tmp_path) -> None:
    write_module(tmp_path, "one")
    srv = served("reloaded_app:handle", "--workers", "2", env=serve_env(tmp_path))
    old = srv.workers()
    write_module(tmp_path, "broken")
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_for_line(re.compile(rb"reload: cannot import reloaded_app:handle: SyntaxError"))
    assert srv.workers() == old
    assert versions([request(srv.address, b"x", timeout=10)])[0][0] == "one"
    # Fixed again, a reload goes through.
    write_module(tmp_path, "three")
    srv.proc.send_signal(signal.SIGHUP)
    assert wait_until(
        lambda: versions([request(srv.address, b"x", timeout=10)])[0][0] == "three", 30
    )


def test_producer_reload_keeps_the_code_and_replaces_the_processes(serve) -> None:
    producer = serve(handlers.behave, processes=2)
    old = set(producer.worker_pids())
    load = Load(producer.address, b"pid", v1=1, v2=1)
    try:
        assert load.wait_for(20)
        producer.reload()
        assert wait_until(lambda: not set(producer.worker_pids()) & old, timeout=30)
        assert wait_until(lambda: len(producer.worker_pids()) == 2, timeout=30)
        assert load.wait_for(20)
    finally:
        failures = load.stop()
    assert failures == []
    assert producer.stats()["requests"]["worker_lost"] == 0
    assert {int(r) for r in load.replies[-4:]} <= set(producer.worker_pids())


def test_producer_scale(serve) -> None:
    producer = serve(handlers.behave, processes=1)
    producer.scale(3)
    assert wait_until(lambda: producer.stats()["workers"] == 3, timeout=20)
    load = Load(producer.address, b"pid", v1=1, v2=1)
    try:
        assert load.wait_for(10)
        producer.scale(1)
        assert wait_until(lambda: producer.stats()["workers"] == 1, timeout=20)
        assert load.wait_for(10)
    finally:
        failures = load.stop()
    assert failures == []
    with pytest.raises(ValueError, match="at least 1"):
        producer.scale(0)


# A producer started blocking in its main thread (so it acts on signals); it prints its
# stats as a JSON line for each line read on standard input.
BLOCKING = """
import json, logging, sys, threading
import gaspar
logging.basicConfig(level=logging.INFO)  # to standard error: the test reads the signal lines
from tests import handlers

producer = gaspar.Producer(handlers.behave, 0, processes=2)

def answer():
    for _ in sys.stdin:
        print(json.dumps(producer.stats()), flush=True)

threading.Thread(target=answer, daemon=True).start()
producer.start()
print("stopped", flush=True)
"""


def test_ttin_and_ttou_on_a_blocking_start(tmp_path) -> None:
    log = tmp_path / "producer.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", BLOCKING],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=ROOT,
            text=True,
            start_new_session=True,
        )
    assert proc.stdin is not None and proc.stdout is not None

    def workers() -> int:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("stats\n")
        proc.stdin.flush()
        return int(json.loads(proc.stdout.readline())["workers"])

    try:
        assert wait_until(lambda: workers() == 2, timeout=20)
        proc.send_signal(signal.SIGTTIN)
        assert wait_until(lambda: workers() == 3, timeout=20)
        for n in (2, 1, 1):  # one at a time (signals of a kind do not queue); never below one
            proc.send_signal(signal.SIGTTOU)
            assert wait_until(lambda: workers() == n, timeout=20)  # noqa: B023
        # The last one changes nothing to see: wait for its log line, so that it is not
        # still pending with the TTIN below (the lower-numbered TTIN would be taken first).
        assert wait_until(lambda: log.read_text().count("SIGTTOU: 1 workers") == 2, timeout=20)
        proc.send_signal(signal.SIGTTIN)
        assert wait_until(lambda: workers() == 2, timeout=20)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.stdout.readline().strip() == "stopped"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class SlowSetup(gaspar.Consumer):
    """A worker that takes a while to get ready: a reload must not leave a gap meanwhile."""

    def setup(self) -> None:
        time.sleep(0.5)  # setup: simulated loading of a model

    def handle(self, message: bytes) -> bytes:
        return str(os.getpid()).encode()


def test_the_new_worker_is_ready_before_the_old_one_leaves(serve) -> None:
    producer = serve(SlowSetup, processes=1)
    (old,) = producer.worker_pids()
    producer.reload()
    seen = []  # the ready workers, sampled until the new one alone is there
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen.append(producer.stats()["workers"])
        pids = producer.worker_pids()
        if pids and old not in pids:
            break
        time.sleep(0.01)  # sampling interval, bounded by the deadline
    assert old not in producer.worker_pids() and min(seen) >= 1
    assert wait_until(lambda: len(producer.worker_pids()) == 1, timeout=10)
    assert int(request(producer.address, b"x", timeout=10)) != old

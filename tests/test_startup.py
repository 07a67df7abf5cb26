"""Start-up: each failure says what failed, first and only that; stop() and gc.freeze() hold."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

import gaspar
from gaspar.client import request
from tests import handlers
from tests.conftest import alive, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISLEADING = ("supervisor process died", "next attempt", "Traceback", "unexpectedly")


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `gaspar serve` to its end (start-up fails), bounded."""
    return subprocess.run(
        [sys.executable, "-m", "gaspar", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )


def producer_lines(stderr: str) -> list[str]:
    """The log lines of the producer's own process (not its workers')."""
    return [line for line in stderr.splitlines() if "gaspar.worker" not in line]


def test_port_in_use_logs_only_its_cause() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("tests.handlers:echo", "--workers", "1", "--port", str(port))
    assert result.returncode == 1
    errors = [
        line for line in result.stderr.splitlines() if " ERROR " in line or "CRITICAL" in line
    ]
    assert len(errors) == 1, result.stderr
    assert f"could not start: cannot listen on 127.0.0.1:{port}: " in errors[0]
    assert not any(word in result.stderr for word in MISLEADING), result.stderr


def test_setup_failure_names_its_exception_and_announces_no_next_attempt() -> None:
    result = run_serve("tests.handlers:BrokenSetup", "--workers", "2", "--port", "0")
    assert result.returncode == 1
    lines = producer_lines(result.stderr)
    errors = [line for line in lines if " ERROR " in line or "CRITICAL" in line]
    assert len(errors) == 1, result.stderr
    assert "could not start: worker " in errors[0]
    assert "setup() failed: RuntimeError: cannot load the model" in errors[0]
    assert not any(word in line for line in lines for word in MISLEADING), result.stderr
    # The worker's own line, with the traceback, is there too, and says the same.
    assert "RuntimeError: cannot load the model" in result.stderr.split("gaspar.worker", 1)[1]


def test_setup_failure_is_carried_by_startup_error() -> None:
    producer = gaspar.Producer(handlers.BrokenSetup, 0, processes=1)
    with pytest.raises(gaspar.StartupError) as info:
        producer.start(blocking=False)
    assert str(info.value).endswith("setup() failed: RuntimeError: cannot load the model")
    assert "see the log" not in str(info.value)


class CrashesInSetup(gaspar.Consumer):
    """setup() does not raise: the process dies (as a segfault or the OOM killer would)."""

    def setup(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_dying_in_setup_ends_start_with_its_cause() -> None:
    """It used to be replaced at once, for ever, and start() never returned."""
    producer = gaspar.Producer(CrashesInSetup, 0, processes=2)
    with pytest.raises(
        gaspar.StartupError, match=r"^worker \d+ was killed by SIGKILL during start"
    ):
        producer.start(blocking=False)
    assert producer.state == "stopped" and not alive(producer.supervisor_pid)


def test_a_deep_tmpdir_no_longer_matters(tmp_path, monkeypatch) -> None:
    """Bug (d) was an ipc path past 107 characters; local workers' links have no path."""
    deep = tmp_path / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    with gaspar.Producer(handlers.echo, 0, processes=1) as producer:
        assert request(producer.address, b"deep", timeout=10) == b"deep"
    assert not list(deep.iterdir())


def test_ipv6_addresses_are_logged_in_brackets() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 not configured here")
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve(
            "tests.handlers:echo", "--workers", "1", "--host", "::1", "--port", str(port)
        )
    assert result.returncode == 1
    assert f"cannot listen on [::1]:{port}: " in result.stderr


def test_listening_line_brackets_ipv6(caplog) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 not configured here")
    caplog.set_level(logging.INFO, logger="gaspar.producer")
    with gaspar.Producer(handlers.echo, 0, processes=1, host="::1") as producer:
        where = f"[::1]:{producer.address[1]}"
        assert request(where, b"six", timeout=10) == b"six"
        assert where in repr(producer)
    assert any(f"listening on {where} " in r.getMessage() for r in caplog.records)


def test_stop_while_starting_stops_the_producer() -> None:
    """stop() during start(blocking=False), before the event loop exists, is not lost."""
    producer = gaspar.Producer(handlers.echo, 0, processes=1)
    me, armed, entered = os.getpid(), [True], threading.Event()

    def hold_the_start() -> None:
        # Runs in the starting thread just before it forks the supervisor: the
        # loop does not exist yet.  It waits (bounded) for stop() to be seen.
        if os.getpid() == me and armed[0] and threading.current_thread().name == "starter":
            armed[0] = False
            entered.set()
            wait_until(lambda: producer.state != "starting", timeout=5)

    os.register_at_fork(before=hold_the_start)
    outcome: list[BaseException | None] = []

    def start() -> None:
        try:
            producer.start(blocking=False)
            outcome.append(None)
        except BaseException as exc:  # recorded for the assertions
            outcome.append(exc)

    starter = threading.Thread(target=start, name="starter")
    starter.start()
    try:
        assert entered.wait(20)
        producer.stop(grace=1)
        starter.join(30)
        assert producer.state == "stopped"
        assert isinstance(outcome[0], gaspar.StartupError)
        assert producer.supervisor_pid is None or not alive(producer.supervisor_pid)
    finally:
        armed[0] = False
        starter.join(30)
        producer.stop()


def test_start_keeps_a_gc_freeze_made_before_it() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with gaspar.Producer(handlers.echo, 0, processes=1):
            assert gc.get_freeze_count() >= frozen
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()


class FailsWhileMarked(gaspar.Consumer):
    """setup() raises while the file `marker` exists; handles like tests.handlers.behave."""

    def __init__(self, marker: str) -> None:
        super().__init__(handlers.behave)
        self.marker = marker

    def setup(self) -> None:
        if os.path.exists(self.marker):
            raise RuntimeError("marked broken")


def test_setup_failing_after_start_backs_off_and_the_pool_keeps_serving(
    serve, tmp_path, caplog
) -> None:
    caplog.set_level(logging.ERROR, logger="gaspar.producer")
    marker = tmp_path / "broken"
    producer = serve(FailsWhileMarked(str(marker)), processes=2)
    marker.touch()
    with pytest.raises(gaspar.RequestFailed):
        request(producer.address, b"kill", timeout=10)  # its replacement's setup() fails

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if "setup() failed" in r.getMessage()]

    assert wait_until(lambda: len(failures()) >= 2, timeout=20)
    first, second = failures()[:2]
    assert "RuntimeError: marked broken; next attempt in 0.5s" in first
    assert "RuntimeError: marked broken; next attempt in 1s" in second  # it came, backed off
    (survivor,) = producer.worker_pids()
    for _ in range(5):  # the other worker serves meanwhile
        assert request(producer.address, b"pid", timeout=10) == str(survivor).encode()
    marker.unlink()
    assert wait_until(lambda: producer.stats()["workers"] == 2, timeout=20)
    assert request(producer.address, b"echo:back", timeout=10) == b"back"

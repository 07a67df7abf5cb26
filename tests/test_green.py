"""The blocking client is green: under gevent or eventlet its calls overlap.

Each case runs tests/green_client.py in a subprocess that monkey-patches
before importing gaspar (the pytest process itself is never patched), against
a real producer whose `sleep:X` requests take a known time.  With N workers
and N greenlets the calls overlap, so the wall time is near one call, not the
sum the sequential control pays; a greenlet ticking every 10 ms meanwhile
shows the event loop never stalls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import gaspar
import gaspar.client
from tests import handlers

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "green_client.py"

N = 8  # greenlets, and as many workers: each worker runs one request at a time
SECONDS = 0.5  # what each request takes in the handler
MAX_TICK_GAP = 0.1  # a 10 ms ticker never waits longer unless the loop is blocked
SUBPROCESS_TIMEOUT = 30

LIBRARIES = ["gevent", "eventlet"]


def run_green(library: str, address: tuple[str, int], mode: str) -> dict[str, Any]:
    """Run the green client script; skip if `library` cannot be imported."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    host, port = address
    host = f"[{host}]" if ":" in host else host
    result = subprocess.run(
        [sys.executable, str(SCRIPT), library, f"{host}:{port}", str(N), str(SECONDS), mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    if result.returncode == 4:
        pytest.skip(result.stderr.strip() or f"{library} cannot be imported")
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"
    lines = result.stdout.strip().splitlines()
    assert lines, f"no output\n{result.stderr}"
    report: dict[str, Any] = json.loads(lines[-1])
    print(json.dumps(report))  # the measurements, shown with -rP or on failure
    return report


def check_run(report: dict[str, Any], library: str) -> None:
    """Every reply correct, no errors, socket patched, the loop never stalled."""
    assert report["library"] == library
    assert report["errors"] == []
    assert report["replies"] == [f"slept:{SECONDS}"] * N
    assert report["patched"]["socket"] is True
    seen = report["patched"]["client_sees"]
    assert {"socket.socket", "socket.create_connection"} <= seen.keys()
    assert all(module.startswith(f"{library}.") for module in seen.values()), seen
    assert report["ticks"] > 0
    assert report["max_tick_gap"] < MAX_TICK_GAP, report


@pytest.fixture
def producer(serve: Callable[..., gaspar.Producer]) -> gaspar.Producer:
    return serve(handlers.behave, processes=N)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("library", LIBRARIES)
def test_concurrent_calls_overlap(library: str, producer: gaspar.Producer) -> None:
    report = run_green(library, producer.address, "concurrent")
    check_run(report, library)
    assert SECONDS <= report["wall"] < SECONDS * N / 2, report


@pytest.mark.timeout(60)
@pytest.mark.parametrize("library", LIBRARIES)
def test_sequential_calls_cost_the_sum(library: str, producer: gaspar.Producer) -> None:
    report = run_green(library, producer.address, "sequential")
    check_run(report, library)
    assert report["wall"] >= SECONDS * N * 0.9, report


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    not hasattr(gaspar.client, "Client"),
    reason="gaspar.client has no Client class yet; the shared-client mode has nothing to test",
)
@pytest.mark.parametrize("library", LIBRARIES)
def test_shared_client_calls_overlap(library: str, producer: gaspar.Producer) -> None:
    report = run_green(library, producer.address, "client")
    check_run(report, library)
    assert SECONDS <= report["wall"] < SECONDS * N / 2, report

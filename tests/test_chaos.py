"""Chaos: a mix of good, failing, dying and stalling requests at once.

Every request must end with its own reply or a failure, never another's reply,
and the producer must end where it began: all workers back, nothing queued.
CI runs a few seconds of it; `GASPAR_CHAOS_SECONDS=60 pytest -m slow` runs longer.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time

import pytest

import gaspar
from gaspar.client import request
from gaspar.protocol import pack
from tests import handlers
from tests.conftest import wait_until

KINDS = ["echo"] * 12 + ["raise", "exit", "kill", "spin", "sleep", "abandon", "trickle"]


def one(address: tuple[str, int], rng: random.Random, serial: int) -> str:
    """Send one request of a random kind; return how it ended."""
    kind = rng.choice(KINDS)
    tag = b"%d-%d" % (serial, rng.getrandbits(32))
    if kind == "echo":
        try:
            reply = request(address, b"echo:" + tag, timeout=30)
        except gaspar.RequestFailed:
            return "echo-failed"  # possible only when overloaded
        assert reply == tag, (reply, tag)
        return "ok"
    if kind == "abandon":  # reset before the reply
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(pack(b"sleep:0.05"))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return "abandoned"
    if kind == "trickle":  # stalls mid-request, dropped by the read timeout
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(struct.pack("!I", 50) + b"short")
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(10) == b""
        return "dropped"
    message = {"sleep": b"sleep:0.05", "spin": b"spin"}.get(kind, kind.encode() + b":x")
    try:
        reply = request(address, message, timeout=30)
    except gaspar.RequestFailed:
        return "failed"
    assert kind == "sleep" and reply == b"slept:0.05", (kind, reply)
    return "ok"


@pytest.mark.timeout(120)
def test_chaos(serve) -> None:
    seconds = float(os.environ.get("GASPAR_CHAOS_SECONDS", "4"))
    producer = serve(handlers.behave, processes=2, timeout=0.3, read_timeout=0.3)
    deadline = time.monotonic() + seconds
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        serial = 0
        while time.monotonic() < deadline:
            serial += 1
            try:
                outcome = one(producer.address, rng, seed * 1_000_000 + serial)
            except BaseException as exc:  # collected and re-raised in the test thread
                errors.append(exc)
                return
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    assert not errors, errors[0]
    assert outcomes.get("ok", 0) > 0 and outcomes.get("failed", 0) > 0
    assert wait_until(lambda: producer.stats()["queued"] + producer.stats()["in_flight"] == 0)
    assert wait_until(lambda: len(producer.worker_pids()) == 2, timeout=20)
    assert request(producer.address, b"echo:after", timeout=10) == b"after"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_long(serve, monkeypatch) -> None:
    monkeypatch.setenv("GASPAR_CHAOS_SECONDS", os.environ.get("GASPAR_CHAOS_SECONDS", "60"))
    test_chaos(serve)

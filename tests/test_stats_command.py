"""`gaspar stats` and the v2 stats request it sends (docs/protocol.md, "Stats request")."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import gaspar
from gaspar.client import stats
from gaspar.protocol import (
    MAGIC_V2,
    MAGIC_V2_CONTROL,
    ProtocolError,
    ReplyReaderV2,
    SessionV2,
    StatsRequest,
    Status,
    pack_request_v2,
    pack_stats_v2,
)
from gaspar.server import STATS_MAX_AGE
from tests import handlers
from tests.conftest import raw_request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gaspar_stats(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gaspar", "stats", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_gaspar_stats_against_a_live_server(serve) -> None:
    producer = serve(handlers.behave, processes=2)
    for n in range(3):
        assert raw_request(producer.address, b"echo:%d" % n) == b"%d" % n
    with pytest.raises(gaspar.HandlerError), gaspar.Client(producer.address, timeout=20) as c:
        c.request(b"raise:x")
    address = f"127.0.0.1:{producer.address[1]}"
    out = gaspar_stats(address, "--json")
    assert out.returncode == 0, out.stderr
    numbers = json.loads(out.stdout)
    assert numbers["requests"]["ok"] == 3 and numbers["requests"]["handler_error"] == 1
    assert numbers["requests_by_protocol"]["v1"]["ok"] == 3
    assert numbers["workers"] == 2 and numbers["worker_starts"] == 2
    assert numbers["latency"]["count"] == 4
    assert set(numbers) >= set(producer.stats())
    table = gaspar_stats(address)
    assert table.returncode == 0, table.stderr
    lines = {line.split()[0]: line for line in table.stdout.splitlines()}
    assert lines["requests"].split(None, 1)[1] == "ok 3, handler_error 1"
    assert lines["workers"].split() == ["workers", "2"]
    assert "4 observed" in lines["latency"] and "p99" in lines["latency"]
    # A stats request is not a request: it counted nowhere.
    assert producer.stats()["requests"]["ok"] == 3


def test_gaspar_stats_against_nothing_exits_1() -> None:
    out = gaspar_stats("127.0.0.1:1", "--timeout", "5")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("gaspar stats: ") and "cannot connect" in out.stderr


def test_the_stats_request_is_sent_only_after_the_control_preamble_is_answered() -> None:
    """A server that never answers the preamble (gaspar 1.0) sees nothing but it."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen = bytearray()

    def old_server() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(20)
            while chunk := conn.recv(100):
                seen.extend(chunk)

    thread = threading.Thread(target=old_server)
    thread.start()
    try:
        with pytest.raises(gaspar.RequestTimeout):
            stats(listener.getsockname(), timeout=1.0)
    finally:
        thread.join(30)
        listener.close()
    assert bytes(seen) == MAGIC_V2_CONTROL


def test_a_plain_v2_client_sees_those_bytes_as_before(serve) -> None:
    """On a connection opened with FF 47 53 02 the stats word is a length: TOO_LARGE."""
    producer = serve(handlers.echo, processes=1)
    reader = ReplyReaderV2()
    with socket.create_connection(producer.address, timeout=20) as sock:
        sock.sendall(MAGIC_V2 + pack_request_v2(1, b"before") + pack_stats_v2(2))
        got: list = []
        while len(got) < 2:
            chunk = sock.recv(65536)
            assert chunk
            got.extend(reader.feed(chunk))
    by_id = {reply.id: reply for reply in got}  # in completion order: the refusal first
    assert by_id[1] == (1, Status.OK, b"before")
    assert by_id[2].status == Status.TOO_LARGE


def test_stats_and_requests_share_a_control_connection(serve) -> None:
    producer = serve(handlers.echo, processes=1)
    reader = ReplyReaderV2(preamble=MAGIC_V2_CONTROL)
    with socket.create_connection(producer.address, timeout=20) as sock:
        sock.sendall(MAGIC_V2_CONTROL + pack_request_v2(1, b"a") + pack_stats_v2(2))
        got: dict = {}
        while len(got) < 2:
            chunk = sock.recv(65536)
            assert chunk
            got.update((r.id, r) for r in reader.feed(chunk))
        assert got[1].body == b"a"
        assert got[2].status == Status.OK and json.loads(got[2].body)["workers"] == 1
        sock.sendall(pack_request_v2(2, b"id 2 is free again"))
        reply = []
        while not reply:
            reply = reader.feed(sock.recv(65536))
        assert reply[0].body == b"id 2 is free again"


def test_session_stats_request_rules() -> None:
    session = SessionV2()
    events = session.receive_data(MAGIC_V2_CONTROL + pack_request_v2(1, b"x") + pack_stats_v2(2))
    assert events[1] == StatsRequest(2) and set(session.in_flight) == {1}
    with pytest.raises(ProtocolError, match="reused"):
        session.receive_data(pack_stats_v2(1))  # an id in flight, as for a request
    stopped = SessionV2()
    stopped.receive_data(MAGIC_V2_CONTROL)
    stopped.stop()
    (refused,) = stopped.receive_data(pack_stats_v2(3))
    assert refused.status == Status.SHUTTING_DOWN
    plain = SessionV2()
    (too_large,) = plain.receive_data(MAGIC_V2 + struct.pack("!II", 4, 0x83000000))
    assert too_large.status == Status.TOO_LARGE


def test_a_flood_of_stats_requests_is_answered_from_a_copy(serve) -> None:
    """Two thousand stats requests in one write: each answered; the numbers counted seldom."""
    producer = serve(handlers.echo, processes=1)
    server = producer._server
    counted = []
    real = server.stats

    def counting() -> dict:
        counted.append(1)
        return real()

    server.stats = counting
    n = 2000
    reader = ReplyReaderV2(preamble=MAGIC_V2_CONTROL)
    started = time.monotonic()
    with socket.create_connection(producer.address, timeout=20) as sock:
        sock.sendall(MAGIC_V2_CONTROL)
        assert reader.feed(sock.recv(4)) == []
        sock.sendall(b"".join(pack_stats_v2(i) for i in range(n)) + pack_request_v2(n, b"last"))
        got: dict = {}
        while len(got) < n + 1:
            chunk = sock.recv(1 << 20)
            assert chunk
            got.update((r.id, r) for r in reader.feed(chunk))
    elapsed = time.monotonic() - started
    assert got[n].body == b"last"
    assert all(got[i].status == Status.OK and got[i].body.startswith(b"{") for i in range(n))
    assert len(counted) <= 2 + elapsed / STATS_MAX_AGE, (len(counted), elapsed)

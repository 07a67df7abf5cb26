"""Metrics: /metrics over real HTTP after real requests, and the numbers stats() shares."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import gaspar
from gaspar import metrics
from gaspar.protocol import MAGIC_V2, ReplyReaderV2, Status, pack, pack_request_v2
from tests import handlers
from tests.conftest import raw_request, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTCOMES = [s.name.lower() for s in Status]


def scrape(producer: gaspar.Producer, path: str = "/metrics") -> str:
    assert producer.metrics_address is not None
    host, port = producer.metrics_address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text: str = response.read().decode()
        return text


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the scrape, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str):
    return found[(name, tuple(sorted(labels.items())))]


def v2_exchange(address: tuple[str, int], *frames: bytes, replies: int) -> list:
    """Send `frames` pipelined on one plain v2 connection; the first `replies` replies."""
    reader = ReplyReaderV2()
    got: list = []
    with socket.create_connection(address, timeout=20) as sock:
        sock.sendall(MAGIC_V2 + b"".join(frames))
        while len(got) < replies:
            chunk = sock.recv(65536)
            assert chunk, got
            got.extend(reader.feed(chunk))
    return got


@pytest.mark.timeout(60)
def test_scrape_counts_every_outcome_and_survives_a_worker_restart(serve) -> None:
    producer = serve(handlers.behave, processes=1, timeout=1.0, max_queue=1, metrics_port=0)
    assert producer.metrics_address is not None and producer.metrics_address[0] == "127.0.0.1"
    assert raw_request(producer.address, b"echo:one") == b"one"  # v1 ok
    with gaspar.Client(producer.address, timeout=20) as client:
        assert client.request(b"echo:two") == b"two"  # v2 ok
        with pytest.raises(gaspar.HandlerError):
            client.request(b"raise:x")
    # One running, one queued, the third refused: the queue holds one.
    replies = v2_exchange(
        producer.address,
        pack_request_v2(1, b"sleep:0.5"),
        pack_request_v2(2, b"echo:q"),
        pack_request_v2(3, b"echo:r"),
        replies=3,
    )
    assert sorted((r.id, r.status) for r in replies) == [
        (1, Status.OK),
        (2, Status.OK),
        (3, Status.OVERLOADED),
    ]
    before = samples(scrape(producer))
    assert value(before, "gaspar_worker_starts_total") == 1
    with (
        gaspar.Client(producer.address, timeout=20) as client,
        pytest.raises(gaspar.RequestTimeout),
    ):
        client.request(b"spin")  # past the timeout: its worker is killed and replaced
    assert wait_until(
        lambda: producer.stats()["worker_starts"] == 2 and producer.stats()["workers"] == 1, 20
    )
    assert wait_until(lambda: producer.stats()["worker_exits"]["timeout"] == 1, 20)
    after = samples(scrape(producer))

    def requests(found, protocol: str, outcome: str) -> float:
        return value(found, "gaspar_requests_total", protocol=protocol, outcome=outcome)

    expected = {("v1", "ok"): 1, ("v2", "ok"): 3, ("v2", "handler_error"): 1}
    expected[("v2", "overloaded")] = 1
    for protocol in ("v1", "v2"):
        for outcome in OUTCOMES:
            want = expected.get((protocol, outcome), 0)
            assert requests(before, protocol, outcome) == want, (protocol, outcome)
            if outcome != "timeout":  # counted in the producer: the restart kept them
                assert requests(after, protocol, outcome) == want, (protocol, outcome)
    assert requests(after, "v2", "timeout") == 1
    assert value(after, "gaspar_worker_starts_total") == 2
    exits = {c: value(after, "gaspar_worker_exits_total", cause=c) for c in metrics.EXIT_CAUSES}
    assert exits == {"normal": 0, "signal": 0, "crash": 0, "setup_failure": 0, "timeout": 1}
    # Five requests reached a worker before the restart (one more after); the refusal never did.
    assert value(before, "gaspar_request_duration_seconds_count") == 5
    assert value(before, "gaspar_handler_duration_seconds_count") == 5
    assert value(before, "gaspar_queue_wait_seconds_count") == 5
    assert value(after, "gaspar_request_duration_seconds_count") == 6
    assert value(after, "gaspar_handler_duration_seconds_count") == 5  # the killed one: none
    # The sleep ran half a second, and echo:q waited for it in the queue.
    assert value(before, "gaspar_handler_duration_seconds_sum") >= 0.5
    assert value(before, "gaspar_queue_wait_seconds_sum") >= 0.4
    le = (("le", "0.25"),)
    assert before[("gaspar_handler_duration_seconds_bucket", le)] == 4
    assert before[("gaspar_handler_duration_seconds_bucket", (("le", "+Inf"),))] == 5
    assert value(after, "gaspar_workers", state="idle") == 1
    assert value(after, "gaspar_workers", state="busy") == 0
    assert value(after, "gaspar_requests_in_flight") == 0
    assert value(after, "gaspar_queue_depth") == 0
    assert value(after, "gaspar_remote_hosts") == 0
    assert value(after, "gaspar_worker_resident_bytes", of="sum") > 1 << 20
    assert value(after, "gaspar_producer_process_resident_memory_bytes") > 1 << 20
    stats = producer.stats()
    assert stats["requests_by_protocol"]["v2"]["ok"] == 3
    assert stats["requests"]["ok"] == 4  # both protocols, as before


def test_bytes_connections_and_busy_workers_are_counted(serve) -> None:
    producer = serve(handlers.behave, processes=1, metrics_port=0)
    assert raw_request(producer.address, b"echo:hello") == b"hello"
    s = producer.stats()
    assert (s["bytes_in"], s["bytes_out"]) == (len(pack(b"echo:hello")), len(b"hello"))
    replies = v2_exchange(producer.address, pack_request_v2(7, b"echo:abc"), replies=1)
    assert replies[0].body == b"abc"
    s = producer.stats()
    assert s["bytes_in"] == len(pack(b"echo:hello")) + 4 + 8 + len(b"echo:abc")
    assert s["bytes_out"] == len(b"hello") + 4 + 9 + len(b"abc")
    with socket.create_connection(producer.address, timeout=10) as sock:
        sock.sendall(pack(b"sleep:1"))
        assert wait_until(lambda: producer.stats()["workers_by_state"]["busy"] == 1)
        found = samples(scrape(producer))
        assert value(found, "gaspar_workers", state="busy") == 1
        assert value(found, "gaspar_requests_in_flight") == 1
        assert value(found, "gaspar_connections") == 1
        assert sock.recv(100) == b"slept:1"
    found = samples(scrape(producer))
    assert value(found, "gaspar_received_bytes_total") == producer.stats()["bytes_in"]
    assert value(found, "gaspar_sent_bytes_total") == producer.stats()["bytes_out"]


def test_the_endpoint_answers_only_get_metrics(serve) -> None:
    producer = serve(handlers.echo, processes=1, metrics_port=0)
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(producer, "/other")
    assert err.value.code == 404
    host, port = producer.metrics_address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"garbage\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 405 ")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"x" * metrics.MAX_HEAD)
        assert sock.recv(100) == b""  # a head past its bound: dropped, not buffered on
    assert "gaspar_requests_total" in scrape(producer)  # and it still serves


def test_stats_before_start_have_every_key_at_zero() -> None:
    stats = gaspar.Producer(handlers.echo, 0, processes=1).stats()
    assert stats["requests_by_protocol"] == {p: dict.fromkeys(OUTCOMES, 0) for p in ("v1", "v2")}
    assert stats["worker_exits"] == dict.fromkeys(metrics.EXIT_CAUSES, 0)
    assert stats["workers_by_state"] == {"idle": 0, "busy": 0, "leaving": 0}
    for key in ("latency", "handler_time", "queue_wait"):
        assert stats[key]["count"] == 0 and stats[key]["buckets"][-1] == ["+Inf", 0]
    assert (stats["bytes_in"], stats["bytes_out"], stats["worker_starts"]) == (0, 0, 0)


def test_histogram_buckets_are_upper_bounds_inclusive() -> None:
    h = metrics.Histogram()
    for seconds in (0.0001, 0.00011, 100.0):
        h.observe(seconds)
    snap = h.snapshot()
    assert snap["buckets"][0] == [0.0001, 1]
    assert snap["buckets"][1] == [0.00025, 2]
    assert snap["buckets"][-2] == [60.0, 2] and snap["buckets"][-1] == ["+Inf", 3]
    assert snap["count"] == 3


@pytest.mark.parametrize(
    ("code", "timed_out", "cause"),
    [(0, False, "normal"), (-9, False, "signal"), (-9, True, "timeout"), (1, False, "crash")]
    + [(3, False, "setup_failure")],
)
def test_exit_causes(code: int, timed_out: bool, cause: str) -> None:
    assert metrics.exit_cause(code, timed_out) == cause


def test_a_crashed_worker_is_counted_as_a_crash(serve) -> None:
    producer = serve(handlers.behave, processes=1)
    with pytest.raises(gaspar.WorkerLost), gaspar.Client(producer.address, timeout=20) as c:
        c.request(b"exit")  # os._exit(7)
    assert wait_until(lambda: producer.stats()["worker_exits"]["crash"] == 1, 20)
    with pytest.raises(gaspar.WorkerLost), gaspar.Client(producer.address, timeout=20) as c:
        c.request(b"kill")  # SIGKILL from within
    assert wait_until(lambda: producer.stats()["worker_exits"]["signal"] == 1, 20)
    assert wait_until(lambda: producer.stats()["worker_starts"] == 3, 20)


def test_without_the_extra_the_command_says_so_in_one_line() -> None:
    """prometheus-client hidden from the interpreter: one line naming the extra, exit 1."""
    script = (
        "import sys; sys.modules['prometheus_client'] = None; from gaspar.cli import main;"
        "sys.exit(main(sys.argv[1:]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, "serve", "tests.handlers:echo", "--port", "0"]
        + ["--workers", "1", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert out.returncode == 1, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "ERROR" in lines[0] and "the 'metrics' extra: pip install '.[metrics]'" in lines[0]


def test_a_metrics_port_in_use_fails_the_start(serve) -> None:
    first = serve(handlers.echo, processes=1, metrics_port=0)
    assert first.metrics_address is not None
    with pytest.raises(gaspar.StartupError, match="cannot serve metrics on 127.0.0.1"):
        serve(handlers.echo, processes=1, metrics_port=first.metrics_address[1])


def test_a_non_loopback_metrics_host_warns_once() -> None:
    from tests.test_cli import Server

    srv = Server("tests.handlers:echo", "--workers", "1", "--metrics-port", "0")
    assert srv.finish() == 0
    assert not any(b"--metrics-host" in line for line in srv.log), srv.log
    srv = Server(
        "tests.handlers:echo", "--workers", "1", "--metrics-port", "0", "--metrics-host", "0.0.0.0"
    )
    assert srv.finish() == 0
    warned = [line for line in srv.log if b"--metrics-host 0.0.0.0 is not a loopback" in line]
    assert len(warned) == 1 and b"WARNING" in warned[0], srv.log
    assert any(b"metrics on http://0.0.0.0:" in line for line in srv.log), srv.log

"""CURVE on the worker wire: who may join, what is refused, and what the wire shows.

Real producers, real `gaspar worker` hosts and real ZeroMQ peers made by the
test, on loopback; a small TCP relay in a thread records the bytes between a
host and its producer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import zmq
import zmq.auth

import gaspar
from gaspar import workerproto as wp
from gaspar.keys import create_keypair
from tests import handlers, test_remote
from tests.conftest import wait_until
from tests.test_remote import HEARTBEAT, ask, front, secure_args, workers_are

# test_remote's fixtures, here too.
keys = test_remote.keys
hosts = test_remote.hosts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = b"a distinctive 32-byte payload!!!"
assert len(SECRET) == 32


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gaspar.security" and "worker connection refused" in r.getMessage()
    ]


@pytest.mark.timeout(60)
def test_hosts_with_an_unknown_key_no_key_or_the_wrong_server_key_never_get_a_request(
    serve, hosts, keys, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO)
    producer = front(serve, keys)
    endpoint = producer.worker_endpoint
    stranger = create_keypair(tmp_path / "other", "stranger")[1]
    other_producer = create_keypair(tmp_path / "other", "producer")[0]
    bad = [
        hosts(
            endpoint,
            "--processes",
            "1",
            "--key",
            str(stranger),
            "--server-key",
            keys.producer_public,
        ),  # fmt: skip
        hosts(endpoint, "--processes", "1", "--insecure-workers"),
        hosts(
            endpoint,
            "--processes",
            "1",
            "--key",
            keys.worker_secret,
            "--server-key",
            str(other_producer),
        ),  # fmt: skip
    ]
    good = hosts(endpoint, *secure_args(keys, processes=1))
    assert workers_are(producer, 1)
    assert wait_until(lambda: len(refusals(caplog)) >= 3, timeout=20)
    assert any("is not in" in m for m in refusals(caplog))  # ZAP: an unknown key
    assert any("handshake failed" in m for m in refusals(caplog))  # no key, wrong server key
    served = {int(ask(producer, b"pid")) for _ in range(10)}
    assert served == good.workers()
    assert producer.stats()["workers"] == 1 and producer.stats()["remote_hosts"] == 1
    assert not set(producer.worker_pids()) & {w for h in bad for w in h.workers()}


def refused_peer(
    endpoint: str, public: bytes | None, secret: bytes | None, server: bytes | None
) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes]]:
    """A DEALER that tries once (no reconnection) and says READY if it ever gets through."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.reconnect_ivl = -1
    if public is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
    sock.connect(endpoint)
    sock.send(wp.READY + wp.job_id(0) + bytes(4) + b'{"pid": 4242, "host": "intruder"}')
    return ctx, sock


@pytest.mark.timeout(60)
@pytest.mark.parametrize("peer", ["unknown key", "no key", "wrong server key"])
def test_each_refused_attempt_is_logged_once(serve, keys, tmp_path, caplog, peer) -> None:
    caplog.set_level(logging.INFO)
    producer = front(serve, keys)
    stranger = zmq.auth.load_certificate(create_keypair(tmp_path / "o", "stranger")[1])
    other = zmq.auth.load_certificate(create_keypair(tmp_path / "o", "other")[0])[0]
    worker = zmq.auth.load_certificate(keys.worker_secret)
    server = zmq.auth.load_certificate(keys.producer_public)[0]
    public, secret, server_key = {
        "unknown key": (*stranger, server),
        "no key": (None, None, None),
        "wrong server key": (*worker, other),
    }[peer]
    ctx, sock = refused_peer(producer.worker_endpoint, public, secret, server_key)
    try:
        assert wait_until(lambda: len(refusals(caplog)) >= 1, timeout=10)
        # One attempt, one line: no second line comes, and the peer never joined.
        assert not wait_until(lambda: len(refusals(caplog)) > 1, timeout=1.5)
        assert producer.stats()["workers"] == 0 and 4242 not in producer.worker_pids()
    finally:
        sock.close()
        ctx.term()
    if peer == "unknown key":
        assert stranger[0].decode() in refusals(caplog)[0] and "127.0.0.1" in refusals(caplog)[0]


def gaspar_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gaspar", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


REFUSED = [
    (
        ["serve", "tests.handlers:echo", "--port", "0", "--worker-bind", "tcp://127.0.0.1:1"],
        "gaspar serve: --worker-bind tcp://127.0.0.1:1 needs --key and --allow (CURVE)",
    ),
    (
        ["serve", "tests.handlers:echo", "--port", "0", "--worker-bind", "tcp://0.0.0.0:1"],
        "gaspar serve: --worker-bind tcp://0.0.0.0:1 needs --key and --allow (CURVE)",
    ),
    (
        ["serve", "tests.handlers:echo", "--worker-bind", "tcp://0.0.0.0:1", "--insecure-workers"],
        "gaspar serve: --insecure-workers is accepted only for a loopback tcp:// endpoint",
    ),
    (
        ["serve", "tests.handlers:echo", "--workers", "0"],
        "gaspar serve: --workers 0 (no local workers) needs --worker-bind",
    ),
    (
        ["worker", "tcp://127.0.0.1:1", "tests.handlers:echo"],
        "gaspar worker: endpoint tcp://127.0.0.1:1 needs --key and --server-key (CURVE)",
    ),
    (
        ["worker", "tcp://192.0.2.1:1", "tests.handlers:echo", "--insecure-workers"],
        "gaspar worker: --insecure-workers is accepted only for a loopback tcp:// endpoint",
    ),
    (
        ["worker", "tcp://127.0.0.1:1", "tests.handlers:echo", "--key", "/nonexistent"],
        "gaspar worker: --key and --server-key go together",
    ),
]


@pytest.mark.parametrize(("args", "message"), REFUSED)
def test_the_commands_refuse_a_worker_endpoint_without_curve_in_one_line(
    args: list[str], message: str
) -> None:
    result = gaspar_command(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_the_producer_refuses_the_same_in_one_line(keys) -> None:
    for settings, message in [
        ({"worker_bind": "tcp://127.0.0.1:1"}, "worker_bind tcp://127.0.0.1:1 needs key and allow"),
        ({"worker_bind": "tcp://[::]:1", "insecure_workers": True}, "insecure_workers is accepted"),
        ({"processes": 0}, "processes=0 (no local workers) needs worker_bind"),
        (
            {"worker_bind": "tcp://127.0.0.1:1", "key": keys.producer_public, "allow": keys.allow},
            "key " + keys.producer_public + " holds no secret key",
        ),  # fmt: skip
    ]:
        with pytest.raises(ValueError) as info:
            gaspar.Producer(handlers.echo, 0, **settings)  # type: ignore[arg-type]
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
    gaspar.Producer(handlers.echo, 0, worker_bind="ipc:///nonexistent/w")  # ipc: no keys needed


class Relay:
    """A TCP relay on loopback that records every byte it passes, both ways."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pairs: dict[socket.socket, socket.socket] = {}
        while not self._stop:
            ready, _, _ = select.select([self._listener, *pairs], [], [], 0.1)
            for sock in ready:
                if sock is self._listener:
                    inner, _ = self._listener.accept()
                    outer = socket.create_connection(self.target)
                    pairs[inner], pairs[outer] = outer, inner
                    self._sockets += [inner, outer]
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                peer = pairs.get(sock)
                if not data or peer is None:
                    for end in (sock, peer):
                        if end is not None:
                            pairs.pop(end, None)
                            end.close()
                    continue
                with self._lock:
                    self.seen += data
                peer.sendall(data)

    def captured(self) -> bytes:
        with self._lock:
            return bytes(self.seen)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def relay_to() -> Iterator[list[Relay]]:
    made: list[Relay] = []
    yield made
    for relay in made:
        relay.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("curve", [True, False])
def test_the_wire_between_host_and_producer_hides_the_payload_only_with_curve(
    serve, hosts, keys, relay_to, caplog, curve: bool
) -> None:
    caplog.set_level(logging.WARNING)
    if curve:
        producer = front(serve, keys)
        args = secure_args(keys, processes=1)
    else:
        producer = serve(
            handlers.behave,
            processes=0,
            worker_bind="tcp://127.0.0.1:0",
            insecure_workers=True,
            heartbeat=HEARTBEAT,
        )
        args = ["--processes", "1", "--insecure-workers", "--heartbeat", str(HEARTBEAT)]
        assert any("without CURVE" in r.getMessage() for r in caplog.records)
    port = int(producer.worker_endpoint.rsplit(":", 1)[1])
    relay = Relay(("127.0.0.1", port))
    relay_to.append(relay)
    host = hosts(f"tcp://127.0.0.1:{relay.port}", *args)
    assert workers_are(producer, 1)
    assert ask(producer, b"echo:" + SECRET) == SECRET
    assert ask(producer, b"echo:" + SECRET[::-1]) == SECRET[::-1]
    wire = relay.captured()
    assert len(wire) > 2 * len(SECRET)
    assert (SECRET in wire) is not curve and (SECRET[::-1] in wire) is not curve
    assert (not curve) == ("without CURVE" in host.text())

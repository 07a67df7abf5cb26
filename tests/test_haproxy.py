"""docs/deploy/haproxy.cfg in front of two real producers: v1, v2, TLS and health checks.

Runs Debian's `haproxy` when its binary is present (`make haproxy` installs it as root) and
skips, saying so, when it is not. The test runs the documented file itself: every address in
it comes from an environment variable, which the test sets to listening sockets of its own
that haproxy inherits (``fd@N``), so there is no port race and no copy of the file to drift.
All traffic stays on 127.0.0.1; haproxy is killed whatever happens.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import gaspar
from gaspar.address import format_address
from gaspar.client import Client, request
from gaspar.clientcore import ClientSession
from gaspar.errors import RequestFailed
from gaspar.protocol import Status, pack
from tests.conftest import read_to_eof, wait_until

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "docs" / "deploy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
)
OPENSSL = shutil.which("openssl")

NO_HAPROXY = "haproxy is not installed (`make haproxy` installs Debian's package when run as root)"
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason=NO_HAPROXY)


def tagged(tag: bytes) -> Callable[[bytes], bytes]:
    """A handler that answers its producer's tag, after `sleep:S`, or raises on `raise`."""

    def handle(message: bytes) -> bytes:
        verb, _, arg = message.partition(b":")
        if verb == b"sleep":
            time.sleep(float(arg))  # handler: simulated work, to hold a connection open
        elif verb == b"raise":
            raise ValueError("asked to")
        return tag

    return handle


def die_with_parent() -> None:
    """In haproxy's child before exec: SIGKILL it if this test process dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.set_inheritable(True)
    return sock


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (the PEM haproxy loads, the CA file)."""
    if OPENSSL is None:
        pytest.skip("the openssl binary is not installed: no certificate for the TLS front")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    bundle = directory / "gaspar.pem"
    bundle.write_bytes(cert.read_bytes() + key.read_bytes())
    bundle.chmod(0o600)
    return bundle, cert


class HAProxy:
    """haproxy -db on docs/deploy/haproxy.cfg, its addresses given through the environment."""

    def __init__(self, directory: Path, producers: list[tuple[str, int]]) -> None:
        self.directory = directory
        self.pem, self.ca = make_certificate(directory)
        self.plain, self.tls = listener(), listener()
        self.stats = directory / "stats.sock"
        env = dict(os.environ)
        env.update(
            GASPAR_PLAIN_BIND=f"fd@{self.plain.fileno()}",
            GASPAR_TLS_BIND=f"fd@{self.tls.fileno()}",
            GASPAR_TLS_CERT=str(self.pem),
            GASPAR_STATS=str(self.stats),
            GASPAR_PRODUCER_1=format_address(*producers[0]),
            GASPAR_PRODUCER_2=format_address(*producers[1]),
        )
        self.log_path = directory / "haproxy.log"
        assert HAPROXY is not None
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(CONFIG)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(self.plain.fileno(), self.tls.fileno()),
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        self.plain_address = self.plain.getsockname()[:2]
        self.tls_address = self.tls.getsockname()[:2]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def command(self, line: str) -> str:
        """One command on haproxy's admin socket; "" while it is not up yet."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(self.stats))
                sock.sendall(line.encode() + b"\n")
                return read_to_eof(sock).decode(errors="replace")
        except OSError:
            return ""

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` of the gaspar backend's servers: name -> column -> value."""
        rows = self.command("show stat").splitlines()
        if not rows or not rows[0].startswith("# "):
            return {}
        columns = rows[0][2:].split(",")
        found = {}
        for row in rows[1:]:
            record = dict(zip(columns, row.split(","), strict=False))
            if record.get("pxname") == "gaspar" and record.get("svname", "").startswith("prod"):
                found[record["svname"]] = record
        return found

    def wait_for(self, states: dict[str, dict[str, str]], timeout: float = 20) -> None:
        """Wait until each named server's `show stat` columns have the values given."""

        def reached() -> bool:
            if self.proc.poll() is not None:
                return True  # haproxy exited: fail below, with its log
            servers = self.servers()
            return all(
                servers.get(name, {}).get(column) == value
                for name, columns in states.items()
                for column, value in columns.items()
            )

        assert wait_until(reached, timeout=timeout), (self.servers(), self.log())
        assert self.proc.poll() is None, self.log()

    def stop(self) -> None:
        self.plain.close()
        self.tls.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[list[tuple[str, int]]], HAProxy]]:
    started: list[HAProxy] = []

    def start(producers: list[tuple[str, int]]) -> HAProxy:
        front = HAProxy(tmp_path, producers)
        started.append(front)
        return front

    yield start
    for front in started:
        front.stop()


@pytest.fixture
def two_producers(
    serve: Callable[..., gaspar.Producer],
) -> list[gaspar.Producer]:
    return [serve(tagged(b"A"), processes=2), serve(tagged(b"B"), processes=2)]


def address(producer: gaspar.Producer) -> tuple[str, int]:
    assert producer.address is not None
    return producer.address[0], producer.address[1]


@pytest.fixture
def front(
    two_producers: list[gaspar.Producer], haproxy: Callable[[list[tuple[str, int]]], HAProxy]
) -> HAProxy:
    proxy = haproxy([address(p) for p in two_producers])
    # L7OK: a check's `expect binary ff475302` matched (not only a TCP connect).
    passed = {"status": "UP", "check_status": "L7OK"}
    proxy.wait_for({"producer1": passed, "producer2": passed})
    return proxy


@needs_haproxy
def test_config_is_valid_with_its_defaults(tmp_path: Path) -> None:
    """The documented file as a reader runs it: only the certificate's path is set."""
    pem, _ = make_certificate(tmp_path)
    result = subprocess.run(
        [str(HAPROXY), "-c", "-f", str(CONFIG)],
        capture_output=True,
        timeout=30,
        env={**os.environ, "GASPAR_TLS_CERT": str(pem)},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and b"ALERT" not in output and b"WARNING" not in output, output


@needs_haproxy
def test_v1_requests_reach_both_producers(front: HAProxy) -> None:
    tags = [request(front.plain_address, b"", timeout=10) for _ in range(10)]
    assert set(tags) == {b"A", b"B"}, tags


@needs_haproxy
def test_v2_connections_are_placed_once_and_a_pool_spreads(front: HAProxy) -> None:
    # One connection: every request over it reaches the producer it was placed on.
    with Client(front.plain_address, timeout=10, pool_size=1) as client:
        tags = {client.request(b"") for _ in range(10)}
    assert len(tags) == 1 and tags <= {b"A", b"B"}

    # Concurrent calls open a connection each; leastconn places them on both producers.
    calls = 4
    barrier = threading.Barrier(calls, timeout=10)
    replies: list[Any] = []
    with Client(front.plain_address, timeout=20, pool_size=calls) as client:

        def call() -> None:
            barrier.wait()
            try:
                replies.append(client.request(b"sleep:0.5"))
            except RequestFailed as exc:
                replies.append(exc)

        threads = [threading.Thread(target=call) for _ in range(calls)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert sorted(replies) == [b"A", b"A", b"B", b"B"], replies


@needs_haproxy
def test_tls_front_carries_a_v1_request(front: HAProxy) -> None:
    context = ssl.create_default_context(cafile=str(front.ca))  # verifies 127.0.0.1
    with (
        socket.create_connection(front.tls_address, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(pack(b""))
        assert read_to_eof(sock) in (b"A", b"B")
    # v2 through the same TLS port: the preamble, then framed requests on one connection.
    session: ClientSession[int] = ClientSession(None)
    with (
        socket.create_connection(front.tls_address, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(ClientSession.PREAMBLE)
        for n in range(3):
            sock.sendall(b"".join(session.send(n, b"")[1]))
        replies: list[tuple[int, Status, bytes]] = []
        while len(replies) < 3:
            chunk = sock.recv(65536)
            assert chunk, "the TLS front closed the v2 connection"
            replies.extend(session.receive(chunk))
    assert sorted(n for n, _, _ in replies) == [0, 1, 2]
    assert {status for _, status, _ in replies} == {Status.OK}
    assert len({body for _, _, body in replies}) == 1  # one connection, one producer


@needs_haproxy
def test_failures_reach_v2_clients_typed_and_v1_clients_as_an_empty_reply(
    front: HAProxy,
) -> None:
    """A producer resets a failed v1 request; HAProxy passes the reset on as a clean close.

    So behind this front a v1 client reads an empty reply where it would have seen a reset
    (docs/deploy/README.md says so and points to v2, whose statuses travel in the stream).
    If this fails because the client now sees a reset, HAProxy has learnt to pass resets on:
    update that README.
    """
    for _ in range(4):  # both producers
        assert request(front.plain_address, b"raise", timeout=10) == b""
    with Client(front.plain_address, timeout=10) as client:
        for _ in range(4):
            with pytest.raises(gaspar.HandlerError):
                client.request(b"raise")
        assert client.request(b"") in (b"A", b"B")  # the connection carries on


@needs_haproxy
def test_a_stopped_producer_costs_no_request(
    two_producers: list[gaspar.Producer], front: HAProxy
) -> None:
    two_producers[1].stop(grace=5)
    # Before the checks notice, a refused connection is redispatched to the other producer.
    tags = [request(front.plain_address, b"", timeout=10) for _ in range(10)]
    assert tags == [b"A"] * 10
    front.wait_for({"producer1": {"status": "UP"}, "producer2": {"status": "DOWN"}})
    tags = [request(front.plain_address, b"", timeout=10) for _ in range(4)]
    assert tags == [b"A"] * 4


@needs_haproxy
def test_a_port_that_does_not_answer_the_preamble_is_down(
    serve: Callable[..., gaspar.Producer], haproxy: Callable[[list[tuple[str, int]]], HAProxy]
) -> None:
    """A socket that accepts connections but says nothing passes a TCP check, not this one."""
    producer = serve(tagged(b"A"), processes=1)
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes the handshakes
    try:
        proxy = haproxy([address(producer), silent.getsockname()[:2]])
        proxy.wait_for(
            {
                "producer1": {"status": "UP", "check_status": "L7OK"},
                "producer2": {"status": "DOWN", "check_status": "L7TOUT"},  # no preamble back
            }
        )
    finally:
        silent.close()


def test_readme_gives_the_defaults_the_file_has() -> None:
    """docs/deploy/README.md's table of variables follows haproxy.cfg, the one source."""
    in_config = dict(re.findall(r'"\$\{(GASPAR_\w+)-([^}"]*)\}"', CONFIG.read_text()))
    readme = (CONFIG.parent / "README.md").read_text()
    rows = re.findall(r"^\| `(GASPAR_\w+)`(?:, `(_\d)`)? \| [^|]+ \| ([^|]+) \|$", readme, re.M)
    in_readme: dict[str, str] = {}
    for name, second, defaults in rows:
        values = re.findall(r"`([^`]*)`", defaults)
        names = [name] + ([name.rsplit("_", 1)[0] + second] if second else [])
        in_readme.update(zip(names, values, strict=True))
    assert in_readme == in_config

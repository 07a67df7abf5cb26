"""Workers on other hosts: `gaspar worker` processes joining a producer's pool over loopback.

Every worker host here is a real `gaspar worker` (or a script calling
run_worker_host) in a process group of its own, reaching a real producer over
real ZeroMQ TCP with CURVE; the test freezes, kills and stops them with
signals, as an operator or a failing machine would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import zmq

import gaspar
from gaspar import workerproto as wp
from gaspar.aio import AsyncClient
from gaspar.keys import create_keypair
from tests import handlers
from tests.conftest import alive, child_pids, in_thread, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = 0.2
# A generous bound on noticing a silent host: 3 missed intervals, and slack for a busy machine.
DETECT = 10 * HEARTBEAT + 2


class Keys(NamedTuple):
    producer_secret: str
    producer_public: str
    worker_secret: str
    allow: str


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """A producer key pair, a worker key pair, and an allow directory with the worker's key."""
    producer_public, producer_secret = create_keypair(tmp_path / "keys", "producer")
    worker_public, worker_secret = create_keypair(tmp_path / "keys", "worker")
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "worker.key").write_bytes(worker_public.read_bytes())
    return Keys(str(producer_secret), str(producer_public), str(worker_secret), str(allow))


class Host:
    """A `gaspar worker` subprocess, the leader of its own process group."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def processes(self) -> set[int]:
        """The host, its supervisor and its workers."""
        found = {self.pid}
        for child in child_pids(self.pid):
            found |= {child} | child_pids(child)
        return found

    def workers(self) -> set[int]:
        return {w for s in child_pids(self.pid) for w in child_pids(s)}

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    """Start worker hosts; SIGKILL each one's process group after the test."""
    started: list[Host] = []

    def start(endpoint: str, *args: str, target: str = "tests.handlers:behave") -> Host:
        log = tmp_path / f"host{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gaspar", "worker", endpoint, target, *args],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        host = Host(proc, log)
        started.append(host)
        return host

    yield start
    for host in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host.pid, signal.SIGCONT)
            os.killpg(host.pid, signal.SIGKILL)
        host.proc.wait(10)


def secure_args(keys: Keys, processes: int = 2, heartbeat: float = HEARTBEAT) -> list[str]:
    return [
        "--processes",
        str(processes),
        "--key",
        keys.worker_secret,
        "--server-key",
        keys.producer_public,
        "--heartbeat",
        str(heartbeat),
    ]


def front(serve: Callable[..., gaspar.Producer], keys: Keys, **options: Any) -> gaspar.Producer:
    """A producer with no local workers, taking worker hosts on a loopback port."""
    options.setdefault("heartbeat", HEARTBEAT)
    return serve(
        handlers.behave,
        processes=options.pop("processes", 0),
        worker_bind=options.pop("worker_bind", "tcp://127.0.0.1:0"),
        key=keys.producer_secret,
        allow=keys.allow,
        **options,
    )


def workers_are(producer: gaspar.Producer, n: int, timeout: float = 20) -> bool:
    return wait_until(lambda: producer.stats()["workers"] == n, timeout=timeout)


def ask(producer: gaspar.Producer, message: bytes, timeout: float = 20) -> bytes:
    with gaspar.Client(producer.address, timeout=timeout) as client:
        return client.request(message)


@pytest.mark.timeout(60)
def test_remote_workers_answer_fail_and_are_replaced_like_local_ones(
    serve, hosts, keys, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    producer = front(serve, keys, timeout=1.0)
    host = hosts(producer.worker_endpoint, *secure_args(keys))
    assert workers_are(producer, 2)
    assert producer.stats()["remote_hosts"] == 1
    big = os.urandom(3 * 1024 * 1024 + 5)  # a body that travels as a frame of its own
    assert ask(producer, b"echo:" + big) == big
    served = {int(ask(producer, b"pid")) for _ in range(20)}
    assert served <= host.workers() and set(producer.worker_pids()) == host.workers()
    # A handler that raises: HANDLER_ERROR, and the worker lives.
    before = host.workers()
    with pytest.raises(gaspar.HandlerError, match="remote boom"):
        ask(producer, b"raise:remote boom")
    assert host.workers() == before and ask(producer, b"echo:after") == b"after"
    # A worker that dies mid-job: WORKER_LOST for that job only; its host replaces it.
    long_job, long_box = in_thread(ask, producer, b"sleep:0.5")
    assert wait_until(lambda: producer.stats()["in_flight"] == 1, timeout=10)
    with pytest.raises(gaspar.WorkerLost):
        ask(producer, b"kill")
    assert workers_are(producer, 2)
    # Its host said so at once (LOST), not its silence.
    lost = [r.getMessage() for r in caplog.records if " lost: " in r.getMessage()]
    assert len(lost) == 1 and "nothing heard" not in lost[0]
    long_job.join(20)
    assert long_box == [b"slept:0.5"]
    assert len(host.workers() - before) == 1
    # A job past the producer's timeout: TIMEOUT at once; the remote worker is killed, replaced.
    before = host.workers()
    started = time.monotonic()
    with pytest.raises(gaspar.RequestTimeout):
        ask(producer, b"spin")
    assert time.monotonic() - started < 1.0 + 3
    assert wait_until(lambda: len(host.workers() - before) == 1 and len(host.workers()) == 2)
    assert workers_are(producer, 2)
    assert ask(producer, b"echo:still") == b"still"


CLOSURE_HOST = """
import sys
from gaspar.remote import run_worker_host

marker = sys.argv[2].encode()
sys.exit(run_worker_host(lambda m: marker + m, sys.argv[1], processes=1, key=sys.argv[3],
                         server_key=sys.argv[4], heartbeat=0.2))
"""


@pytest.mark.timeout(60)
def test_a_closure_is_served_by_a_host_started_from_python(serve, keys, tmp_path) -> None:
    producer = front(serve, keys)
    marker = f"closure-{os.getpid()}:"
    with open(tmp_path / "closure.log", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLOSURE_HOST, producer.worker_endpoint, marker]
            + [keys.worker_secret, keys.producer_public],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert workers_are(producer, 1)
        assert ask(producer, b"x") == marker.encode() + b"x"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.timeout(60)
def test_a_frozen_host_is_lost_then_rejoins_and_a_killed_one_is_lost(serve, hosts, keys) -> None:
    producer = front(serve, keys)
    host = hosts(producer.worker_endpoint, *secure_args(keys))
    assert workers_are(producer, 2)
    remote_workers = host.workers()
    running, box = in_thread(ask, producer, b"sleep:1.5")
    assert wait_until(lambda: producer.stats()["in_flight"] == 1, timeout=10)
    os.killpg(host.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    running.join(DETECT + 5)
    assert box and isinstance(box[0], gaspar.WorkerLost)
    assert time.monotonic() - stopped < DETECT
    assert workers_are(producer, 0, timeout=DETECT)
    assert producer.stats()["remote_hosts"] == 0
    os.killpg(host.pid, signal.SIGCONT)
    assert workers_are(producer, 2)
    assert host.workers() == remote_workers  # rejoined, nothing restarted
    # At once, told by the producer (UNKNOWN), not after its own deadline and a backoff.
    assert "does not know it; joining again" in host.text()
    assert "nothing heard from the producer" not in host.text()
    assert ask(producer, b"echo:back") == b"back"
    running, box = in_thread(ask, producer, b"sleep:5")
    assert wait_until(lambda: producer.stats()["in_flight"] == 1, timeout=10)
    os.killpg(host.pid, signal.SIGKILL)
    killed = time.monotonic()
    running.join(DETECT + 5)
    assert box and isinstance(box[0], gaspar.WorkerLost)
    assert workers_are(producer, 0, timeout=DETECT)
    assert time.monotonic() - killed < DETECT


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_at_the_default_heartbeat_a_frozen_or_killed_host_is_noticed_in_about_3s(
    serve, hosts, keys
) -> None:
    producer = front(serve, keys, heartbeat=1.0)
    host = hosts(producer.worker_endpoint, *secure_args(keys, processes=1, heartbeat=1.0))
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        assert workers_are(producer, 1)
        running, box = in_thread(ask, producer, b"sleep:2")
        assert wait_until(lambda: producer.stats()["in_flight"] == 1, timeout=10)
        os.killpg(host.pid, sig)
        started = time.monotonic()
        running.join(30)
        assert box and isinstance(box[0], gaspar.WorkerLost)
        assert 2.5 < time.monotonic() - started < 6  # 3 to 4 intervals, and slack
        os.killpg(host.pid, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_a_handler_busy_for_ten_liveness_periods_is_not_declared_dead(serve, hosts, keys) -> None:
    producer = front(serve, keys, heartbeat=0.1)
    hosts(producer.worker_endpoint, *secure_args(keys, processes=1, heartbeat=0.1))
    assert workers_are(producer, 1)
    assert ask(producer, b"sleep:3") == b"slept:3"  # 10 x 3 intervals of 0.1 s
    assert producer.stats()["requests"]["worker_lost"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("ours", "theirs"), [(0.1, 0.5), (0.5, 0.1)])
def test_a_host_and_a_producer_with_different_heartbeats_keep_each_other(
    serve, hosts, keys, caplog, ours: float, theirs: float
) -> None:
    producer = front(serve, keys, heartbeat=ours)
    host = hosts(producer.worker_endpoint, *secure_args(keys, processes=1, heartbeat=theirs))
    assert workers_are(producer, 1)
    # Five of the quicker side's liveness periods: each side waits for the slower one.
    assert not wait_until(lambda: producer.stats()["workers"] != 1, timeout=2.0)
    assert not any("lost" in r.getMessage() for r in caplog.records)
    assert "nothing heard" not in host.text() and "joining again" not in host.text()


@pytest.mark.timeout(60)
def test_hosts_coming_and_going_under_load_fail_no_request(serve, hosts, keys) -> None:
    producer = front(serve, keys)
    leaving = hosts(producer.worker_endpoint, *secure_args(keys))
    assert workers_are(producer, 2)
    payloads = [b"sleep:0.01"] * 200 + [b"echo:%d" % i for i in range(400)]

    async def burst() -> list[bytes | BaseException]:
        async with AsyncClient(producer.address, timeout=30) as client:
            calls = [client.request(p) for p in payloads]
            return await asyncio.gather(*calls, return_exceptions=True)

    results: list[Any] = []
    load = threading.Thread(target=lambda: results.extend(asyncio.run(burst())), daemon=True)
    load.start()
    assert wait_until(lambda: producer.stats()["requests"]["ok"] >= 50, timeout=20)
    joining = hosts(producer.worker_endpoint, *secure_args(keys))
    assert workers_are(producer, 4)
    leaving.proc.send_signal(signal.SIGTERM)  # mid-load: jobs may be on their way to it
    assert leaving.proc.wait(20) == 0
    load.join(40)
    assert results == [b"slept:0.01"] * 200 + [b"%d" % i for i in range(400)]
    assert producer.stats()["workers"] == 2 and joining.proc.poll() is None


class FakeProducer:
    """The producer's side of the worker wire, played by the test on a plain loopback ROUTER."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def expect(self, kind: bytes, timeout: float = 10) -> tuple[bytes, bytes, bytes]:
        """The next message of `kind` (answering heartbeats meanwhile): identity, id, body."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            identity, head, *rest = self.sock.recv_multipart()
            if head[:1] == wp.HEARTBEAT:
                self.send(identity, wp.HEARTBEAT)
            if head[:1] == kind:
                return identity, head[1:9], rest[0] if rest else head[wp.HEAD_SIZE :]
        raise AssertionError(f"no {kind!r} in {timeout}s")

    def send(self, identity: bytes, kind: bytes, jid: int = 0, body: bytes = b"") -> None:
        self.sock.send_multipart([identity, kind + wp.job_id(jid) + bytes(4) + body])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.mark.timeout(60)
def test_a_leaving_host_answers_a_job_sent_before_its_goodbye_was_read(hosts) -> None:
    producer = FakeProducer()
    try:
        host = hosts(producer.endpoint, "--processes", "1", "--insecure-workers")
        identity, _, _ = producer.expect(wp.READY)
        host.proc.send_signal(signal.SIGTERM)
        assert producer.expect(wp.GOODBYE)[0] == identity
        # A job the producer sent before it read that GOODBYE: the host still runs it.
        producer.send(identity, wp.JOB, 7, b"echo:late")
        assert producer.expect(wp.DONE)[1:] == (wp.job_id(7), b"late")
        # It stays until the producer answers its GOODBYE (nothing more is on its way then).
        assert not wait_until(lambda: host.proc.poll() is not None, timeout=1.0)
        producer.send(identity, wp.GOODBYE)
        assert host.proc.wait(10) == 0
    finally:
        producer.close()


@pytest.mark.timeout(30)
def test_a_worker_that_joins_again_under_a_new_identity_replaces_its_former_slot(
    serve, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    producer = serve(
        handlers.behave, processes=0, worker_bind="tcp://127.0.0.1:0", insecure_workers=True
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ready = wp.READY + bytes(12) + b'{"pid": 4242, "host": "h", "node": "h/1", "heartbeat": 1}'
    try:
        for _ in range(2):  # the same worker of the same host, under a second identity
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(producer.worker_endpoint)
            sock.send(ready)
            assert workers_are(producer, 1, timeout=10)
        assert wait_until(lambda: "4242 lost: it joined again" in caplog.text, timeout=10)
        assert producer.stats()["workers"] == 1 and producer.worker_pids() == [4242]
    finally:
        ctx.destroy(linger=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.timeout(60)
def test_a_host_rejoins_a_producer_restarted_on_the_same_port(hosts, keys) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    settings: dict[str, Any] = {
        "processes": 0,
        "worker_bind": endpoint,
        "key": keys.producer_secret,
        "allow": keys.allow,
        "heartbeat": HEARTBEAT,
    }
    first = gaspar.Producer(handlers.behave, 0, **settings)
    first.start(blocking=False)
    try:
        host = hosts(endpoint, *secure_args(keys))
        assert workers_are(first, 2)
        pids = host.workers()
    finally:
        first.stop()
    second = gaspar.Producer(handlers.behave, 0, **settings)
    second.start(blocking=False)
    try:
        assert workers_are(second, 2, timeout=30)
        assert int(ask(second, b"pid")) in pids
        assert host.workers() == pids and host.proc.poll() is None
    finally:
        second.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("whom", ["main", "group"])
def test_sigterm_lets_a_host_finish_its_job_leave_at_once_and_exit_clean(
    serve, hosts, keys, whom: str
) -> None:
    """SIGTERM to `gaspar worker`, or to its whole process group (what systemd's
    control-group, `timeout` and a container runtime send): the job it runs finishes."""
    producer = front(serve, keys, processes=1)
    host = hosts(producer.worker_endpoint, *secure_args(keys, processes=1))
    assert workers_are(producer, 2)
    local = set(producer.worker_pids()) - host.workers()
    # Hold the local worker, then give the remote one a job of 2 s.
    held, held_box = in_thread(ask, producer, b"sleep:3")
    assert wait_until(lambda: producer.stats()["in_flight"] == 1, timeout=10)
    running, box = in_thread(ask, producer, b"sleep:2")
    assert wait_until(lambda: producer.stats()["in_flight"] == 2, timeout=10)
    processes = host.processes()
    if whom == "main":
        host.proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(host.pid, signal.SIGTERM)
    # Its slot leaves the pool at once, though its job still runs.
    assert wait_until(lambda: producer.stats()["workers"] == 1, timeout=1.5)
    assert running.is_alive()
    queued, queued_box = in_thread(ask, producer, b"pid")  # waits for the local worker
    running.join(20)
    assert box == [b"slept:2"]
    assert host.proc.wait(20) == 0
    assert wait_until(lambda: not any(alive(p) for p in processes), timeout=10)
    held.join(20)
    queued.join(20)
    assert held_box == [b"slept:3"] and queued_box and int(queued_box[0]) in local
    assert producer.stats()["remote_hosts"] == 0


@pytest.mark.timeout(60)
def test_metrics_count_the_worker_hosts_connected(serve, hosts, keys) -> None:
    """gaspar_remote_hosts follows the hosts that join and leave; stats() says the same."""
    from tests.test_metrics import samples, scrape, value

    producer = front(serve, keys, metrics_port=0)
    assert value(samples(scrape(producer)), "gaspar_remote_hosts") == 0
    host = hosts(producer.worker_endpoint, *secure_args(keys, processes=2))
    assert workers_are(producer, 2)
    assert producer.stats()["remote_hosts"] == 1
    assert value(samples(scrape(producer)), "gaspar_remote_hosts") == 1
    host.proc.send_signal(signal.SIGTERM)
    assert host.proc.wait(20) == 0
    assert wait_until(lambda: value(samples(scrape(producer)), "gaspar_remote_hosts") == 0)

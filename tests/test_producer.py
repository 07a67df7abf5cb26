"""The producer end to end: real workers, real sockets, real worker links."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

import gaspar
from gaspar.client import request
from gaspar.protocol import pack
from tests import handlers
from tests.conftest import alive, child_pids, raw_request, read_to_eof, wait_until


def test_original_example_with_bytes() -> None:
    def echo(message: bytes) -> bytes:
        return message

    consumer = gaspar.Consumer(handler=echo)
    producer = gaspar.Producer(consumer, 0, processes=2)
    thread = threading.Thread(target=producer.start)  # start() blocks in this thread
    thread.start()
    try:
        assert wait_until(lambda: producer.state == "running", timeout=20)
        assert gaspar.client.request(producer.address, b"hello", timeout=10) == b"hello"
        assert raw_request(producer.address, b"") == b""
    finally:
        producer.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert producer.state == "stopped"


def test_start_nonblocking_returns_when_bound_and_all_workers_ready(serve) -> None:
    producer = serve(handlers.behave, processes=3)
    host, port = producer.address
    assert host == "127.0.0.1" and port > 0
    pids = producer.worker_pids()
    assert len(pids) == 3
    # Every worker is a live grandchild: forked by the supervisor, not by us.
    assert set(pids) == child_pids(producer.supervisor_pid)
    assert child_pids(os.getpid()) >= {producer.supervisor_pid}


def test_default_processes_follow_cpu_affinity() -> None:
    producer = gaspar.Producer(handlers.echo, 0)
    assert producer.processes == len(os.sched_getaffinity(0))


def test_context_manager_starts_and_stops_cleanly(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a directory would go
    with gaspar.Producer(handlers.behave, 0, processes=2) as producer:
        assert request(producer.address, b"echo:hi", timeout=10) == b"hi"
        supervisor, workers = producer.supervisor_pid, producer.worker_pids()
        # The workers' links are socket pairs: nothing on disk.
        assert list(tmp_path.iterdir()) == []
    assert supervisor is not None and not alive(supervisor)
    assert not any(alive(pid) for pid in workers)
    assert supervisor not in child_pids(os.getpid())
    with pytest.raises(gaspar.ConnectionFailed):
        request(producer.address, b"x", timeout=5)


def test_lambda_and_closure_handlers_work_even_with_spawn_as_default(serve) -> None:
    # Workers are forked with os.fork, so the default start method does not matter.
    method = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        suffix = b"-closure"
        producer = serve(lambda m: m + suffix, processes=1)
        assert request(producer.address, b"x", timeout=10) == b"x-closure"
        producer2 = serve(gaspar.Consumer(handler=lambda m: m.upper()), processes=1)
        assert request(producer2.address, b"abc", timeout=10) == b"ABC"
    finally:
        multiprocessing.set_start_method(method, force=True)


def test_consumer_subclass_setup_runs_in_each_worker(serve) -> None:
    """Each worker's prefix is its own pid, set in setup(): setup ran after each fork."""
    producer = serve(handlers.Prefixed, processes=2)
    pids = set(producer.worker_pids())
    assert len(pids) == 2
    seen = set()
    for _ in range(20):
        reply = request(producer.address, b"m", timeout=10)
        pid, _, rest = reply.partition(b":")
        assert rest == b"m"
        seen.add(int(pid))
    assert seen == pids  # idle workers take turns, so both answered


def test_str_reply_is_utf8(serve) -> None:
    producer = serve(handlers.behave, processes=1)
    assert request(producer.address, b"str:caf", timeout=10) == "café".encode()


def test_reply_of_wrong_type_is_a_handler_error(serve) -> None:
    producer = serve(handlers.behave, processes=1)
    pid = producer.worker_pids()[0]
    with pytest.raises(gaspar.RequestFailed):
        request(producer.address, b"badtype", timeout=10)
    assert request(producer.address, b"pid", timeout=10) == str(pid).encode()


def test_setup_failure_fails_start() -> None:
    producer = gaspar.Producer(handlers.BrokenSetup, 0, processes=2)
    with pytest.raises(gaspar.StartupError, match="setup"):
        producer.start(blocking=False)
    assert producer.state == "stopped"
    assert producer.supervisor_pid is not None and not alive(producer.supervisor_pid)


def test_port_in_use_fails_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        producer = gaspar.Producer(handlers.echo, port, processes=1)
        with pytest.raises(gaspar.StartupError, match="cannot listen"):
            producer.start(blocking=False)
    assert not alive(producer.supervisor_pid)


def test_producer_starts_once(serve) -> None:
    producer = serve(handlers.echo, processes=1)
    with pytest.raises(RuntimeError):
        producer.start(blocking=False)


def loop_and_zmq_fds(pid: int) -> list[str]:
    """The eventfd and epoll descriptors of `pid`: ZeroMQ contexts and event loops hold them."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return [link for link in links if "eventfd" in link or "eventpoll" in link]


def test_supervisor_has_one_thread_and_no_zmq(serve) -> None:
    """Fork safety: the supervisor holds no thread and no ZeroMQ socket of ours."""
    # pyzmq's zero-copy collector, started by earlier tests in this process, has some.
    inherited = len(loop_and_zmq_fds(os.getpid()))
    producer = serve(handlers.behave, processes=1)
    sup = producer.supervisor_pid
    assert len(os.listdir(f"/proc/{sup}/task")) == 1
    assert len(loop_and_zmq_fds(sup)) <= inherited


def test_workers_keep_what_they_inherit_out_of_the_collector(serve) -> None:
    """Memory: gc.freeze() before each fork, so collections in workers do not copy shared pages."""
    producer = serve(handlers.behave, processes=1)
    assert int(request(producer.address, b"frozen", timeout=10)) > 1000
    assert gc.get_freeze_count() == 0  # the caller's objects are collected as before


MALLOC_SCRIPT = """
import ctypes, sys
import gaspar

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
with gaspar.Producer(lambda m: m, 0, processes=1, tune_malloc=sys.argv[1] == "on"):
    before = mallinfo2().hblks
    buffer = bytearray(2 << 20)
    print(mallinfo2().hblks - before)
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc 2.33 or newer only",
)
def test_tune_malloc_keeps_megabyte_buffers_on_the_heap() -> None:
    """Memory: with tune_malloc a 2 MiB buffer is not a mapping of its own."""

    def mapped_blocks(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", MALLOC_SCRIPT, mode], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert mapped_blocks("off") == 1
    assert mapped_blocks("on") == 0


LEAN_SCRIPT = """
import sys
import gaspar
producer = gaspar.Producer(lambda message: message, 0, processes=2)
producer.start(blocking=False)
print(producer.supervisor_pid, *producer.worker_pids(), flush=True)
sys.stdin.readline()
producer.stop()
"""


def loaded(pid: int, library: str) -> bool:
    """True if `pid` has a shared object whose name contains `library` mapped."""
    with open(f"/proc/{pid}/maps") as maps:
        return library in maps.read()


def test_supervisor_and_workers_carry_no_asyncio_no_zmq_and_one_thread() -> None:
    """Memory: what the producer loads after forking the supervisor stays in the producer;
    a local worker is a blocking loop on its link: no ZeroMQ, no thread."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LEAN_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        sup, *workers = (int(pid) for pid in proc.stdout.readline().split())
        assert len(workers) == 2
        assert loaded(proc.pid, "_asyncio")  # the producer has it: the check can see it
        for pid in (sup, *workers):
            assert not loaded(pid, "_asyncio")
        for pid in (proc.pid, sup, *workers):
            assert not loaded(pid, "libzmq")  # a producer with only local workers needs none
        for pid in (sup, *workers):
            assert len(os.listdir(f"/proc/{pid}/task")) == 1
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()


def test_ipv6(serve) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 not configured here")
    producer = serve(handlers.echo, processes=1, host="::1")
    port = producer.address[1]
    assert request(f"[::1]:{port}", b"six", timeout=10) == b"six"


def test_half_closed_client_still_gets_its_reply(serve) -> None:
    producer = serve(handlers.behave, processes=1)
    with socket.create_connection(producer.address, timeout=10) as sock:
        sock.sendall(pack(b"echo:half"))
        sock.shutdown(socket.SHUT_WR)  # as `nc -N` does
        assert read_to_eof(sock) == b"half"


def test_request_in_many_small_writes(serve) -> None:
    producer = serve(handlers.echo, processes=1)
    data = pack(b"0123456789" * 100)
    with socket.create_connection(producer.address, timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), 7):
            sock.sendall(data[i : i + 7])
        assert read_to_eof(sock) == b"0123456789" * 100


def test_large_payload_round_trip(serve) -> None:
    producer = serve(handlers.echo, processes=1)
    payload = os.urandom(3 * 1024 * 1024)
    assert request(producer.address, payload, timeout=30) == payload

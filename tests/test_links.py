"""Worker links: frames on a stream, the local link's failure paths, the ZeroMQ link end to end.

The dispatcher tests here drive a real Dispatcher through a real LocalLink over
real socket pairs, with the test playing the worker's side of
gaspar/workerproto.py; the end-to-end tests break real workers' links.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest
from hypothesis import given
from hypothesis import strategies as st

import gaspar
from gaspar import workerproto as wp
from gaspar.aio import AsyncClient
from gaspar.client import request
from gaspar.dispatcher import Dispatcher
from gaspar.links import LocalLink
from gaspar.protocol import Status
from tests import handlers
from tests.conftest import alive, in_thread, wait_until
from tests.test_batches import submit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- frames ---------------------------------------------------------------------

messages = st.lists(
    st.tuples(
        st.sampled_from([wp.DONE, wp.FAILED, wp.READY]),
        st.binary(min_size=8, max_size=8),
        st.integers(0, wp.MAX_NUMBER),
        st.one_of(st.binary(max_size=300), st.just(b"L" * (wp.SPLIT_BODY + 5))),
    ),
    max_size=8,
)


def read_all(reader: wp.FrameReader, stream: bytes, cuts: list[int]) -> list[tuple]:
    """Feed `stream` to `reader` in pieces ending at `cuts`, as a socket would."""
    out: list[tuple] = []
    at = 0
    for end in [*sorted(cuts), len(stream)]:
        while at < end:
            buffer = reader.get_buffer()
            n = min(len(buffer), end - at)
            buffer[:n] = stream[at : at + n]
            reader.feed(n)
            at += n
            while (message := reader.next()) is not None:
                kind, jid, number, body = message
                out.append((kind, jid, number, bytes(body)))
    return out


@given(messages, st.lists(st.integers(0, 70000), max_size=6), st.booleans())
def test_frames_read_back_whatever_the_pieces(items, cuts, reuse: bool) -> None:
    stream = b"".join(
        b"".join(bytes(b) for b in wp.frame(k, j, body, n)) for k, j, n, body in items
    )
    reader = wp.FrameReader(1 << 20, reuse_large=reuse)
    assert read_all(reader, stream, [c for c in cuts if c < len(stream)]) == items
    assert reader.pending == 0


def test_a_large_body_is_its_own_buffer_and_never_joined() -> None:
    body = bytearray(b"x" * wp.SPLIT_BODY)
    frames = wp.frame(wp.DONE, wp.job_id(1), body, 7)
    assert len(frames) == 2 and frames[1] is body
    reader = wp.FrameReader(1 << 20)
    ((kind, jid, number, got),) = read_all(reader, b"".join(bytes(f) for f in frames), [])
    assert (kind, jid, number, got) == (wp.DONE, wp.job_id(1), 7, bytes(body))


def test_a_frame_over_the_bound_or_of_an_unknown_kind_is_refused_at_its_head() -> None:
    reader = wp.FrameReader(100)
    buffer = reader.get_buffer()
    head = (101).to_bytes(4, "big") + wp.head(wp.DONE, wp.job_id(1))
    buffer[: len(head)] = head
    reader.feed(len(head))  # only the head: nothing of the body is stored first
    with pytest.raises(wp.FrameError, match="over the bound"):
        reader.next()
    reader = wp.FrameReader(100, frozenset((wp.JOB,)))
    head = (1).to_bytes(4, "big") + wp.head(wp.DONE, wp.job_id(1))
    reader.get_buffer()[: len(head)] = head
    reader.feed(len(head))
    with pytest.raises(wp.FrameError, match="unknown message kind"):
        reader.next()


# -- the local link, with the test as the worker ----------------------------------


class Peer:
    """The worker's side of a local link, played by the test."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)

    def send(self, kind: bytes, jid: bytes, body: bytes, number: int = 0) -> None:
        for part in wp.frame(kind, jid, body, number):
            self.writer.write(bytes(part))

    def ready(self) -> None:
        self.send(wp.READY, wp.job_id(0), json.dumps({"pid": self.pid, "host": "t"}).encode())

    async def receive(self) -> list[tuple[bytes, bytes]]:
        """The next JOB or BATCH, as its jobs (id, payload)."""
        head = await asyncio.wait_for(self.reader.readexactly(wp.FRAME_HEAD), 5)
        size, kind, jid, count = struct.unpack("!Ic8sI", head)
        body = await asyncio.wait_for(self.reader.readexactly(size), 5)
        return [(jid, body)] if kind == wp.JOB else wp.unpack_batch(body, count)

    def answer(self, jid: bytes, payload: bytes, micros: int = 5) -> None:
        self.send(wp.DONE, jid, payload.upper(), micros)

    def close(self) -> None:
        self.writer.transport.abort()


@asynccontextmanager
async def local(workers: int = 1) -> AsyncIterator[tuple[Dispatcher, list[Peer], list[int]]]:
    disp = Dispatcher(timeout=None, max_queue=1000)
    killed: list[int] = []
    link = LocalLink(disp, kill=killed.append, max_reply=1 << 20)
    peers = []
    try:
        for n in range(1, workers + 1):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            link.add(1000 + n, ours)
            peer = Peer(1000 + n, theirs)
            await peer.open()
            peer.ready()
            peers.append(peer)
            assert await disp.wait_for(lambda n=n: disp.ready_workers == n, 5)
        yield disp, peers, killed
    finally:
        for peer in peers:
            peer.close()
        disp.close()


@pytest.mark.timeout(20)
def test_eof_on_a_link_fails_the_running_job_and_its_batch_at_once() -> None:
    """No supervisor here at all: the link's end is the only news of the death."""

    async def main() -> None:
        async with local() as (disp, (peer,), killed):
            for _ in range(300):  # the handler looks quick: what queues goes in batches
                (fut,) = submit(disp, [b"w"])
                ((jid, payload),) = await peer.receive()
                peer.answer(jid, payload)
                await fut
            futures = submit(disp, [b"j%d" % i for i in range(6)])
            ((jid, payload),) = await peer.receive()  # the first alone: the worker was idle
            peer.answer(jid, payload)
            batch = await peer.receive()
            assert len(batch) == 5
            peer.answer(*batch[0])
            await asyncio.wait_for(futures[1], 5)
            peer.close()  # the worker dies running the batch's second job
            results = await asyncio.wait_for(asyncio.gather(*futures), 5)
            assert results[:2] == [(Status.OK, b"J0"), (Status.OK, b"J1")]
            assert [s for s, _ in results[2:]] == [Status.WORKER_LOST] * 4
            assert disp.outstanding == 0 and disp.ready_workers == 0 and killed == []

    asyncio.run(main())


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 20,  # a length past any bound
        (3).to_bytes(4, "big") + b"Z" + bytes(12) + b"abc",  # an unknown kind
        (0).to_bytes(4, "big") + wp.head(wp.JOB, wp.job_id(1)),  # a kind workers never send
        (2).to_bytes(4, "big") + wp.head(wp.READY, wp.job_id(0)) + b"{}",  # a second READY
    ],
)
def test_a_malformed_frame_drops_that_worker_only(garbage: bytes, caplog) -> None:
    caplog.set_level(logging.WARNING)

    async def main() -> None:
        async with local(workers=2) as (disp, (bad, good), killed):
            futures = submit(disp, [b"a", b"b"])
            (job_a,) = await bad.receive()
            (job_b,) = await good.receive()
            bad.writer.write(garbage)
            (status, _) = await asyncio.wait_for(futures[0], 5)
            assert status is Status.WORKER_LOST and killed == [bad.pid]
            assert disp.worker_pids() == [good.pid]
            good.answer(*job_b)
            assert await asyncio.wait_for(futures[1], 5) == (Status.OK, b"B")
            (after,) = submit(disp, [b"c"])
            (job_c,) = await good.receive()
            good.answer(*job_c)
            assert await asyncio.wait_for(after, 5) == (Status.OK, b"C")

    asyncio.run(main())
    assert any("broke its link" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


@pytest.mark.timeout(20)
def test_a_truncated_frame_at_eof_is_a_lost_worker(caplog) -> None:
    caplog.set_level(logging.WARNING)

    async def main() -> None:
        async with local() as (disp, (peer,), _):
            (fut,) = submit(disp, [b"a"])
            ((jid, _),) = await peer.receive()
            peer.writer.write((100).to_bytes(4, "big") + wp.head(wp.DONE, jid) + b"partial")
            await peer.writer.drain()
            peer.close()
            assert (await asyncio.wait_for(fut, 5))[0] is Status.WORKER_LOST

    asyncio.run(main())
    assert any("inside a message" in r.getMessage() for r in caplog.records)


# -- a local worker process on its own ----------------------------------------------

WORKER = """
import socket, sys
import gaspar
from gaspar import worker
link = socket.socket(fileno=int(sys.argv[1]))
sys.exit(worker.main(gaspar.Consumer(handler=lambda m: m[::-1]), link, 1 << 20))
"""


@pytest.mark.timeout(30)
def test_a_local_worker_is_one_thread_without_zmq_and_leaves_at_eof() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
        cwd=ROOT,
    )
    theirs.close()
    try:
        ours.settimeout(10)
        reader = wp.FrameReader(1 << 20)
        got: list[tuple] = []

        def receive() -> tuple:
            while not got:
                buffer = reader.get_buffer()
                n = ours.recv_into(buffer)
                assert n
                reader.feed(n)
                while (message := reader.next()) is not None:
                    got.append(message)
            return got.pop(0)

        kind, _, _, info = receive()
        assert kind == wp.READY and wp.parse_ready(bytes(info)).pid == proc.pid
        big = os.urandom(wp.SPLIT_BODY * 3)
        for part in wp.frame(wp.JOB, wp.job_id(1), big):
            ours.sendall(part)
        kind, jid, _, body = receive()
        assert (kind, jid, bytes(body)) == (wp.DONE, wp.job_id(1), big[::-1])
        assert len(os.listdir(f"/proc/{proc.pid}/task")) == 1
        with open(f"/proc/{proc.pid}/maps") as maps:
            assert "libzmq" not in maps.read()
        ours.close()  # the producer has gone: the worker leaves at once
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


# -- end to end ---------------------------------------------------------------------


def link_socket() -> socket.socket:
    """In a worker: its link (the Unix socket its supervisor, our parent, made)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
        except OSError:
            continue
        sock = socket.socket(fileno=os.dup(fd))
        if sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            if struct.unpack("3i", creds)[0] == os.getppid():
                return sock
        sock.close()
    raise RuntimeError("no link")


def v2_request(address: tuple[str, int], payload: bytes, timeout: float) -> bytes:
    """One request over protocol v2, whose replies name the outcome (v1 resets instead)."""

    async def main() -> bytes:
        async with AsyncClient(address, timeout=timeout) as client:
            return await client.request(payload)

    return asyncio.run(main())


def breaker(message: bytes) -> bytes:
    """A handler that breaks its own worker's link, as a broken worker would."""
    if message == b"garble":
        link_socket().sendall(b"\xff" * 32)
        time.sleep(30)  # handler: until the supervisor kills this worker
    if message == b"truncate":
        link_socket().sendall((100).to_bytes(4, "big") + wp.head(wp.DONE, bytes(8)) + b"cut")
        os._exit(9)
    if message == b"sleep":
        time.sleep(30)  # handler: a long job
    return message


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", [b"garble", b"truncate"])
def test_a_worker_that_breaks_its_link_is_dropped_and_replaced(serve, how: bytes) -> None:
    producer = serve(breaker, processes=1)
    (first,) = producer.worker_pids()
    started = time.monotonic()
    with pytest.raises(gaspar.WorkerLost):
        v2_request(producer.address, how, 20)
    assert time.monotonic() - started < 10
    assert wait_until(lambda: not alive(first), timeout=10)
    assert wait_until(lambda: len(producer.worker_pids()) == 1, timeout=10)
    assert producer.worker_pids() != [first]
    assert request(producer.address, b"still here", timeout=10) == b"still here"
    assert producer.state == "running" and producer.stats()["requests"]["worker_lost"] == 1


@pytest.mark.timeout(60)
def test_a_dead_worker_fails_its_request_without_its_supervisor_reporting(serve) -> None:
    """The supervisor is stopped (SIGSTOP): only the link's EOF can tell of the death."""
    producer = serve(handlers.behave, processes=1)
    (pid,) = producer.worker_pids()
    thread, box = in_thread(v2_request, producer.address, b"sleep:30", 30)
    assert wait_until(lambda: producer.stats()["in_flight"] == 1, timeout=10)
    supervisor = producer.supervisor_pid
    os.kill(supervisor, signal.SIGSTOP)
    try:
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=10)
        assert box and isinstance(box[0], gaspar.WorkerLost)
    finally:
        os.kill(supervisor, signal.SIGCONT)
    assert wait_until(lambda: len(producer.worker_pids()) == 1, timeout=10)
    assert request(producer.address, b"echo:again", timeout=10) == b"again"


@pytest.mark.timeout(60)
def test_a_killed_supervisor_fails_requests_at_once_and_the_producer_stops(serve, caplog) -> None:
    caplog.set_level(logging.INFO)
    producer = serve(handlers.behave, processes=1, grace=30)
    running, running_box = in_thread(v2_request, producer.address, b"sleep:30", 30)
    assert wait_until(lambda: producer.stats()["in_flight"] == 1, timeout=10)
    queued, queued_box = in_thread(v2_request, producer.address, b"echo:q", 30)
    assert wait_until(lambda: producer.stats()["queued"] == 1, timeout=10)
    started = time.monotonic()
    os.kill(producer.supervisor_pid, signal.SIGKILL)
    running.join(timeout=10)
    queued.join(timeout=10)
    assert running_box and isinstance(running_box[0], gaspar.WorkerLost)
    assert queued_box and isinstance(queued_box[0], gaspar.ShuttingDown)
    assert wait_until(lambda: producer.state == "stopped", timeout=10)
    assert time.monotonic() - started < 15  # not the 30 s grace period
    critical = [r for r in caplog.records if r.levelno >= logging.CRITICAL]
    assert len(critical) == 1 and "supervisor process died" in critical[0].getMessage()


# -- the ZeroMQ link, end to end ----------------------------------------------------

ZMQ_WORKER = """
import sys
import gaspar
from gaspar.link_zmq import serve_worker
serve_worker(gaspar.Consumer(handler=lambda m: b"zmq:" + m), sys.argv[1])
"""


@pytest.mark.timeout(60)
def test_a_zeromq_worker_process_serves_a_dispatcher_through_the_zeromq_link() -> None:
    from gaspar.link_zmq import ZmqLink

    async def main() -> None:
        disp = Dispatcher(timeout=None, max_queue=1000)
        killed: list[int] = []
        link = ZmqLink(disp, "tcp://127.0.0.1:0", kill=killed.append)
        proc = subprocess.Popen([sys.executable, "-c", ZMQ_WORKER, link.endpoint], cwd=ROOT)
        try:
            assert await disp.wait_for(lambda: disp.ready_workers == 1, 20)
            assert disp.worker_pids() == [proc.pid]
            payloads = [b"%d" % i for i in range(200)] + [b"B" * (wp.SPLIT_BODY * 2)]
            results = await asyncio.wait_for(asyncio.gather(*submit(disp, payloads)), 20)
            assert results == [(Status.OK, b"zmq:" + p) for p in payloads]
            proc.kill()
            proc.wait(10)
            link.worker_exited(proc.pid, -9)
            assert disp.ready_workers == 0
        finally:
            with suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
            disp.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_uvloop", [False, True])
def test_the_local_link_works_on_either_event_loop(serve, use_uvloop: bool) -> None:
    if use_uvloop:
        pytest.importorskip("uvloop")
    producer = serve(handlers.behave, processes=2, use_uvloop=use_uvloop)
    big = os.urandom(3 * 1024 * 1024 + 7)
    assert request(producer.address, b"echo:" + big, timeout=20) == big
    payloads = [b"echo:%d" % i for i in range(2000)]

    async def burst() -> list[bytes]:
        async with AsyncClient(producer.address, timeout=20) as client:
            return await asyncio.gather(*(client.request(p) for p in payloads))

    assert asyncio.run(burst()) == [b"%d" % i for i in range(2000)]
    with pytest.raises(gaspar.WorkerLost):
        v2_request(producer.address, b"kill", 20)
    assert wait_until(lambda: len(producer.worker_pids()) == 2, timeout=10)
    assert request(producer.address, b"echo:after", timeout=10) == b"after"


def socket_inodes(pid: int | str) -> set[str]:
    """The socket inodes process `pid` holds ("socket:[N]")."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:"):
                found.add(target)
    return found


@pytest.mark.timeout(30)
def test_a_second_producer_holds_none_of_the_first_ones_sockets(serve) -> None:
    """Two producers in one process: the second one's supervisor (and so its workers)
    keeps no socket of the first's, whose workers must see their links end when it stops."""
    first = serve(handlers.echo, processes=1)
    before = socket_inodes("self")
    second = serve(handlers.echo, processes=1)
    assert second.supervisor_pid is not None
    for pid in [second.supervisor_pid, *second.worker_pids()]:
        assert not socket_inodes(pid) & before, pid
    workers = first.worker_pids()
    started = time.monotonic()
    first.stop(grace=5)
    assert time.monotonic() - started < 4  # not the 5 s after which workers are killed
    assert not any(alive(pid) for pid in workers)

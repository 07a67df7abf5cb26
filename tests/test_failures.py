"""Failure semantics: every request ends in its own reply or a reset, within a bound."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time

import pytest

import gaspar
from gaspar.client import request
from gaspar.protocol import pack
from tests import handlers
from tests.conftest import alive, connect, raw_request, read_to_eof, wait_until


def outstanding(producer: gaspar.Producer) -> int:
    """Requests queued or running, from the public stats."""
    stats = producer.stats()
    return int(stats["queued"] + stats["in_flight"])


def assert_reset(address: tuple[str, int], payload: bytes, timeout: float = 10.0) -> None:
    """A v1 reader sees a connection reset, not an empty reply."""
    with pytest.raises(ConnectionResetError):
        raw_request(address, payload, timeout)


def test_handler_exception_resets_and_worker_survives(serve, caplog) -> None:
    producer = serve(handlers.behave, processes=1)
    (pid,) = producer.worker_pids()
    assert_reset(producer.address, b"raise:no good")
    with pytest.raises(gaspar.RequestFailed) as info:
        request(producer.address, b"raise:again", timeout=10)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert request(producer.address, b"pid", timeout=10) == str(pid).encode()
    assert producer.worker_pids() == [pid]


@pytest.mark.parametrize("how", [b"exit", b"kill", b"segv"])
def test_worker_death_fails_only_its_request_and_is_replaced(serve, how: bytes) -> None:
    producer = serve(handlers.behave, processes=2)
    before = set(producer.worker_pids())
    results: dict[str, bytes | Exception] = {}

    def slow() -> None:
        try:
            results["slow"] = request(producer.address, b"sleep:0.5", timeout=20)
        except Exception as exc:  # recorded for the assertion below
            results["slow"] = exc

    other = threading.Thread(target=slow)
    other.start()
    with pytest.raises(gaspar.RequestFailed):
        request(producer.address, how, timeout=20)
    other.join(30)
    assert results["slow"] == b"slept:0.5"
    # One worker was replaced; the replacement serves beside the other.
    assert wait_until(lambda: len(producer.worker_pids()) == 2, timeout=20)
    after = set(producer.worker_pids())
    assert len(before - after) == 1 and len(after - before) == 1
    replies = {int(request(producer.address, b"pid", timeout=20)) for _ in range(10)}
    assert replies == after  # idle workers take turns: each of them answered


def test_timeout_kills_and_replaces_the_worker(serve) -> None:
    producer = serve(handlers.behave, processes=1, timeout=0.5)
    (pid,) = producer.worker_pids()
    started = time.monotonic()
    assert_reset(producer.address, b"spin")
    assert time.monotonic() - started < 5
    new_pid = int(request(producer.address, b"pid", timeout=20))
    assert new_pid != pid and not alive(pid)
    # A request within the timeout is untouched.
    assert request(producer.address, b"sleep:0.1", timeout=10) == b"slept:0.1"


def test_oversized_request_is_refused_from_its_header(serve) -> None:
    producer = serve(handlers.echo, processes=1, max_message_size=1024)
    with connect(producer.address) as sock:
        sock.sendall(struct.pack("!I", 1025))  # and no payload at all
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)
    with connect(producer.address) as sock:
        sock.sendall(struct.pack("!I", 0xFFFFFFFF))
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)
    assert raw_request(producer.address, b"x" * 1024) == b"x" * 1024


def test_truncated_request_is_dropped_after_read_timeout(serve) -> None:
    producer = serve(handlers.echo, processes=1, read_timeout=0.5)
    with connect(producer.address) as sock:
        sock.sendall(struct.pack("!I", 100) + b"only ten..")
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)
        assert time.monotonic() - started < 5
    # A silent client (connects, sends nothing) is dropped the same way.
    with connect(producer.address) as sock, pytest.raises(ConnectionResetError):
        read_to_eof(sock)
    assert raw_request(producer.address, b"fine") == b"fine"


@pytest.mark.parametrize("use_uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_large_requests_arrive_whole_however_they_are_cut(serve, use_uvloop: bool) -> None:
    producer = serve(handlers.echo, processes=1, use_uvloop=use_uvloop)
    payload = os.urandom(1 << 20) * 3
    assert raw_request(producer.address, payload, timeout=30) == payload
    data = pack(payload)
    for piece in (1000, 65536, 300_000):
        with connect(producer.address, 30) as sock:
            for i in range(0, len(data), piece):
                sock.sendall(data[i : i + piece])
            assert read_to_eof(sock) == payload


@pytest.mark.parametrize("use_uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_large_request_cut_short_or_overrun_is_dropped(serve, use_uvloop: bool) -> None:
    producer = serve(handlers.behave, processes=1, read_timeout=1.0, use_uvloop=use_uvloop)
    (pid,) = producer.worker_pids()
    # Whitespace pads the request to 1 MiB: float() ignores it.
    data = pack(b"sleep:0.3" + b" " * (1 << 20))
    with connect(producer.address) as sock:  # stalls half-way: reset at read_timeout
        sock.sendall(data[: len(data) // 2])
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)
    with connect(producer.address) as sock:  # leaves half-way
        sock.sendall(data[: len(data) // 2])
    with connect(producer.address) as sock:  # sends more than it announced
        sock.sendall(data + b"junk")
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)
    assert wait_until(lambda: outstanding(producer) == 0)
    assert raw_request(producer.address, b"echo:" + b"k" * (1 << 20)) == b"k" * (1 << 20)
    assert producer.worker_pids() == [pid]


def test_slow_clients_do_not_delay_others(serve) -> None:
    producer = serve(handlers.echo, processes=1, read_timeout=30)
    stalled = [connect(producer.address) for _ in range(20)]
    try:
        for sock in stalled:
            sock.sendall(struct.pack("!I", 1000) + b"partial")
        started = time.monotonic()
        for i in range(20):
            assert raw_request(producer.address, b"%d" % i) == b"%d" % i
        assert time.monotonic() - started < 10
    finally:
        for sock in stalled:
            sock.close()


def test_early_disconnects_cost_nothing(serve) -> None:
    producer = serve(handlers.behave, processes=1)
    (pid,) = producer.worker_pids()
    for cut in (0, 2, 4, 9):
        with connect(producer.address) as sock:
            sock.sendall(pack(b"echo:partial!")[:cut])
    # A client that sends a request and resets before the reply.
    with connect(producer.address) as sock:
        sock.sendall(pack(b"sleep:0.2"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert request(producer.address, b"pid", timeout=10) == str(pid).encode()
    assert producer.worker_pids() == [pid]
    assert wait_until(lambda: outstanding(producer) == 0)


def test_disconnected_client_queued_request_is_dropped(serve) -> None:
    producer = serve(handlers.behave, processes=1)
    busy = threading.Thread(target=request, args=(producer.address, b"sleep:0.5", 10))
    busy.start()
    try:
        assert wait_until(lambda: outstanding(producer) == 1)
        with connect(producer.address) as sock:
            sock.sendall(pack(b"sleep:5"))
            assert wait_until(lambda: producer.stats()["queued"] == 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The queued 5 s job is gone, never run.
        assert wait_until(lambda: producer.stats()["queued"] == 0)
    finally:
        busy.join(20)
    started = time.monotonic()
    assert request(producer.address, b"echo:next", timeout=10) == b"next"
    assert time.monotonic() - started < 3


def test_bytes_after_request_reset_the_connection(serve) -> None:
    producer = serve(handlers.behave, processes=1)
    with connect(producer.address) as sock:
        sock.sendall(pack(b"sleep:0.3") + b"junk")
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)


def test_overload_refuses_at_once(serve) -> None:
    producer = serve(handlers.behave, processes=1, max_queue=1)
    threads = [
        threading.Thread(target=request, args=(producer.address, b"sleep:1", 20)) for _ in range(2)
    ]
    for t in threads:
        t.start()
    # One running, one queued: the queue is full.
    assert wait_until(lambda: producer.stats()["queued"] == 1)
    started = time.monotonic()
    assert_reset(producer.address, b"echo:too many")
    assert time.monotonic() - started < 0.9  # refused, not queued behind the 1 s job
    for t in threads:
        t.join(20)
    assert request(producer.address, b"echo:ok", timeout=10) == b"ok"


def test_max_connections_resets_extra_connections(serve) -> None:
    producer = serve(handlers.echo, processes=1, max_connections=5)
    held = [connect(producer.address) for _ in range(5)]
    try:
        for sock in held:
            sock.sendall(b"\x00")  # make sure each was accepted and counted
        assert_reset(producer.address, b"sixth")
    finally:
        for sock in held:
            sock.close()


def test_two_hundred_simultaneous_connections_each_get_their_own_reply(serve) -> None:
    producer = serve(handlers.behave, processes=2)
    host, port = producer.address

    async def one(i: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(pack(b"echo:%d-%s" % (i, b"x" * (i % 50))))
        await writer.drain()
        reply = await reader.read()
        writer.close()
        return reply

    async def many() -> list[bytes]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 60)

    replies = asyncio.run(many())
    assert replies == [b"%d-%s" % (i, b"x" * (i % 50)) for i in range(200)]


def test_long_request_never_holds_up_a_short_one(serve) -> None:
    """Only idle workers get work: the short request is not queued behind the long."""
    producer = serve(handlers.behave, processes=2)
    long = threading.Thread(target=request, args=(producer.address, b"sleep:2", 20))
    long.start()
    try:
        assert wait_until(lambda: producer.stats()["in_flight"] == 1)
        for _ in range(10):
            started = time.monotonic()
            assert request(producer.address, b"echo:short", timeout=10) == b"short"
            assert time.monotonic() - started < 1.5
    finally:
        long.join(20)

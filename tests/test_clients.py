"""The v2 clients: blocking `Client`, `gaspar.aio`, typed errors, never a hang."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

import gaspar
from gaspar import aio
from gaspar.client import Client, request
from gaspar.clientcore import RequestIds
from gaspar.protocol import MAGIC_V2
from tests import handlers
from tests.conftest import wait_until


@pytest.fixture
def producer(serve) -> gaspar.Producer:
    return serve(handlers.behave, processes=2, timeout=1.0, max_message_size=1000)


class FakeServer:
    """A listening socket whose connections are handled by `behaviour` in a thread."""

    def __init__(self, behaviour) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.address = self.listener.getsockname()
        self.behaviour = behaviour
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self.listener.accept()
                with conn:
                    self.behaviour(conn)
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake() -> Iterator[list[FakeServer]]:
    servers: list[FakeServer] = []
    yield servers
    for server in servers:
        server.close()


def v1_only_echo(conn: socket.socket) -> None:
    """An original-protocol server: reads a length and that many bytes, echoes, closes."""
    data = b""
    while len(data) < 4:
        data += conn.recv(4 - len(data))
    (length,) = struct.unpack("!I", data)
    payload = b""
    while len(payload) < min(length, 1 << 20):
        chunk = conn.recv(65536)
        if not chunk:
            return
        payload += chunk
    conn.sendall(payload)


def read_then_close(conn: socket.socket) -> None:
    conn.recv(1000)  # the request arrives; the server goes away without a reply


def read_then_reset(conn: socket.socket) -> None:
    conn.recv(1000)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- blocking Client ---------------------------------------------------------


def test_client_reuses_its_connection(producer) -> None:
    with Client(producer.address) as client:
        for i in range(50):
            assert client.request(b"echo:%d" % i) == b"%d" % i
        assert len(client._idle) == 1
        conn = client._idle[0]
        client.request(b"echo:again")
        assert client._idle == [conn]


def test_client_typed_errors(producer) -> None:
    with Client(producer.address, timeout=10) as client:
        with pytest.raises(gaspar.HandlerError) as info:
            client.request(b"raise:bad thing")
        assert info.value.remote_type == "ValueError"
        assert info.value.remote_message == "bad thing"
        with pytest.raises(gaspar.RequestTimeout):
            client.request(b"spin")
        with pytest.raises(gaspar.WorkerLost):
            client.request(b"kill")
        with pytest.raises(gaspar.MessageTooLarge):
            client.request(b"x" * 1001)
        assert client.request(b"echo:fine") == b"fine"
    with pytest.raises(gaspar.HandlerError):
        request(producer.address, b"raise:one-shot", protocol="v2", timeout=10)
    with pytest.raises(ValueError):
        request(producer.address, b"x", protocol="v3")


def test_client_overloaded_and_shutting_down(serve) -> None:
    busy = serve(handlers.behave, processes=1, max_queue=1)
    with Client(busy.address, timeout=10) as client:
        workers = [threading.Thread(target=client.request, args=(b"sleep:0.5",)) for _ in range(2)]
        for worker in workers:
            worker.start()
        assert wait_until(lambda: busy.stats()["queued"] == 1, timeout=10)
        with pytest.raises(gaspar.Overloaded):
            client.request(b"echo:no room")
        for worker in workers:
            worker.join(10)


def test_client_timeout_closes_the_connection_and_recovers(producer) -> None:
    # Plain v2 (no cancel): the reply may still come, so that socket is never reused.
    with Client(producer.address, deadlines=False) as client:
        started = time.monotonic()
        with pytest.raises(gaspar.RequestTimeout):
            client.request(b"sleep:0.8", timeout=0.2)
        assert time.monotonic() - started < 2
        assert client._idle == []
        assert client.request(b"echo:next", timeout=10) == b"next"


def test_client_timeout_cancels_and_keeps_the_connection(producer) -> None:
    # With control frames the timed-out request is cancelled: the server's one
    # reply for its id (CANCELLED) is dropped, and the connection serves on.
    with Client(producer.address) as client:
        with pytest.raises(gaspar.RequestTimeout):
            client.request(b"sleep:0.8", timeout=0.2)
        (conn,) = client._idle
        assert client.request(b"echo:next", timeout=10) == b"next"
        assert client._idle == [conn]
        assert len(conn.session) == 0  # the cancelled id was answered and is free


def test_client_replaces_a_connection_the_server_closed(serve) -> None:
    producer = serve(handlers.behave, processes=1, idle_timeout=0.2)
    with Client(producer.address, timeout=10) as client:
        assert client.request(b"echo:1") == b"1"
        (conn,) = client._idle
        assert wait_until(lambda: not conn.usable(), timeout=10)  # server closed it
        assert client.request(b"echo:2") == b"2"
        assert client._idle != [conn]


def test_client_shared_by_threads(producer) -> None:
    results: dict[int, bytes] = {}
    with Client(producer.address, timeout=20, pool_size=4) as client:

        def work(n: int) -> None:
            for i in range(20):
                results[n * 100 + i] = client.request(b"echo:%d" % (n * 100 + i))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(client._idle) <= 4
    assert results == {k: b"%d" % k for k in results} and len(results) == 160


def test_server_going_away_mid_request_is_a_clear_error(fake) -> None:
    fake.append(FakeServer(read_then_close))
    started = time.monotonic()
    with pytest.raises(gaspar.ConnectionFailed), Client(fake[0].address) as client:
        client.request(b"x", timeout=10)
    # In v1 a plain close is an empty reply; a server that dies resets instead.
    assert request(fake[0].address, b"x", timeout=10) == b""
    fake.append(FakeServer(read_then_reset))
    with pytest.raises(gaspar.RequestFailed):
        request(fake[1].address, b"x", timeout=10)
    with pytest.raises(gaspar.ConnectionFailed), Client(fake[1].address) as client:
        client.request(b"x", timeout=10)
    assert time.monotonic() - started < 5


def test_one_shot_requests_speak_v1_to_an_original_server(fake) -> None:
    fake.append(FakeServer(v1_only_echo))
    assert request(fake[0].address, b"plain v1", timeout=10) == b"plain v1"
    assert asyncio.run(aio.request(fake[0].address, b"aio v1", timeout=10)) == b"aio v1"
    # v2 against it cannot work; it must fail within the timeout, not hang.
    with pytest.raises(gaspar.RequestFailed), Client(fake[0].address, timeout=0.5) as client:
        client.request(b"x")


def test_connect_refused_is_connection_failed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = s.getsockname()
        with pytest.raises(gaspar.ConnectionFailed), Client(address) as client:
            client.request(b"x", timeout=5)
        with pytest.raises(gaspar.ConnectionFailed):
            asyncio.run(aio.request(address, b"x", timeout=5))
        with pytest.raises(gaspar.ConnectionFailed):
            asyncio.run(_async_client_request(address))


async def _async_client_request(address: tuple[str, int]) -> bytes:
    async with aio.AsyncClient(address, timeout=5) as client:
        return await client.request(b"x")


# -- asyncio -----------------------------------------------------------------


def test_aio_one_shot(producer) -> None:
    async def main() -> None:
        assert await aio.request(producer.address, b"echo:v1", timeout=10) == b"v1"
        assert await aio.request(producer.address, b"echo:v2", protocol="v2") == b"v2"
        with pytest.raises(gaspar.RequestFailed):
            await aio.request(producer.address, b"raise:x", timeout=10)
        with pytest.raises(gaspar.HandlerError):
            await aio.request(producer.address, b"raise:x", timeout=10, protocol="v2")
        with pytest.raises(gaspar.RequestTimeout):
            await aio.request(producer.address, b"sleep:0.5", timeout=0.1)

    asyncio.run(main())


def test_async_client_pipelines_many_requests(producer) -> None:
    async def main() -> None:
        async with aio.AsyncClient(producer.address, timeout=30) as client:
            replies = await asyncio.gather(*(client.request(b"echo:%d" % i) for i in range(1000)))
            assert replies == [b"%d" % i for i in range(1000)]
            assert len([c for c in client._slots if c is not None]) == 1

    asyncio.run(main())


def test_async_client_typed_errors_leave_it_usable(producer) -> None:
    async def main() -> None:
        async with aio.AsyncClient(producer.address, timeout=10) as client:
            results = await asyncio.gather(
                client.request(b"raise:r"),
                client.request(b"spin"),
                client.request(b"exit"),
                client.request(b"y" * 2000),
                client.request(b"echo:ok"),
                return_exceptions=True,
            )
            kinds = [type(r) for r in results]
            assert kinds == [
                gaspar.HandlerError,
                gaspar.RequestTimeout,
                gaspar.WorkerLost,
                gaspar.MessageTooLarge,
                bytes,
            ]
            assert await client.request(b"echo:after") == b"after"

    asyncio.run(main())


def test_cancelled_request_never_gets_delivered_to_another_caller(producer) -> None:
    """With 4 ids, requests reuse every id but the abandoned one until its late reply.

    Plain v2 (no cancel frame), so the late reply is the request's own, 0.5 s on;
    tests/test_deadlines.py has the cancelled case.
    """

    async def main() -> None:
        async with aio.AsyncClient(
            producer.address, timeout=10, max_in_flight=3, deadlines=False
        ) as client:
            assert await client.request(b"echo:open") == b"open"
            (conn,) = [c for c in client._slots if c is not None]
            ids = conn.session.ids = RequestIds(4)  # a small id space: ids wrap at once
            slow = asyncio.ensure_future(client.request(b"sleep:0.5"))
            ready = await asyncio.to_thread(
                wait_until, lambda: producer.stats()["in_flight"] == 1, 10
            )
            assert ready  # the slow request runs in a worker, under id 0
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            assert len(ids) == 1 and ids.waiting == {}  # id 0 stays reserved

            sent = 0

            async def loop(n: int) -> None:
                nonlocal sent
                i = 0
                while len(ids._abandoned) or i < 5:  # until the late reply, and then some
                    message = b"echo:%d-%d" % (n, i)
                    assert await client.request(message) == message[5:]
                    sent += 1
                    i += 1

            await asyncio.wait_for(asyncio.gather(*(loop(n) for n in range(3))), 10)
            assert sent > 3 * ids.size  # every free id was taken many times over
            assert len(ids) == 0  # the late reply came, was dropped, and freed id 0

    asyncio.run(main())


def test_cancelled_one_shot_closes_its_socket(producer) -> None:
    async def main() -> None:
        task = asyncio.ensure_future(aio.request(producer.address, b"sleep:0.5"))
        assert await asyncio.to_thread(wait_until, lambda: producer.stats()["connections"] == 1, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # The server sees the connection go: the client closed it on cancellation.
    assert wait_until(lambda: producer.stats()["connections"] == 0, timeout=10)


def test_async_client_server_going_away(fake) -> None:
    fake.append(FakeServer(read_then_close))

    async def main() -> None:
        async with aio.AsyncClient(fake[0].address, timeout=10) as client:
            with pytest.raises(gaspar.ConnectionFailed):
                await client.request(b"x")

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 5


def test_async_client_reconnects_after_losing_its_connection(serve) -> None:
    producer = serve(handlers.behave, processes=1, idle_timeout=0.2)

    async def main() -> None:
        async with aio.AsyncClient(producer.address, timeout=10) as client:
            assert await client.request(b"echo:1") == b"1"
            (conn,) = [c for c in client._slots if c is not None]
            deadline = time.monotonic() + 10
            while conn.lost is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # poll interval, bounded by the deadline
            assert conn.lost is not None  # the server closed the idle connection
            assert await client.request(b"echo:2") == b"2"

    asyncio.run(main())


def test_app_calls_through_both_clients(serve) -> None:
    from tests.app_example import app

    producer = serve(app, processes=1)
    with Client(producer.address, timeout=10) as client:
        assert client.call("echo", {"k": [1, b"b", "s"]}) == {"k": [1, b"b", "s"]}
        assert client.call("kwargs", 1, timeout=3) == {"args": [1], "kwargs": {"timeout": 3}}
        with pytest.raises(gaspar.UnknownTask):
            client.call("no such task")
        with pytest.raises(gaspar.HandlerError, match="boom"):
            client.call("fail", "boom")

    async def main() -> None:
        async with aio.AsyncClient(producer.address, timeout=10) as client:
            assert await client.call("add", 2, b=3) == 5
            with pytest.raises(gaspar.BadArguments):
                await client.call("add", 1)

    asyncio.run(main())


def test_closing_a_busy_async_client_drops_its_queued_requests(serve) -> None:
    producer = serve(handlers.behave, processes=1)

    def outstanding() -> int:
        stats = producer.stats()
        return int(stats["queued"] + stats["in_flight"])

    async def main() -> None:
        client = aio.AsyncClient(producer.address, timeout=30)
        tasks = [asyncio.ensure_future(client.request(b"sleep:1")) for _ in range(5)]
        ready = await asyncio.to_thread(wait_until, lambda: outstanding() == 5, 10)
        assert ready
        await client.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, gaspar.ConnectionFailed) for r in results)

    started = time.monotonic()
    asyncio.run(main())
    # The four queued requests are dropped, not run for nobody: only the running
    # one (1 s) is left, where running all five would take 5 s.
    assert wait_until(lambda: outstanding() == 0, timeout=10)
    assert time.monotonic() - started < 3


# -- AsyncClient: connections, limits, closing -------------------------------


def test_async_client_spreads_requests_over_its_connections(producer) -> None:
    async def main() -> None:
        async with aio.AsyncClient(producer.address, connections=3, timeout=30) as client:
            replies = await asyncio.gather(*(client.request(b"echo:%d" % i) for i in range(90)))
            assert replies == [b"%d" % i for i in range(90)]
            conns = [c for c in client._slots if c is not None]
            assert len({id(c) for c in conns}) == 3
            assert producer.stats()["connections"] == 3  # three sockets, as the server sees

    asyncio.run(main())


def test_async_client_max_in_flight_is_per_connection(producer) -> None:
    """Two connections, one request each: a third request waits, never doubles up on one."""

    async def main() -> None:
        async with aio.AsyncClient(
            producer.address, connections=2, max_in_flight=1, timeout=30
        ) as client:
            long = asyncio.ensure_future(client.request(b"sleep:3"))
            running = await asyncio.to_thread(
                wait_until, lambda: producer.stats()["in_flight"] == 1, 10
            )
            assert running
            assert await client.request(b"echo:first") == b"first"
            # The long request holds one connection; the next must take the other.
            second = asyncio.ensure_future(client.request(b"sleep:0.5"))
            both = await asyncio.to_thread(
                wait_until, lambda: producer.stats()["in_flight"] == 2, 10
            )
            assert both
            loads = sorted(c.load for c in client._slots if c is not None)
            assert loads == [1, 1]
            assert await second == b"slept:0.5"
            assert not long.done()
            long.cancel()

    asyncio.run(main())


def test_closing_an_async_client_while_it_connects_leaks_nothing() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # the kernel completes the handshake; nobody accepts yet

        async def main() -> None:
            client = aio.AsyncClient(listener.getsockname(), timeout=10)
            task = asyncio.ensure_future(client.request(b"x"))
            while client._connecting[0] is None:
                await asyncio.sleep(0)  # until the request has started to connect
            await client.close()
            with pytest.raises(gaspar.ConnectionFailed):
                await task
            for _ in range(10):
                await asyncio.sleep(0)  # let every callback of the connect run
            assert client._slots == [None]

        asyncio.run(main())
        listener.settimeout(5)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return  # closed before it connected: nothing to leak
        with conn:
            conn.settimeout(5)
            data = b""
            while chunk := conn.recv(100):  # the preamble, then EOF: the client let go
                data += chunk
            assert data in (b"", MAGIC_V2)


@pytest.mark.parametrize("which", ["Client", "AsyncClient", "request", "aio.request"])
def test_max_reply_size_over_v2(serve, which: str) -> None:
    producer = serve(handlers.echo, processes=1)
    address = producer.address

    def call(message: bytes, limit: int) -> bytes:
        if which == "Client":
            with Client(address, timeout=10, max_reply_size=limit) as client:
                return client.request(message)
        if which == "request":
            return request(address, message, timeout=10, protocol="v2", max_reply_size=limit)

        async def main() -> bytes:
            if which == "aio.request":
                return await aio.request(
                    address, message, timeout=10, protocol="v2", max_reply_size=limit
                )
            async with aio.AsyncClient(address, timeout=10, max_reply_size=limit) as client:
                return await client.request(message)

        return asyncio.run(main())

    assert call(b"x" * 999, 999) == b"x" * 999
    with pytest.raises(gaspar.MessageTooLarge, match="reply too large"):
        call(b"x" * 1000, 999)


def test_messages_print_an_ipv6_server_in_brackets(serve) -> None:
    try:
        producer = serve(handlers.behave, processes=1, host="::1")
    except gaspar.StartupError:
        pytest.skip("no IPv6 loopback")
    port = producer.address[1]
    where = f"[::1]:{port}"
    with pytest.raises(gaspar.HandlerError) as info, Client(("::1", port), timeout=10) as c:
        c.request(b"raise:v6")
    assert str(info.value).startswith(where + ": ")
    with pytest.raises(gaspar.MessageTooLarge) as too_large:
        request(where, b"echo:xx", timeout=10, max_reply_size=1)
    assert str(too_large.value).startswith(where + ": ")

    async def main() -> None:
        async with aio.AsyncClient(where, timeout=10) as client:
            with pytest.raises(gaspar.HandlerError) as info:
                await client.request(b"raise:v6")
            assert str(info.value).startswith(where + ": ")
        with pytest.raises(gaspar.RequestTimeout) as late:
            await aio.request(where, b"sleep:2", timeout=0.2)
        assert str(late.value).startswith(where + ": ")

    asyncio.run(main())

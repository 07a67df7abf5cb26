"""Protocol v2 on the server, spoken with nothing but socket and struct.

`MinimalClient` is written from docs/protocol.md alone, as a client in another
language would be: it imports nothing from gaspar.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

import gaspar
from tests import handlers
from tests.conftest import read_to_eof, wait_until

PREAMBLE = b"\xffGS\x02"


class MinimalClient:
    """A v2 client from the spec page: preamble, request frames, reply frames."""

    def __init__(
        self, address: tuple[str, int], timeout: float = 10.0, preamble: bytes = PREAMBLE
    ) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.sendall(preamble)
        self.buf = b""
        assert self._exactly(4) == preamble

    def send(self, request_id: int, payload: bytes) -> None:
        self.sock.sendall(struct.pack("!II", request_id, len(payload)) + payload)

    def reply(self) -> tuple[int, int, bytes]:
        request_id, status, length = struct.unpack("!IBI", self._exactly(9))
        return request_id, status, self._exactly(length)

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def close(self) -> None:
        self.sock.close()


OK, HANDLER_ERROR, TIMEOUT, WORKER_LOST, OVERLOADED, TOO_LARGE, BAD_REQUEST, SHUTTING_DOWN = range(
    8
)


@pytest.fixture
def two_workers(serve) -> gaspar.Producer:
    return serve(handlers.behave, processes=2, timeout=1.0)


def test_pipelined_replies_come_in_completion_order(two_workers) -> None:
    client = MinimalClient(two_workers.address)
    client.send(1, b"sleep:0.5")
    client.send(2, b"echo:c")
    assert client.reply() == (2, OK, b"c")
    assert client.reply() == (1, OK, b"slept:0.5")
    # The connection carries on: many more requests, each with its own reply.
    for i in range(100, 150):
        client.send(i, b"echo:%d" % i)
    replies = {client.reply() for _ in range(50)}
    assert replies == {(i, OK, b"%d" % i) for i in range(100, 150)}
    client.close()


def test_every_failure_has_its_status(two_workers) -> None:
    client = MinimalClient(two_workers.address)
    client.send(1, b"raise:bad input")
    assert client.reply() == (1, HANDLER_ERROR, b"ValueError: bad input")
    client.send(2, b"spin")
    assert client.reply()[:2] == (2, TIMEOUT)
    client.send(3, b"exit")
    assert client.reply()[:2] == (3, WORKER_LOST)
    client.send(4, b"badtype")
    rid, status, body = client.reply()
    assert (rid, status) == (4, HANDLER_ERROR) and body.startswith(b"TypeError")
    client.send(5, b"echo:still here")
    assert client.reply() == (5, OK, b"still here")
    client.close()


def test_large_requests_pipelined_with_small_ones(two_workers) -> None:
    client = MinimalClient(two_workers.address, timeout=30)
    payloads = {
        1: b"echo:" + bytes(range(256)) * 4096,
        2: b"echo:small",
        3: b"echo:" + b"\x07" * (3 << 20),
        4: b"echo:" + b"\x09" * (1 << 18),
    }
    try:
        data = b"".join(struct.pack("!II", i, len(p)) + p for i, p in payloads.items())

        def send() -> None:  # while the replies are read, or the server would stop reading
            for i in range(0, len(data), 200_000):
                client.sock.sendall(data[i : i + 200_000])

        sender = threading.Thread(target=send)
        sender.start()
        replies = {}
        for _ in payloads:
            rid, status, body = client.reply()
            replies[rid] = (status, body)
        sender.join(30)
        assert replies == {i: (OK, p[5:]) for i, p in payloads.items()}
    finally:
        client.close()


def test_too_large_is_skipped_and_the_connection_stays_usable(serve) -> None:
    producer = serve(handlers.echo, processes=1, max_message_size=1000)
    client = MinimalClient(producer.address)
    client.send(7, b"x" * 5000)
    client.send(8, b"y" * 1000)
    assert client.reply()[:2] == (7, TOO_LARGE)
    assert client.reply() == (8, OK, b"y" * 1000)
    client.close()


def test_duplicate_id_in_flight_resets_the_connection(two_workers) -> None:
    """A reused id is a connection error: no reply for either request, then a reset."""
    client = MinimalClient(two_workers.address)
    client.send(2, b"echo:answered first")
    assert client.reply() == (2, OK, b"answered first")
    client.send(1, b"sleep:0.3")
    client.send(1, b"echo:dup")
    with pytest.raises(ConnectionResetError):
        client.reply()
    client.close()
    assert wait_until(lambda: two_workers.stats()["connections"] == 0)
    assert two_workers.stats()["requests"]["bad_request"] == 0
    # An id may be reused once its reply has arrived, and a new connection works.
    client = MinimalClient(two_workers.address)
    client.send(1, b"echo:a")
    assert client.reply() == (1, OK, b"a")
    client.send(1, b"echo:reused after its reply")
    assert client.reply() == (1, OK, b"reused after its reply")
    client.close()


def test_pipeline_and_queue_limits_answer_overloaded(serve) -> None:
    producer = serve(handlers.behave, processes=1, max_pipeline=2, max_queue=100)
    client = MinimalClient(producer.address)
    for i in range(3):
        client.send(i, b"sleep:0.2")
    assert client.reply()[:2] == (2, OVERLOADED)
    assert sorted(client.reply() for _ in range(2)) == [
        (0, OK, b"slept:0.2"),
        (1, OK, b"slept:0.2"),
    ]
    client.close()

    producer = serve(handlers.behave, processes=1, max_queue=1)
    client = MinimalClient(producer.address)
    for i in range(3):  # one runs, one waits, the third finds the queue full
        client.send(i, b"sleep:0.2")
    assert client.reply()[:2] == (2, OVERLOADED)
    client.close()


def test_error_body_is_the_type_name_alone_when_the_message_is_empty(two_workers) -> None:
    client = MinimalClient(two_workers.address)
    client.send(0, b"raise:")  # id 0 is an id like any other
    assert client.reply() == (0, HANDLER_ERROR, b"ValueError")
    client.send(1, b"raise:a: b")
    assert client.reply()[2].split(b": ", 1) == [b"ValueError", b"a: b"]
    # 80,001 bytes of message, "ValueError: x" then two-byte characters: cut at 64 KiB, the
    # byte limit falls inside a character, and the cut is made before it.
    client.send(2, b"raise:x" + "\u00e9".encode() * 40_000)
    rid, status, body = client.reply()
    assert (rid, status) == (2, HANDLER_ERROR) and len(body) == 65535
    assert body.decode("utf-8").startswith("ValueError: x\u00e9")
    client.close()


def test_connection_carries_on_after_overloaded(serve) -> None:
    producer = serve(handlers.behave, processes=1, max_pipeline=1)
    client = MinimalClient(producer.address)
    client.send(1, b"sleep:0.2")
    client.send(2, b"echo:refused")
    assert client.reply()[:2] == (2, OVERLOADED)
    assert client.reply() == (1, OK, b"slept:0.2")
    client.send(2, b"echo:now")
    assert client.reply() == (2, OK, b"now")
    client.close()


def test_truncated_frame_then_half_close_answers_the_complete_ones(two_workers) -> None:
    client = MinimalClient(two_workers.address)
    client.send(1, b"sleep:0.2")
    client.send(2, b"echo:whole")
    client.sock.sendall(struct.pack("!II", 3, 100) + b"cut short")
    client.sock.shutdown(socket.SHUT_WR)
    assert {client.reply() for _ in range(2)} == {(1, OK, b"slept:0.2"), (2, OK, b"whole")}
    with pytest.raises(EOFError):  # a clean close: the cut frame is never answered
        client.reply()
    client.close()


def test_half_close_gets_every_reply_then_eof(two_workers) -> None:
    client = MinimalClient(two_workers.address)
    for i in range(5):
        client.send(i, b"echo:%d" % i)
    client.sock.shutdown(socket.SHUT_WR)
    assert {client.reply() for _ in range(5)} == {(i, OK, b"%d" % i) for i in range(5)}
    assert client.sock.recv(10) == b""
    client.close()


def test_stop_answers_in_flight_then_shutting_down(serve) -> None:
    producer = serve(handlers.behave, processes=1)
    client = MinimalClient(producer.address)
    client.send(1, b"sleep:0.3")
    client.send(2, b"sleep:30")  # queued behind the first
    assert wait_until(lambda: producer.stats()["queued"] == 1)
    stopper = threading.Thread(target=producer.stop, kwargs={"grace": 1.0})
    stopper.start()
    assert client.reply() == (1, OK, b"slept:0.3")
    assert client.reply()[:2] == (2, SHUTTING_DOWN)
    stopper.join(30)
    with pytest.raises((EOFError, ConnectionResetError)):
        client.reply()
    client.close()


def test_partial_frame_is_dropped_after_read_timeout(serve) -> None:
    producer = serve(handlers.echo, processes=1, read_timeout=0.4)
    client = MinimalClient(producer.address)
    client.sock.sendall(struct.pack("!II", 1, 100) + b"part")
    with pytest.raises(ConnectionResetError):
        client.reply()
    client.close()


def test_idle_connection_is_closed(serve) -> None:
    producer = serve(handlers.echo, processes=1, idle_timeout=0.3)
    client = MinimalClient(producer.address)
    client.send(1, b"a")
    assert client.reply() == (1, OK, b"a")
    started = time.monotonic()
    with pytest.raises(EOFError):
        client.reply()
    assert time.monotonic() - started < 5
    client.close()


def test_v1_still_works_beside_v2(two_workers) -> None:
    v2 = MinimalClient(two_workers.address)
    v2.send(1, b"echo:two")
    with socket.create_connection(two_workers.address, timeout=10) as v1:
        v1.sendall(struct.pack("!I", 8) + b"echo:one")
        assert read_to_eof(v1) == b"one"
    assert v2.reply() == (1, OK, b"two")
    v2.close()


def test_v1_length_that_starts_like_the_preamble_is_refused(two_workers) -> None:
    with socket.create_connection(two_workers.address, timeout=10) as sock:
        sock.sendall(b"\xffGS\x01")
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)


def test_preamble_split_across_writes(two_workers) -> None:
    with socket.create_connection(two_workers.address, timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in PREAMBLE:
            sock.sendall(bytes([byte]))
        sock.sendall(struct.pack("!II", 9, 6) + b"echo:s")
        data = b""
        while len(data) < 4 + 9 + 1:
            data += sock.recv(100)
        assert data == PREAMBLE + struct.pack("!IBI", 9, OK, 1) + b"s"

"""Deadlines and cancel over v2 (control frames), on a real server with real workers.

`ControlClient` is written from docs/protocol.md ("Control frames") alone, with
socket and struct.  The handler `record` writes every request it runs to a
file, so a test can prove that a request never ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gaspar
from gaspar import aio
from gaspar.protocol import Status
from tests.conftest import wait_until
from tests.test_v2 import MinimalClient

PLAIN = b"\xffGS\x02"
CONTROL = b"\xffGS\x82"
CANCELLED = 8


def record(message: bytes) -> bytes:
    """`LOG|tag` appends tag to LOG and returns it; `LOG|tag|STARTED|RELEASE` also holds
    the worker: it creates STARTED, then runs until RELEASE exists (30 s at most)."""
    parts = message.decode().split("|")
    log, tag = parts[0], parts[1]
    with open(log, "a") as f:
        f.write(tag + "\n")
    if len(parts) == 4:
        Path(parts[2]).touch()
        deadline = time.monotonic() + 30
        while not os.path.exists(parts[3]) and time.monotonic() < deadline:
            time.sleep(0.01)  # handler: simulated work that lasts until the test releases it
    return tag.encode()


class ControlClient(MinimalClient):
    """A v2 client that opens with the control preamble and sends control frames."""

    def __init__(self, address: tuple[str, int], preamble: bytes = CONTROL) -> None:
        super().__init__(address, preamble=preamble)

    def send_timed(self, rid: int, ms: int, payload: bytes) -> None:
        self.sock.sendall(struct.pack("!III", rid, 0x82000000 | ms, len(payload)) + payload)

    def cancel(self, rid: int) -> None:
        self.sock.sendall(struct.pack("!II", rid, 0x81000000))

    def reply(self, timeout: float = 10) -> tuple[int, int, bytes]:
        self.sock.settimeout(timeout)
        return super().reply()


class Record:
    """The files of one test: the handler's log, and the hold's started and release files."""

    def __init__(self, base: Path) -> None:
        self.log = base / "ran.log"
        self.started = base / "started"
        self.release_file = base / "release"

    def tag(self, tag: str) -> bytes:
        return f"{self.log}|{tag}".encode()

    def hold(self, tag: str = "hold") -> bytes:
        return f"{self.log}|{tag}|{self.started}|{self.release_file}".encode()

    def release(self) -> None:
        self.release_file.touch()

    def ran(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []


@pytest.fixture
def rec(tmp_path: Path) -> Iterator[Record]:
    r = Record(tmp_path)
    yield r
    r.release()  # a hold left by a failed test ends


@pytest.fixture
def one_worker(serve) -> gaspar.Producer:
    return serve(record, processes=1, timeout=60)


def test_queued_request_past_its_deadline_gets_timeout_and_never_runs(one_worker, rec) -> None:
    c = ControlClient(one_worker.address)
    try:
        c.send(1, rec.hold())
        assert wait_until(rec.started.exists, timeout=10)
        c.send_timed(2, 200, rec.tag("late"))  # queued behind the hold
        c.send_timed(3, 30_000, rec.tag("in-time"))  # queued too, with time to spare
        rid, status, body = c.reply()
        assert (rid, status) == (2, Status.TIMEOUT)
        assert body == b"deadline passed before the request ran"
        assert one_worker.stats()["requests"]["timeout"] == 1
        rec.release()
        assert sorted([c.reply()[:2], c.reply()[:2]]) == [(1, Status.OK), (3, Status.OK)]
        c.send(2, rec.tag("after"))  # the id is free again
        assert c.reply() == (2, Status.OK, b"after")
    finally:
        c.close()
    assert rec.ran() == ["hold", "in-time", "after"]  # "late" never ran


@pytest.mark.timeout(30)
def test_a_queued_request_with_less_time_left_than_a_run_takes_is_not_run(one_worker, rec) -> None:
    """Taken from the queue with 0.8 s left, by a handler whose runs take 2 s: it would
    finish after its client gave up, so it fails TIMEOUT at once, unrun, as the queue
    moves on."""
    c = ControlClient(one_worker.address)
    try:
        c.send(1, rec.hold())
        assert wait_until(rec.started.exists, timeout=10)
        sent = time.monotonic()
        c.send_timed(2, 3000, rec.tag("too-near"))
        c.send_timed(3, 30_000, rec.tag("in-time"))
        # The hold runs 2.2 s (the handler's peak run time from now on), then ends.
        assert wait_until(lambda: time.monotonic() - sent > 2.2, timeout=5)
        rec.release()
        replies = {}
        for _ in range(3):
            rid, status, body = c.reply()
            replies[rid] = (status, body)
            if rid == 2:
                assert time.monotonic() - sent < 3.0  # before the deadline itself
        assert replies == {
            1: (Status.OK, b"hold"),
            2: (Status.TIMEOUT, b"deadline too near for the request to finish: not run"),
            3: (Status.OK, b"in-time"),
        }
    finally:
        c.close()
    assert rec.ran() == ["hold", "in-time"]  # "too-near" never ran


def test_deadline_zero_fails_at_once_and_met_deadline_runs(one_worker, rec) -> None:
    c = ControlClient(one_worker.address)
    try:
        c.send_timed(1, 0, rec.tag("zero"))
        assert c.reply()[:2] == (1, Status.TIMEOUT)
        c.send_timed(2, 5000, rec.tag("idle-worker"))  # taken at once: no timer at all
        assert c.reply() == (2, Status.OK, b"idle-worker")
    finally:
        c.close()
    assert rec.ran() == ["idle-worker"]


def test_cancel_of_a_queued_request_drops_it(one_worker, rec) -> None:
    c = ControlClient(one_worker.address)
    try:
        c.send(1, rec.hold())
        assert wait_until(rec.started.exists, timeout=10)
        c.send_timed(2, 30_000, rec.tag("dropped"))
        c.send(3, rec.tag("dropped-too"))  # cancel works on plain requests too
        c.cancel(2)
        c.cancel(3)
        assert c.reply() == (2, CANCELLED, b"cancelled before it ran")
        assert c.reply() == (3, CANCELLED, b"cancelled before it ran")
        c.send(2, rec.tag("reused"))  # free once its CANCELLED came
        rec.release()
        assert sorted([c.reply(), c.reply()]) == [
            (1, Status.OK, b"hold"),
            (2, Status.OK, b"reused"),
        ]
    finally:
        c.close()
    assert rec.ran() == ["hold", "reused"]
    stats = one_worker.stats()
    assert stats["queued"] == 0 and stats["requests"]["cancelled"] == 2
    assert stats["requests"]["ok"] == 2  # each request counted once


def test_cancel_of_a_running_request_discards_its_reply(one_worker, rec) -> None:
    c = ControlClient(one_worker.address)
    try:
        c.send(1, rec.hold())
        assert wait_until(rec.started.exists, timeout=10)
        c.cancel(1)
        rid, status, body = c.reply()  # at once, while it still runs
        assert (rid, status) == (1, CANCELLED) and b"discarded" in body
        c.send(1, rec.tag("second"))  # id 1 reused while the first still runs
        rec.release()
        # The one reply for the new id 1 is its own, never the held request's.
        assert c.reply() == (1, Status.OK, b"second")
        c.send(9, rec.tag("last"))
        assert c.reply() == (9, Status.OK, b"last")  # nothing stray came before it
    finally:
        c.close()
    assert rec.ran() == ["hold", "second", "last"]
    assert one_worker.stats()["requests"]["ok"] == 2  # the discarded reply is not counted


def test_cancel_of_an_id_not_in_flight_is_ignored(one_worker, rec) -> None:
    c = ControlClient(one_worker.address)
    try:
        c.send(1, rec.tag("a"))
        assert c.reply() == (1, Status.OK, b"a")
        c.cancel(1)  # its reply came already
        c.cancel(77)  # never sent
        c.send(2, rec.tag("b"))
        assert c.reply() == (2, Status.OK, b"b")
    finally:
        c.close()


def test_unknown_control_kind_resets_the_connection(one_worker) -> None:
    c = ControlClient(one_worker.address)
    try:
        c.sock.sendall(struct.pack("!II", 1, 0xFF000000))  # kind 127: none
        with pytest.raises((ConnectionResetError, EOFError)):
            c.reply()
    finally:
        c.close()


def test_plain_connection_keeps_the_old_meaning_of_those_bytes(one_worker, rec) -> None:
    """A client that knows nothing of control frames: same preamble back, same rules."""
    c = ControlClient(one_worker.address, preamble=PLAIN)
    try:
        c.send(1, rec.tag("plain"))
        assert c.reply() == (1, Status.OK, b"plain")
        c.sock.sendall(struct.pack("!II", 2, 0x81000000))  # a cancel's bytes: a length here
        rid, status, _ = c.reply()
        assert (rid, status) == (2, Status.TOO_LARGE)
    finally:
        c.close()


def test_async_client_sends_deadlines_and_cancels(one_worker, rec) -> None:
    async def main() -> None:
        async with aio.AsyncClient(one_worker.address, timeout=10) as client:
            hold = asyncio.ensure_future(client.request(rec.hold()))
            assert await asyncio.to_thread(wait_until, rec.started.exists, 10)
            with pytest.raises(gaspar.RequestTimeout):
                await client.request(rec.tag("timed-out"), timeout=0.3)
            task = asyncio.ensure_future(client.request(rec.tag("cancelled")))
            assert await asyncio.to_thread(
                wait_until, lambda: one_worker.stats()["queued"] == 1, 10
            )
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The server dropped both: nothing queued behind the hold.
            assert await asyncio.to_thread(
                wait_until, lambda: one_worker.stats()["queued"] == 0, 10
            )
            (conn,) = [c for c in client._slots if c is not None]
            assert await asyncio.to_thread(wait_until, lambda: len(conn.session) == 1, 10)
            rec.release()
            assert await hold == b"hold"
            assert await client.request(rec.tag("after")) == b"after"
            assert len(conn.session) == 0

    asyncio.run(main())
    assert rec.ran() == ["hold", "after"]


def test_blocking_client_sends_deadlines_and_cancels(one_worker, rec) -> None:
    with gaspar.Client(one_worker.address, timeout=10) as client:
        results: list[bytes] = []
        holder = threading.Thread(target=lambda: results.append(client.request(rec.hold())))
        holder.start()
        try:
            assert wait_until(rec.started.exists, timeout=10)
            with pytest.raises(gaspar.RequestTimeout):
                client.request(rec.tag("timed-out"), timeout=0.3)
            # Dropped by the server (its cancel, or its deadline, whichever came first).
            assert wait_until(lambda: one_worker.stats()["queued"] == 0, timeout=10)
        finally:
            rec.release()
            holder.join(10)
        assert results == [b"hold"]
        assert client.request(rec.tag("after")) == b"after"
        assert len(client._idle) == 2  # the timed-out call's connection was kept
    assert rec.ran() == ["hold", "after"]


class FakeServer:
    """A v2 server on a thread, from the spec: it records the frames a client sends.

    `control`: it takes control frames (answers the control preamble) or, like
    a server from before them, resets a connection that opens with it.
    """

    def __init__(self, control: bool, reply: bool = True) -> None:
        self.control = control
        self.reply = reply
        self.preambles: list[bytes] = []
        self.frames: list[tuple[int, int, int]] = []  # id, length word, deadline ms or -1
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                sock, _ = self.listener.accept()
                threading.Thread(target=self._conn, args=(sock,), daemon=True).start()

    def _conn(self, sock: socket.socket) -> None:
        sock.settimeout(20)
        with sock, contextlib.suppress(OSError, EOFError):
            preamble = self._exactly(sock, 4)
            self.preambles.append(preamble)
            if preamble != PLAIN and not (self.control and preamble == CONTROL):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return  # what an older server does: a reset
            sock.sendall(preamble)
            while True:
                rid, word = struct.unpack("!II", self._exactly(sock, 8))
                if word == 0x81000000 and preamble == CONTROL:
                    self.frames.append((rid, word, -1))
                    sock.sendall(struct.pack("!IBI", rid, CANCELLED, 0))
                    continue
                ms = -1
                if word >> 24 == 0x82 and preamble == CONTROL:
                    ms = word & 0xFFFFFF
                    (word,) = struct.unpack("!I", self._exactly(sock, 4))
                payload = self._exactly(sock, word)
                self.frames.append((rid, word, ms))
                if self.reply:
                    sock.sendall(struct.pack("!IBI", rid, 0, len(payload)) + payload)

    @staticmethod
    def _exactly(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("kind", ["blocking", "async"])
def test_clients_put_their_timeout_on_the_wire_and_cancel(kind: str) -> None:
    server = FakeServer(control=True, reply=False)
    try:
        if kind == "blocking":
            with gaspar.Client(server.address) as client:
                with pytest.raises(gaspar.RequestTimeout):
                    client.request(b"abc", timeout=0.5)
                assert len(client._idle) == 1  # kept: its cancel went out whole
        else:

            async def main() -> None:
                async with aio.AsyncClient(server.address) as client:
                    with pytest.raises(gaspar.RequestTimeout):
                        await client.request(b"abc", timeout=0.5)

            asyncio.run(main())
        assert wait_until(lambda: len(server.frames) == 2, timeout=10)
        (rid, length, ms), (cancel_id, word, _) = server.frames
        assert server.preambles == [CONTROL]
        assert length == 3 and 0 < ms <= 500
        assert (cancel_id, word) == (rid, 0x81000000)
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["blocking", "async"])
def test_clients_fall_back_to_plain_v2_on_an_older_server(kind: str) -> None:
    server = FakeServer(control=False)
    try:
        if kind == "blocking":
            with gaspar.Client(server.address, timeout=10) as client:
                assert client.request(b"one") == b"one"
                assert client.request(b"two") == b"two"
                assert client.deadlines is False
        else:

            async def main() -> None:
                async with aio.AsyncClient(server.address, timeout=10) as client:
                    assert await client.request(b"one") == b"one"
                    assert client.deadlines is False

            asyncio.run(main())
        assert server.preambles == [CONTROL, PLAIN]  # one try, then plain for good
        assert all(ms == -1 for _, _, ms in server.frames)
    finally:
        server.close()

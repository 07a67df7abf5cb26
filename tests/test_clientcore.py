"""The client core without sockets (bytes in, replies out), and the end-of-stream check."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import threading

import pytest

import gaspar
from gaspar import aio, clientcore
from gaspar.clientcore import ClientSession, RequestIds, V1Exchange, classify, deadline_ms
from gaspar.protocol import (
    MAGIC_V2,
    MAGIC_V2_CONTROL,
    MAX_DEADLINE_MS,
    REQUEST_V2,
    SPLIT_WRITE,
    LimitExceeded,
    ProtocolError,
    Status,
    pack_cancel_v2,
    pack_reply_v2,
    pack_timed_request_v2,
)


def test_v1_exchange_frames_limits_and_checks_the_end() -> None:
    v1 = V1Exchange("hé", 5)
    assert v1.data == b"\x00\x00\x00\x03h\xc3\xa9"
    v1.feed(b"abc")
    v1.feed(b"de")
    with pytest.raises(ConnectionResetError):
        V1Exchange(b"x", None).end(errno.ECONNRESET)
    assert v1.end(0) == b"abcde"
    with pytest.raises(LimitExceeded):
        v1.feed(b"f")


def test_session_round_trip_out_of_order_and_late_replies() -> None:
    session: ClientSession[str] = ClientSession(100)
    assert session.PREAMBLE == MAGIC_V2
    a, frames_a = session.send("a", b"one")
    b, _ = session.send("b", b"two")
    assert frames_a == [REQUEST_V2.pack(a, 3) + b"one"]
    session.abandon(a)  # its caller gave up; the id stays taken
    assert len(session) == 2
    data = MAGIC_V2 + pack_reply_v2(b, Status.OK, b"2") + pack_reply_v2(a, Status.OK, b"1")
    assert session.receive(data[:7]) == []
    assert session.receive(data[7:]) == [("b", Status.OK, b"2")]  # the late one is dropped
    assert len(session) == 0
    with pytest.raises(ProtocolError, match="not in flight"):
        session.receive(pack_reply_v2(a, Status.OK, b"again"))


def test_session_splits_large_frames_and_enforces_the_reply_limit() -> None:
    session: ClientSession[int] = ClientSession(10)
    payload = b"p" * SPLIT_WRITE
    rid, frames = session.send(1, payload)
    assert frames == [REQUEST_V2.pack(rid, len(payload)), payload]
    with pytest.raises(LimitExceeded):
        session.receive(MAGIC_V2 + pack_reply_v2(rid, Status.OK, b"r" * 11))


def test_deadline_ms_rounds_up_and_drops_what_the_wire_cannot_carry() -> None:
    assert deadline_ms(None) is None
    assert deadline_ms(0.0001) == 1 and deadline_ms(1.5) == 1500
    assert deadline_ms(0) == 0 and deadline_ms(-3) == 0  # passed: TIMEOUT at once
    assert deadline_ms(MAX_DEADLINE_MS / 1000) == MAX_DEADLINE_MS
    assert deadline_ms(MAX_DEADLINE_MS / 1000 + 1) is None  # sent as no deadline


def test_control_session_sends_deadlines_and_cancels() -> None:
    session: ClientSession[str] = ClientSession(100, control=True)
    assert session.preamble == MAGIC_V2_CONTROL and session.may_fall_back
    a, frames = session.send("a", b"one", 2.0)
    assert frames == [pack_timed_request_v2(a, 2000, b"one")]
    b, frames = session.send("b", b"two")  # no timeout: a plain request
    assert frames == [REQUEST_V2.pack(b, 3) + b"two"]
    assert session.cancel(a) == pack_cancel_v2(a)
    assert session.cancel(a) == b""  # once
    assert len(session) == 2  # a's id is taken until its one reply comes
    data = MAGIC_V2_CONTROL + pack_reply_v2(a, Status.CANCELLED, b"cancelled")
    assert session.receive(data) == [] and not session.may_fall_back
    assert len(session) == 1
    assert session.receive(pack_reply_v2(b, Status.OK, b"2")) == [("b", Status.OK, b"2")]
    assert session.cancel(b) == b""  # answered already: nothing to cancel


def test_plain_session_sends_neither() -> None:
    session: ClientSession[str] = ClientSession(100)
    a, frames = session.send("a", b"one", 2.0)
    assert frames == [REQUEST_V2.pack(a, 3) + b"one"]
    assert session.cancel(a) == b"" and not session.may_fall_back
    with pytest.raises(ProtocolError, match="control frames"):  # a server that ignored ours
        ClientSession(100, control=True).receive(MAGIC_V2)


def test_request_ids_wrap_around_taken_ones() -> None:
    ids: RequestIds[str] = RequestIds(3)
    assert [ids.open(w) for w in "abc"] == [0, 1, 2]
    with pytest.raises(ProtocolError, match="all 3"):
        ids.open("d")
    ids.abandon(0)
    assert ids.resolve(1) == "b"
    assert ids.open("e") == 1  # 0 is abandoned, not free
    assert ids.resolve(0) is None  # the late reply: dropped, and 0 is free again
    assert ids.resolve(2) == "c"
    assert ids.open("f") == 2 and ids.open("g") == 0


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (gaspar.HandlerError("x"), "handler_error"),
        (gaspar.RequestTimeout("x"), "timeout"),
        (TimeoutError(), "timeout"),
        (ConnectionResetError(), "reset"),
        (BrokenPipeError(), "reset"),
        (ConnectionRefusedError(), "refused"),
        (LimitExceeded(2, 1), "too_large"),
        (gaspar.MessageTooLarge("request"), "too_large"),
        (gaspar.WorkerLost("x"), "worker_lost"),
        (ValueError("odd"), "other"),
    ],
)
def test_classify_follows_the_exception_mapping(exc: BaseException, kind: str) -> None:
    assert classify(exc)[0] == kind
    if isinstance(exc, LimitExceeded):
        assert classify(exc)[1] == clientcore.REPLY_TOO_LARGE


def test_classify_reads_the_cause_of_a_client_failure() -> None:
    failed = gaspar.ConnectionFailed("lost")
    failed.__cause__ = ConnectionResetError()
    assert classify(failed) == ("reset", None)
    assert classify(gaspar.ConnectionFailed("closed")) == ("other", "ConnectionFailed: closed")


def test_an_end_of_stream_with_a_pending_reset_fails_the_v1_request() -> None:
    """What libuv does: report the end of the stream while a reset is pending behind data."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    reset = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(100)
            conn.sendall(b"part of a reply")
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()
        exchange = V1Exchange(b"x", None)
        transport, protocol = await loop.create_connection(
            lambda: aio.V1Protocol(exchange, done), *listener.getsockname()
        )
        transport.pause_reading()  # the bytes and the reset wait unread
        assert await asyncio.to_thread(reset.wait, 10)
        protocol.eof_received()  # as libuv reports it after a short read
        with pytest.raises(ConnectionResetError):
            await done
        transport.abort()

    try:
        asyncio.run(main())
    finally:
        listener.close()
        thread.join(10)

"""The blocking client against real sockets: addresses and every failure path."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import gaspar
from gaspar.client import pack, parse_address, request
from tests import handlers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:10123", ("127.0.0.1", 10123)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:8080", ("::1", 8080)),
        (":9", ("127.0.0.1", 9)),
        (("h", 5), ("h", 5)),
    ],
)
def test_parse_address(text: str | tuple[str, int], expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["nohost", "host:", "::1:80", "host:port"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_pack_is_exported_by_the_client() -> None:
    assert pack(b"ab") == b"\x00\x00\x00\x02ab"


def test_refused_connection_is_connection_failed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(gaspar.ConnectionFailed) as info:
            request(("127.0.0.1", port), b"x", timeout=5)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert isinstance(info.value, gaspar.RequestFailed)


def test_silent_server_gives_request_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        started = time.monotonic()
        with pytest.raises(gaspar.RequestTimeout) as info:
            request(listener.getsockname(), b"x", timeout=0.3)
        assert time.monotonic() - started < 3
        assert isinstance(info.value, gaspar.RequestFailed)


def test_server_vanishing_mid_reply_fails_cleanly() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def half_reply_then_reset() -> None:
            conn, _ = listener.accept()
            conn.recv(100)
            conn.sendall(b"partial")
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            conn.close()

        t = threading.Thread(target=half_reply_then_reset)
        t.start()
        with pytest.raises(gaspar.RequestFailed):
            request(listener.getsockname(), b"x", timeout=5)
        t.join(5)


def test_reply_limit(serve) -> None:
    producer = serve(handlers.echo, processes=1)
    with pytest.raises(gaspar.RequestFailed, match="too large"):
        request(producer.address, b"x" * 1000, timeout=10, max_reply_size=999)
    assert request(producer.address, b"x" * 999, timeout=10, max_reply_size=999) == b"x" * 999


def test_message_types(serve) -> None:
    producer = serve(handlers.echo, processes=1)
    assert request(producer.address, "é", timeout=10) == "é".encode()
    assert request(producer.address, bytearray(b"ba"), timeout=10) == b"ba"
    assert request(producer.address, memoryview(b"mv"), timeout=10) == b"mv"
    host, port = producer.address
    assert request(f"{host}:{port}", b"text", timeout=10) == b"text"

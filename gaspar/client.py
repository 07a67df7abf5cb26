"""The blocking v1 client, built on the plain ``socket`` module.

Because it uses nothing but ``socket`` (and ``time``), eventlet's or gevent's
monkey-patching turns it green: many greenlets can wait on gaspar at once.
"""

from __future__ import annotations

import socket
import time

from .errors import ConnectionFailed, RequestFailed, RequestTimeout
from .protocol import LimitExceeded, ReplyReader, pack

__all__ = ["DEFAULT_MAX_REPLY_SIZE", "pack", "parse_address", "request"]

DEFAULT_MAX_REPLY_SIZE = 64 * 1024 * 1024
_RECV_SIZE = 256 * 1024


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """Split "host:port" or "[ipv6]:port" into (host, port)."""
    if isinstance(address, tuple):
        return address[0], int(address[1])
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port}")
    return host or "127.0.0.1", int(port)


def request(
    address: str | tuple[str, int],
    message: bytes | bytearray | memoryview | str,
    timeout: float | None = None,
    *,
    max_reply_size: int | None = DEFAULT_MAX_REPLY_SIZE,
) -> bytes:
    """Send one request and return the reply.

    `timeout` bounds the whole call (connect, send and receive).  Every failure
    raises :class:`gaspar.RequestFailed` or a subclass, with the cause chained:
    ConnectionFailed when the server cannot be reached, RequestTimeout when the
    time runs out, RequestFailed when the server resets the connection (the
    handler raised, its worker died or timed out, or the server refused it).
    """
    host, port = parse_address(address)
    data = pack(message)
    deadline = None if timeout is None else time.monotonic() + timeout

    def remaining() -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeout(f"no reply from {host}:{port} within {timeout}s")
        return left

    try:
        sock = socket.create_connection((host, port), timeout=remaining())
    except TimeoutError as exc:
        raise RequestTimeout(f"connecting to {host}:{port} timed out") from exc
    except OSError as exc:
        raise ConnectionFailed(f"cannot connect to {host}:{port}: {exc}") from exc
    reader = ReplyReader(max_reply_size)
    try:
        with sock:
            sock.settimeout(remaining())
            sock.sendall(data)
            while True:
                sock.settimeout(remaining())
                chunk = sock.recv(_RECV_SIZE)
                if not chunk:
                    return reader.finish()
                reader.feed(chunk)
    except TimeoutError as exc:
        raise RequestTimeout(f"no reply from {host}:{port} within {timeout}s") from exc
    except ConnectionResetError as exc:
        raise RequestFailed(f"{host}:{port} reset the connection: the request failed") from exc
    except LimitExceeded as exc:
        raise RequestFailed(f"reply from {host}:{port} too large: {exc}") from exc
    except OSError as exc:
        raise ConnectionFailed(f"connection to {host}:{port} failed: {exc}") from exc

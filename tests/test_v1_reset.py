"""Over v1 a reset is the only failure signal: gaspar's v1 clients never pass a truncated reply.

A fake server reads the request, writes part of a reply and resets (SO_LINGER 0
close).  Two shapes: a few bytes the client reads at once, and a large reply
the client has not read yet when the reset arrives, which is where libuv
(uvloop) used to report a clean end of stream.  Each client, the blocking one
and the asyncio one on the default loop and on uvloop, must raise
RequestFailed, never return the bytes it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

import gaspar
from gaspar import aio
from gaspar.client import request
from gaspar.loop import new_event_loop

LINGER_RESET = struct.pack("ii", 1, 0)
SMALL = 7
LARGE = 8 * 1024 * 1024  # far more than the socket buffers hold


class ResettingServer:
    """Accepts connections; for each, reads the request, writes `size` bytes, resets."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.address = self.listener.getsockname()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self.listener.accept()
                with conn:
                    conn.settimeout(10)
                    conn.recv(1000)
                    conn.setblocking(False)  # write what fits, as a timed-out server does
                    with contextlib.suppress(OSError):
                        conn.send(b"r" * self.size)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(params=[SMALL, LARGE], ids=["small", "unread"])
def server(request: pytest.FixtureRequest) -> Iterator[ResettingServer]:
    fake = ResettingServer(request.param)
    yield fake
    fake.close()


def run_on(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: object) -> object:
    loop = loop_factory()
    try:
        return loop.run_until_complete(coro)  # type: ignore[arg-type]
    finally:
        loop.close()


def test_blocking_v1_client_never_returns_a_truncated_reply(server: ResettingServer) -> None:
    for _ in range(5):
        with pytest.raises(gaspar.RequestFailed):
            request(server.address, b"x", timeout=10)


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_asyncio_v1_client_never_returns_a_truncated_reply(
    server: ResettingServer, use_uvloop: bool
) -> None:
    if use_uvloop:
        pytest.importorskip("uvloop")

    async def once() -> None:
        # A large reply read in 256 KiB steps: the reset arrives behind unread data.
        with pytest.raises(gaspar.RequestFailed):
            await aio.request(server.address, b"x", timeout=10)

    for _ in range(5):
        run_on(lambda: new_event_loop(use_uvloop), once())

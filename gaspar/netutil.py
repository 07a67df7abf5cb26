"""Small socket helpers shared by the server and the asyncio client."""

from __future__ import annotations

import asyncio
import struct
from socket import SO_LINGER, SOL_SOCKET

# SO_LINGER on with a timeout of 0: a close sends RST and drops unsent data.
LINGER_RESET = struct.pack("ii", 1, 0)


def set_linger(transport: asyncio.BaseTransport, linger: bytes) -> None:
    """Set SO_LINGER (a packed ``struct linger``) on the transport's socket, if it has one."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # On every v1 reply: a plain try is cheaper than contextlib.suppress.
        try:  # noqa: SIM105
            sock.setsockopt(SOL_SOCKET, SO_LINGER, linger)
        except OSError:
            pass


def reset(transport: asyncio.Transport) -> None:
    """Close abortively: SO_LINGER 0 turns the close into a TCP RST."""
    set_linger(transport, LINGER_RESET)
    transport.abort()

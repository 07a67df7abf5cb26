"""Small socket helpers shared by the server and the asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(transport: asyncio.Transport) -> None:
    """Close abortively: SO_LINGER 0 turns the close into a TCP RST."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()

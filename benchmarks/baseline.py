"""The server a Python user would write instead of gaspar: the baseline for benchmarks.

    python benchmarks/baseline.py --loop asyncio|uvloop --workers N --host 127.0.0.1 \\
        --port 0 --handler echo|work

Standard library only (plus uvloop if asked for): ``asyncio.start_server`` streams, and
each request runs in a ``concurrent.futures.ProcessPoolExecutor`` through
``loop.run_in_executor``. It speaks gaspar's protocol v1: a 4-byte big-endian length,
the payload; the reply is the raw bytes, then the server closes the connection, or
resets it (SO_LINGER 0) if the request failed. Prints ``listening on HOST:PORT`` to
standard error once the workers are up; stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
Handler = Callable[[bytes], bytes]
log = logging.getLogger("baseline")


def load_handler(name: str) -> Handler:
    """Return `name` from benchmarks/handlers.py, whether run as a script or with -m."""
    if not __package__:  # run as a script: make the repository root importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    handler: Handler = getattr(importlib.import_module("benchmarks.handlers"), name)
    return handler


def reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP RST: how protocol v1 says a request failed."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pool: Executor, handler: Handler
) -> None:
    """Serve one connection: read one request, reply from the pool, close."""
    try:
        (length,) = struct.unpack("!I", await reader.readexactly(4))
        if length > MAX_MESSAGE_SIZE:
            raise ValueError(f"request of {length} bytes is above {MAX_MESSAGE_SIZE}")
        payload = await reader.readexactly(length)
        reply = await asyncio.get_running_loop().run_in_executor(pool, handler, payload)
        if writer.is_closing():  # the client reset the connection while the handler ran
            return
        writer.write(reply)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.transport.abort()  # the client went away: nobody to answer
    except asyncio.CancelledError:  # the server is stopping: this request fails
        reset(writer)
    except Exception as exc:
        log.warning("request failed: %s: %s", type(exc).__name__, exc)
        reset(writer)


async def serve(host: str, port: int, pool: Executor, handler: Handler) -> None:
    """Accept connections until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    serve_one = functools.partial(handle, pool=pool, handler=handler)
    # backlog=1024: the same listen backlog as gaspar's server.
    server = await asyncio.start_server(serve_one, host, port, backlog=1024)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"listening on {bound_host}:{bound_port}", file=sys.stderr, flush=True)
    async with server:  # closes the listening socket on the way out
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, start the pool, serve until SIGINT or SIGTERM; return 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10123)
    parser.add_argument("--handler", choices=["echo", "work"], default="echo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    handler = load_handler(args.handler)
    # Create and warm the pool before the loop and the server exist: a worker forked later
    # would inherit open client sockets and delay their close (or RST). Workers ignore
    # SIGINT, which is the parent's to handle (Ctrl-C reaches the whole process group).
    ignore_sigint = (signal.SIGINT, signal.SIG_IGN)
    pool = ProcessPoolExecutor(args.workers, initializer=signal.signal, initargs=ignore_sigint)
    try:
        for future in [pool.submit(os.getpid) for _ in range(args.workers)]:
            future.result()
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(serve(args.host, args.port, pool, handler))
        else:
            asyncio.run(serve(args.host, args.port, pool, handler))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

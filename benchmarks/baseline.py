"""The servers a Python user would write instead of gaspar: the baselines for benchmarks.

    python benchmarks/baseline.py --loop asyncio|uvloop --pool ppe|pebble --workers N \\
        --host 127.0.0.1 --port 0 --handler echo|work

``asyncio.start_server`` streams (on the default loop or uvloop), and each request runs
in a process pool: ``--pool ppe`` is the standard library's
``concurrent.futures.ProcessPoolExecutor`` through ``loop.run_in_executor``; ``--pool
pebble`` is Pebble's ``ProcessPool`` (what a careful user picks for per-task timeouts
and crash isolation) through ``pool.schedule(..., timeout=TASK_TIMEOUT)`` and
``asyncio.wrap_future``. The server code is the same for both. It speaks gaspar's
protocol v1: a 4-byte big-endian length, the payload; the reply is the raw bytes, then
the server closes the connection, or resets it (SO_LINGER 0) if the request failed
(including a Pebble task that timed out or whose worker died). Prints ``listening on
HOST:PORT`` to standard error once the workers are up; stops on SIGINT or SIGTERM.
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
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# Pebble's per-task timeout: set, as a careful user would, and far above any handler the
# benchmarks run (the longest is about 50 ms), so that it never fires in a scenario.
TASK_TIMEOUT = 60.0
Handler = Callable[[bytes], bytes]
# Runs the handler on one payload in the pool; awaited on the server's loop.
Call = Callable[[bytes], Awaitable[bytes]]
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


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, call: Call) -> None:
    """Serve one connection: read one request, reply from the pool, close."""
    try:
        (length,) = struct.unpack("!I", await reader.readexactly(4))
        if length > MAX_MESSAGE_SIZE:
            raise ValueError(f"request of {length} bytes is above {MAX_MESSAGE_SIZE}")
        payload = await reader.readexactly(length)
        reply = await call(payload)
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


def pool_call(pool: Any, handler: Handler, loop: asyncio.AbstractEventLoop) -> Call:
    """How a request reaches `pool` (a ProcessPoolExecutor or a pebble.ProcessPool)."""
    if isinstance(pool, ProcessPoolExecutor):

        def submit(payload: bytes) -> Awaitable[bytes]:
            return loop.run_in_executor(pool, handler, payload)

        return submit

    def schedule(payload: bytes) -> Awaitable[bytes]:
        # What run_in_executor does for an executor: wrap its concurrent future.
        future = pool.schedule(handler, args=(payload,), timeout=TASK_TIMEOUT)
        return asyncio.wrap_future(future, loop=loop)

    return schedule


async def serve(host: str, port: int, pool: Any, handler: Handler) -> None:
    """Accept connections until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    serve_one = functools.partial(handle, call=pool_call(pool, handler, loop))
    # backlog=1024: the same listen backlog as gaspar's server.
    server = await asyncio.start_server(serve_one, host, port, backlog=1024)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"listening on {bound_host}:{bound_port}", file=sys.stderr, flush=True)
    async with server:  # closes the listening socket on the way out
        await stop.wait()


def start_pool(kind: str, workers: int) -> Any:
    """A warm pool of `workers` processes: a ProcessPoolExecutor ("ppe") or Pebble's ("pebble").

    Workers ignore SIGINT, which is the parent's to handle (Ctrl-C reaches the whole
    process group).
    """
    ignore_sigint = (signal.SIGINT, signal.SIG_IGN)
    pool: Any
    if kind == "pebble":
        import pebble

        pool = pebble.ProcessPool(workers, initializer=signal.signal, initargs=ignore_sigint)
        warm = [pool.schedule(os.getpid, timeout=TASK_TIMEOUT) for _ in range(workers)]
    else:
        pool = ProcessPoolExecutor(workers, initializer=signal.signal, initargs=ignore_sigint)
        warm = [pool.submit(os.getpid) for _ in range(workers)]
    for future in warm:
        future.result()
    return pool


def stop_pool(pool: Any) -> None:
    """Let the running tasks finish, drop the queued ones, wait for the workers to exit."""
    if isinstance(pool, ProcessPoolExecutor):
        pool.shutdown(wait=True, cancel_futures=True)
    else:  # the server has stopped: every task left was cancelled with its request
        pool.close()
        pool.join()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, start the pool, serve until SIGINT or SIGTERM; return 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--pool", choices=["ppe", "pebble"], default="ppe")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10123)
    parser.add_argument("--handler", choices=["echo", "work"], default="echo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    handler = load_handler(args.handler)
    # Create and warm the pool before the loop and the server exist: a worker forked later
    # would inherit open client sockets and delay their close (or RST). (Pebble forks a
    # replacement when a task times out or its worker dies, which no scenario makes happen.)
    pool = start_pool(args.pool, args.workers)
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(serve(args.host, args.port, pool, handler))
        else:
            asyncio.run(serve(args.host, args.port, pool, handler))
    finally:
        stop_pool(pool)
    return 0


if __name__ == "__main__":
    sys.exit(main())

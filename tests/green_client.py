"""Run gaspar's blocking client from many greenlets under gevent or eventlet.

    python tests/green_client.py gevent|eventlet HOST:PORT N SECONDS [MODE]

The script monkey-patches FIRST, before anything else imports `socket`
(gaspar included), then sends N requests `sleep:SECONDS` to a server running
`tests.handlers.behave` and prints one JSON line to standard output.

MODE is one of:

- `concurrent` (the default): N greenlets, each calling
  `gaspar.client.request(address, message, timeout=30)`;
- `sequential`: one greenlet making the N calls one after another, the cost
  without overlap;
- `client`: N greenlets sharing one `gaspar.client.Client(address)` and calling
  `client.request(message, timeout=30)`; exits 3 when there is no such class.

While the requests are in flight a separate greenlet ticks every 10 ms; the
largest gap between its ticks shows whether anything blocked the event loop.

Exit codes: 0 the run happened (its JSON says how it went), 2 bad arguments,
3 `client` mode without `gaspar.client.Client`, 4 the library cannot be
imported (the test skips with the message).
"""

# ruff: noqa: E402  (the imports below the patch must stay below it)

from __future__ import annotations

import sys
import warnings

USAGE = "usage: green_client.py gevent|eventlet HOST:PORT N SECONDS [concurrent|sequential|client]"
MODES = ("concurrent", "sequential", "client")

if len(sys.argv) not in (5, 6) or sys.argv[1] not in ("gevent", "eventlet"):
    print(USAGE, file=sys.stderr)
    sys.exit(2)
LIBRARY = sys.argv[1]
MODE = sys.argv[5] if len(sys.argv) == 6 else "concurrent"
if MODE not in MODES:
    print(USAGE, file=sys.stderr)
    sys.exit(2)

# Only eventlet's own "Eventlet is deprecated" notice, printed on import; the
# message starts with a newline.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

if LIBRARY == "gevent":
    try:
        import gevent
        import gevent.monkey
    except Exception as exc:  # any failure to import means "not usable here"
        print(f"cannot import gevent: {exc!r}", file=sys.stderr)
        sys.exit(4)
    gevent.monkey.patch_all()
else:
    try:
        import eventlet
        import eventlet.patcher
    except Exception as exc:
        print(f"cannot import eventlet: {exc!r}", file=sys.stderr)
        sys.exit(4)
    eventlet.monkey_patch()

# Everything that may import socket comes after the patch.
import json
import time
from collections.abc import Callable
from typing import Any

import gaspar.client

# Blocking calls the client may make, by the module gaspar.client imports them from.
GREEN_NAMES = [
    ("socket", "socket"),
    ("socket", "create_connection"),
    ("select", "select"),
    ("threading", "Lock"),
]

if LIBRARY == "gevent":
    VERSION = gevent.__version__
    SOCKET_PATCHED = gevent.monkey.is_module_patched("socket")

    def spawn(function: Callable[[], None]) -> Any:
        return gevent.spawn(function)

    def join(threads: list[Any]) -> None:
        gevent.joinall(threads, raise_error=True)

    green_sleep = gevent.sleep
else:
    VERSION = eventlet.__version__
    SOCKET_PATCHED = eventlet.patcher.is_monkey_patched("socket")

    def spawn(function: Callable[[], None]) -> Any:
        return eventlet.spawn(function)

    def join(threads: list[Any]) -> None:
        for thread in threads:
            thread.wait()

    green_sleep = eventlet.sleep


def client_sees() -> dict[str, str]:
    """Where the blocking primitives gaspar.client calls come from, after patching."""
    seen = {}
    for module, name in GREEN_NAMES:
        if hasattr(gaspar.client, module):
            seen[f"{module}.{name}"] = getattr(getattr(gaspar.client, module), name).__module__
    return seen


def main() -> int:
    address = gaspar.client.parse_address(sys.argv[2])
    n = int(sys.argv[3])
    seconds = sys.argv[4]
    message = b"sleep:%s" % seconds.encode()

    call: Callable[[], bytes]
    client = None
    if MODE == "client":
        client_class = getattr(gaspar.client, "Client", None)
        if client_class is None:
            print("gaspar.client has no Client class: no client mode to test", file=sys.stderr)
            return 3
        client = client_class(address)

        def call() -> bytes:
            return client.request(message, timeout=30)

    else:

        def call() -> bytes:
            return gaspar.client.request(address, message, timeout=30)

    replies: list[str] = []
    errors: list[str] = []

    def one() -> None:
        try:
            replies.append(call().decode("ascii", "backslashreplace"))
        except Exception as exc:  # reported in the JSON, checked by the test
            errors.append(repr(exc))

    def sequential() -> None:
        for _ in range(n):
            one()

    ticks = {"count": 0, "max_gap": 0.0, "running": True}

    def ticker() -> None:
        last = time.monotonic()
        while ticks["running"]:
            green_sleep(0.01)
            now = time.monotonic()
            ticks["count"] += 1
            ticks["max_gap"] = max(ticks["max_gap"], now - last)
            last = now

    tick_thread = spawn(ticker)
    green_sleep(0)  # let the ticker take its first timestamp before the clock starts
    started = time.monotonic()
    if MODE == "sequential":
        join([spawn(sequential)])
    else:
        join([spawn(one) for _ in range(n)])
    wall = time.monotonic() - started
    ticks["running"] = False
    join([tick_thread])
    if client is not None and hasattr(client, "close"):
        client.close()

    print(
        json.dumps(
            {
                "library": LIBRARY,
                "version": VERSION,
                "python": sys.version.split()[0],
                "mode": MODE,
                "n": n,
                "seconds": float(seconds),
                "wall": wall,
                "replies": replies,
                "errors": errors,
                "patched": {"socket": SOCKET_PATCHED, "client_sees": client_sees()},
                "ticks": ticks["count"],
                "max_tick_gap": ticks["max_gap"],
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Handlers served in benchmarks, by gaspar and by the baseline (``benchmarks/baseline.py``).

Each takes the request's bytes and returns the reply's bytes. They are module-level
functions so that ``concurrent.futures.ProcessPoolExecutor`` can pickle them by name.
"""

from __future__ import annotations

import time


def echo(message: bytes) -> bytes:
    """Return `message` as the reply."""
    return message


def work(message: bytes) -> bytes:
    """Burn CPU for ``cpu:<microseconds>[:<anything>]`` and reply b"ok"; echo anything else.

    The wait is a pure-Python busy loop on ``time.perf_counter`` (it holds a core and the
    GIL, never sleeps): ``cpu:2000`` is a CPU-bound handler of about 2 ms.
    """
    if not message.startswith(b"cpu:"):
        return message  # an echo, without copying a large payload on the way
    micros = message[4:].partition(b":")[0]
    if not micros.isdigit():
        return message
    deadline = time.perf_counter() + int(micros) / 1_000_000
    while time.perf_counter() < deadline:
        pass
    return b"ok"

"""An App the tests serve, importable by `gaspar serve tests.app_example:app`."""

from __future__ import annotations

import os
import time
from typing import Any

from gaspar.app import App

# Filled in by setup(), once in each worker after fork.
state: dict[str, Any] = {"setups": 0, "setup_pid": None}
# Arguments record() was called with, in this process.
recorded: list[Any] = []


def setup() -> None:
    state["setups"] += 1
    state["setup_pid"] = os.getpid()


app = App(setup=setup)


@app.task
def resize(
    pixels: bytes,
    width: int,
    height: int,
    new_width: int,
    new_height: int = 0,
    *,
    flip: bool = False,
) -> bytes:
    """Nearest-neighbour resize of a grayscale image, one byte a pixel, row by row."""
    if len(pixels) != width * height:
        raise ValueError(f"{len(pixels)} bytes is not {width}x{height}")
    new_height = new_height or max(1, height * new_width // width)
    out = bytearray()
    for y in range(new_height):
        row = (y * height // new_height) * width
        out.extend(pixels[row + x * width // new_width] for x in range(new_width))
    if flip:
        rows = [out[i : i + new_width] for i in range(0, len(out), new_width)]
        out = bytearray(b"".join(reversed(rows)))
    return bytes(out)


@app.task
def stats(data: bytes, label: str = "") -> dict[str, Any]:
    """A dict with nested values: lists, maps, bytes, None."""
    counts: dict[str, int] = {}
    for byte in data:
        counts[str(byte)] = counts.get(str(byte), 0) + 1
    return {
        "label": label or None,
        "size": len(data),
        "extremes": [min(data), max(data)] if data else [],
        "histogram": counts,
        "head": {"bytes": data[:4], "hex": data[:4].hex()},
    }


@app.task
def echo(value: Any) -> Any:
    return value


@app.task(name="kwargs")
def echo_arguments(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Registered under another name; accepts any keywords, `timeout` included."""
    return {"args": list(args), "kwargs": kwargs}


@app.task
def fail(message: str) -> None:
    raise ValueError(message)


@app.task
def add(a: Any, b: Any) -> Any:
    """Raises TypeError from its body for add(1, "x"); its arguments bind fine."""
    return a + b


@app.task
def make_set() -> set[int]:
    """msgpack cannot encode a set."""
    return {1, 2, 3}


@app.task
def record(item: Any, /, *, tag: str = "") -> int:
    recorded.append([item, tag])
    return len(recorded)


@app.task
def records() -> list[Any]:
    return recorded


@app.task
def pid() -> int:
    return os.getpid()


@app.task
def setup_info(hold: float = 0.0) -> dict[str, Any]:
    """This worker's pid and setup state, after `hold` seconds of simulated work."""
    time.sleep(hold)  # handler: simulated work, so that concurrent calls take both workers
    return {"pid": os.getpid(), **state}

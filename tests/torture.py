"""The adversarial suite's sizes (tests/test_torture.py, tests/test_fuzz.py), read in one place.

``GASPAR_TORTURE`` unset (CI, `make test`): bounded sizes that run in well under a minute
together.  ``GASPAR_TORTURE=full`` (`make torture`): the sizes docs/reliability.md reports.
Every check prints one ``torture:`` line of its figures (:func:`printer`).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

MODE = os.environ.get("GASPAR_TORTURE", "") or "ci"
if MODE not in ("ci", "full"):
    raise ValueError(f"GASPAR_TORTURE must be 'full' or unset, not {MODE!r}")
FULL = MODE == "full"


@dataclass(frozen=True)
class Sizes:
    """How hard each check pushes; `timeout` bounds each test (pytest-timeout)."""

    chaos_requests: int  # over v1 and v2, half each, from `clients` at once
    fuzz_examples: int  # hypothesis examples per sans-I/O property
    live_attacks: int  # hostile connections against a live server
    soak_requests: int  # after the warm-up
    soak_chunk: float  # seconds of one load run of the soak (v1 and v2 alternate)
    slow_connections: int  # idle or trickling, held while the echo load runs
    slow_seconds: float  # one measured echo run, with or without them
    slow_rounds: int  # interleaved pairs (without, with); medians reported
    load_seconds: float  # reload and recycling under load: how long the clients send
    timeout: float
    clients: int = 64
    kill_every: float = 0.1  # seconds between two SIGKILLs of a random worker


SIZES = (
    Sizes(
        chaos_requests=20_000,
        fuzz_examples=5_000,
        live_attacks=5_000,
        soak_requests=500_000,
        soak_chunk=10.0,
        slow_connections=1_000,
        slow_seconds=5.0,
        slow_rounds=3,
        load_seconds=20.0,
        timeout=900.0,
    )
    if FULL
    else Sizes(
        chaos_requests=4_000,
        fuzz_examples=300,
        live_attacks=500,
        soak_requests=20_000,
        soak_chunk=1.0,
        slow_connections=300,
        slow_seconds=1.0,
        slow_rounds=1,
        load_seconds=3.0,
        timeout=120.0,
    )
)

ROOT = Path(__file__).resolve().parents[1]


def line(check: str, **figures: object) -> str:
    """One line of a check's figures, as docs/reliability.md quotes them."""
    text = " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    return f"torture: {check} [{MODE}] {text}"


def printer(capsys: pytest.CaptureFixture[str]) -> Callable[..., None]:
    """A `report(check, **figures)` that prints past pytest's capture, so every run shows it
    (each test module makes it its `report` fixture)."""

    def write(check: str, **figures: object) -> None:
        with capsys.disabled():
            print("\n" + line(check, **figures), flush=True)

    return write


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def fd_count(pid: int | str = "self") -> int:
    """Open file descriptors of process `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int | str = "self") -> int:
    """Resident memory of process `pid`, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("no VmRSS")

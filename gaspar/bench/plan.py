"""What one generator process does (:class:`Plan`), what it counts (:class:`Tally`), and
the bounds of a run; no I/O here, so the parent can import it without asyncio."""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..clientcore import DEFAULT_MAX_REPLY_SIZE, REPLY_TOO_LARGE, classify
from . import ERROR_KINDS

# Seconds that requests in flight when the window closes get before they are abandoned.
DRAIN_GRACE = 1.0
# Seconds a client pauses after a failed request, so a dead server is not hammered.
ERROR_BACKOFF = 0.01
# Seconds between two checks of the raw v2 connections for requests past their timeout.
WATCH_INTERVAL = 0.1
# Seconds the generator processes get to start and report ready.
START_TIMEOUT = 60.0
# Seconds, beyond the run itself, that the parent waits for the processes' results.
RESULT_SLACK = 30.0
# With echo checking, a reply may not exceed this many bytes beyond the request's size.
REPLY_SLACK = 64 * 1024
# Seconds between two progress reports of a generator process.
PROGRESS_INTERVAL = 1.0


_TAG = struct.Struct("!IQ")  # client id, sequence number


@dataclass(frozen=True)
class Plan:
    """What one generator process does; sent to it by pickling."""

    host: str
    port: int
    family: int
    first_id: int
    coroutines: int  # requests in flight
    size: int
    warmup: float
    duration: float
    timeout: float
    protocol: str = "v1"
    client: str = "raw"
    connections: int = 1  # v2: persistent connections of this process
    payload: bytes | None = None  # sent unchanged in every request, instead of random bytes
    check_echo: bool = False  # a reply must equal its request
    progress: bool = False  # send ("progress", (elapsed, ok, errors)) every second

    @property
    def reply_limit(self) -> int:
        """The largest reply accepted: an echo's size when checking, else the client's limit."""
        return self.size + REPLY_SLACK if self.check_echo else DEFAULT_MAX_REPLY_SIZE

    def too_large(self) -> str:
        """The error kind of a reply above `reply_limit`: it cannot be an echo."""
        return "mismatch" if self.check_echo else "too_large"


def error_kind(exc: BaseException, plan: Plan) -> tuple[str, str | None]:
    """A failed exchange as (kind, detail), by the client core's classifier.

    A reply above the plan's limit is counted as :meth:`Plan.too_large` says.
    """
    kind, detail = classify(exc)
    if detail == REPLY_TOO_LARGE:
        return plan.too_large(), detail
    return kind, detail


class Tally:
    """Counts of one generator process; its event loop is the only writer."""

    __slots__ = ("details", "errors", "latencies", "t_end", "t_warm", "warmup_errors")

    def __init__(self, t_warm: float, t_end: float) -> None:
        self.t_warm = t_warm
        self.t_end = t_end
        self.latencies: list[float] = []
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.details: dict[str, int] = {}
        self.warmup_errors = 0

    def counts(self) -> tuple[int, int]:
        """Requests that succeeded, and that failed, inside the window so far."""
        return len(self.latencies), sum(self.errors.values())

    def failed(self, kind: str, detail: str | None, finished: float, count: int = 1) -> None:
        """Count `count` requests that failed at `finished`, if inside the window."""
        if self.t_warm <= finished < self.t_end:
            self.errors[kind] += count
            if detail is not None:
                key = f"{kind}: {detail}"
                self.details[key] = self.details.get(key, 0) + count
        elif finished < self.t_warm:
            self.warmup_errors += count


def payloads(plan: Plan, ident: int) -> Iterator[bytes]:
    """The payloads of client `ident`: the plan's fixed payload, or tagged random bytes."""
    if plan.payload is not None:
        return itertools.repeat(plan.payload)
    return random_payloads(plan.size, ident)


def random_payloads(size: int, ident: int) -> Iterator[bytes]:
    """Random payloads of `size` bytes, each tagged with (ident, sequence) when it fits."""
    buf = bytearray(os.urandom(size))
    seq = 0
    while True:
        seq += 1
        if size >= _TAG.size:
            _TAG.pack_into(buf, 0, ident, seq)
        yield bytes(buf)


def split(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` near-equal positive shares."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]

"""A generator process: started by :func:`.runner.run`, it runs its share of the load.

It reports ready, waits for the parent's "go", runs one event loop (uvloop's
when installed, from :func:`gaspar.loop.new_event_loop`) for the warmup and
the measured window, and sends back its raw results.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..loop import new_event_loop
from .coroutines import CoroutineLoad
from .plan import DRAIN_GRACE, PROGRESS_INTERVAL, Plan, Tally
from .raw_v2 import PipelinedLoad


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Report = Callable[[float, int, int], None]


async def _generate(plan: Plan, report: Report | None = None) -> dict[str, Any]:
    """Run one process's share of the load; return its raw results.

    `report(elapsed, ok, errors)`, when given, gets the running totals every
    PROGRESS_INTERVAL seconds of the measured window and at its end.
    """
    perf = time.perf_counter
    t_warm = perf() + plan.warmup
    t_end = t_warm + plan.duration
    tally = Tally(t_warm, t_end)
    load: CoroutineLoad | PipelinedLoad
    if plan.protocol == "v2" and plan.client == "raw":
        load = PipelinedLoad(plan, tally)
    else:
        load = CoroutineLoad(plan, tally)
    load.start()
    try:
        await asyncio.sleep(max(0.0, t_warm - perf()))
        wall0, cpu0 = perf(), _cpu_seconds()
        wall1, cpu1 = wall0, cpu0
        elapsed = 0.0
        while elapsed < plan.duration:
            elapsed = min(elapsed + PROGRESS_INTERVAL, plan.duration)
            # A loop's timers may fire a little early (uvloop's have 1 ms steps): sleep on.
            while (left := t_warm + elapsed - perf()) > 0:
                await asyncio.sleep(left)
            if elapsed >= plan.duration:
                wall1, cpu1 = perf(), _cpu_seconds()
            if report is not None:
                report(elapsed, *tally.counts())
        # Let requests in flight finish (uncounted) so the server is left idle, within bounds.
        await load.drain(DRAIN_GRACE)
    finally:
        await load.close()
    return {
        "latencies": tally.latencies,
        "errors": tally.errors,
        "details": tally.details,
        "warmup_errors": tally.warmup_errors,
        "cpu_seconds": cpu1 - cpu0,
        "wall_seconds": wall1 - wall0,
    }


def child_main(conn: Connection, plan: Plan) -> None:
    """Body of a generator process: report ready, wait for "go", run, send the results.

    With `plan.progress`, it also sends ("progress", (elapsed, ok, errors)) every
    PROGRESS_INTERVAL seconds of the measured window, before its result.
    """

    def report(elapsed: float, ok: int, errors: int) -> None:
        conn.send(("progress", (elapsed, ok, errors)))

    # Ctrl-C is the parent's to handle: it stops (kills) this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        loop = new_event_loop()
        uses_uvloop = type(loop).__module__.startswith("uvloop")
        try:
            conn.send(("ready", None))
            if conn.recv() != "go":
                return
            result = loop.run_until_complete(_generate(plan, report if plan.progress else None))
        finally:
            loop.close()
        result["uvloop"] = uses_uvloop
        conn.send(("result", result))
    except BaseException as exc:
        with contextlib.suppress(OSError):  # the parent has gone
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        conn.close()

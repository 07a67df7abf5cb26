"""The figures as text: progress lines, the one-line summary, the final report; and the
merge of the generator processes' raw results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TextIO

from . import ERROR_KINDS

__all__ = ["format_progress", "format_report", "format_summary"]


def format_progress(elapsed: float, rate: float, ok: int, errors: int) -> str:
    """One progress line: seconds into the window, req/s over the last second, totals."""
    return f"{elapsed:5.1f}s  {rate:,.0f} req/s  ok {ok:,}  errors {errors:,}"


class Progress:
    """Prints a progress line once every generator process has reported the same tick."""

    def __init__(self, processes: int, stream: TextIO) -> None:
        self.stream = stream
        self.ticks: list[list[tuple[float, int, int]]] = [[] for _ in range(processes)]
        self.printed = 0
        self.last_elapsed = 0.0
        self.last_ok = 0

    def __call__(self, index: int, body: Any) -> None:
        elapsed, ok, errors = body
        self.ticks[index].append((float(elapsed), int(ok), int(errors)))
        while all(len(ticks) > self.printed for ticks in self.ticks):
            rows = [ticks[self.printed] for ticks in self.ticks]
            elapsed = max(row[0] for row in rows)
            ok = sum(row[1] for row in rows)
            errors = sum(row[2] for row in rows)
            span = elapsed - self.last_elapsed
            rate = (ok - self.last_ok) / span if span > 0 else 0.0
            self.stream.write(format_progress(elapsed, rate, ok, errors) + "\n")
            self.stream.flush()
            self.last_elapsed, self.last_ok = elapsed, ok
            self.printed += 1


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q`-th percentile of sorted samples, or None without samples."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 4)


def aggregate(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the processes' raw results into the report's counters and percentiles."""
    latencies = sorted(x for part in parts for x in part["latencies"])
    errors = dict.fromkeys(ERROR_KINDS, 0)
    details: dict[str, int] = {}
    for part in parts:
        for kind, count in part["errors"].items():
            errors[kind] += count
        for key, count in part["details"].items():
            details[key] = details.get(key, 0) + count
    shares = [p["cpu_seconds"] / p["wall_seconds"] for p in parts if p["wall_seconds"] > 0]
    return {
        "latencies": latencies,
        "errors": errors,
        "details": details,
        "warmup_errors": sum(p["warmup_errors"] for p in parts),
        "cpu": {
            "seconds": round(sum(p["cpu_seconds"] for p in parts), 4),
            # Cores' worth of CPU the generator used: 1.0 is one core busy all the time.
            "share": round(sum(shares), 4),
            "busiest_process": round(max(shares, default=0.0), 4),
        },
        "uvloop": all(p["uvloop"] for p in parts),
    }


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _error_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n:,}" for kind, n in errors.items() if n) or "none"


def format_summary(result: dict[str, Any]) -> str:
    """One line for a human: throughput, latency, errors and the generator's CPU."""
    lat = result["latency_ms"]
    errors = result["errors"]
    error_text = ", ".join(f"{kind} {n}" for kind, n in errors.items() if n) or "none"
    cpu = result["cpu"]
    conns = f" conns={result['connections']}" if result.get("connections") else ""
    return (
        f"{result['address']} {result.get('protocol', 'v1')} {result.get('client', 'raw')}"
        f" c={result['concurrency']} procs={result['processes']}{conns}"
        f" size={result['size']}B {result['duration']:g}s:"
        f" {result['rps']:.0f} req/s, p50 {_fmt_ms(lat['p50'])} ms,"
        f" p90 {_fmt_ms(lat['p90'])} ms, p99 {_fmt_ms(lat['p99'])} ms,"
        f" errors {result['error_total']} ({error_text}),"
        f" loadgen CPU {cpu['share']:.0%} of a core (busiest process {cpu['busiest_process']:.0%})"
    )


# A generator process using this share of a core or more may be the bottleneck.
_BUSY = 0.9


def format_report(result: dict[str, Any]) -> str:
    """The final summary for a human, on several lines: the run, req/s, latency, errors, CPU."""
    lat = result["latency_ms"]
    conns = result.get("connections")
    processes = result["processes"]
    payload = "fixed" if result.get("payload") == "fixed" else "random"
    lines = [
        f"gaspar bench {result['address']}: protocol {result['protocol']},"
        f" {result['client']} client, concurrency {result['concurrency']},"
        f" {processes} process{'es' if processes > 1 else ''}"
        + (f", {conns} connection{'s' if conns > 1 else ''}" if conns else ""),
        f"  {result['size']:,}-byte {payload} payloads,"
        f" echo check {'on' if result.get('check_echo') else 'off'},"
        f" {result['warmup']:g}s warmup + {result['duration']:g}s measured",
        f"requests/s  {result['rps']:,.0f}  ({result['requests']:,} ok)",
        "latency     "
        + (
            "  ".join(f"{q} {_fmt_ms(lat[q])} ms" for q in ("p50", "p90", "p99", "max"))
            if result["requests"]
            else "- (no request succeeded)"
        ),
    ]
    errors = f"errors      {_error_text(result['errors'])}"
    if result.get("warmup_errors"):
        errors += f"  (and {result['warmup_errors']:,} during the warmup, not counted)"
    lines.append(errors)
    details = sorted(result.get("details", {}).items(), key=lambda item: -item[1])
    lines.extend(f"              {key} ({count:,})" for key, count in details[:5])
    cpu = result["cpu"]
    usage = f"generator   CPU {cpu['share']:.0%} of a core"
    if processes > 1:
        usage += f" over {processes} processes (busiest {cpu['busiest_process']:.0%})"
    if cpu["busiest_process"] >= _BUSY:
        usage += "; near a full core, the generator may be the limit: add --processes"
    lines.append(usage)
    return "\n".join(lines)

"""The benchmark suite: gaspar against the servers a user would otherwise run.

    python benchmarks/suite.py [--duration 5] [--repeat 3] [--memory-requests 500000]

It builds and starts everything it needs:

- gaspar (``python -m gaspar serve``), 2 workers, and 1 worker for the scaling case;
- the baselines (benchmarks/baseline.py), 2 workers each: ``asyncio.start_server`` +
  ProcessPoolExecutor via ``run_in_executor``, on the default loop and on uvloop, and
  uvloop + Pebble's ProcessPool (per-task timeout set) via ``asyncio.wrap_future``;
- a minimal C epoll echo server (benchmarks/c), the limit of protocol v1 here;
- the C load generator (benchmarks/c), which is not the bottleneck; where there is
  no C compiler, the C server is skipped and ``gaspar bench`` generates the load.

Every scenario runs its servers interleaved (A B C A B C ...) ``--repeat`` times and
reports medians, so that ratios hold on a noisy machine.  Results go to
docs/benchmarks.md (tables, targets, machine, commands) and docs/benchmarks.png.
Nothing here asserts a speed: it measures and reports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CDIR = ROOT / "benchmarks" / "c"
C_LOADGEN = CDIR / "build" / "loadgen"
C_ECHO = CDIR / "build" / "echo_server"
LISTENING = re.compile(r"listening on (\S+):(\d+)")
MIB = 1024 * 1024
Load = Callable[[int], dict[str, Any]]  # one load run against a port: its result
# The servers a Python user would run instead (name: event loop, pool). "Best baseline"
# in a target means the best of these on that figure. Pebble's server runs on uvloop, the
# faster loop of the two PPE baselines: what differs from uvloop+PPE is then the pool alone.
BASELINES = {
    "asyncio+PPE": ("asyncio", "ppe"),
    "uvloop+PPE": ("uvloop", "ppe"),
    "uvloop+Pebble": ("uvloop", "pebble"),
}
# The reference for the producer's CPU per request (scenario 3).
CPU_BASELINE = "uvloop+PPE"
# docs/benchmarks.md keeps what lies between these markers when the suite rewrites it: the
# section benchmarks/remote.py writes.
KEPT_BEGIN = "<!-- benchmarks/remote.py: begin -->"
KEPT_END = "<!-- benchmarks/remote.py: end -->"


# -- servers -------------------------------------------------------------------------


@dataclass
class Server:
    """A server under test, in its own process (tree)."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    log: list[str] = field(default_factory=list)
    cwd: Path = ROOT
    env: dict[str, str] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: stopped as a whole
        )
        found = threading.Event()

        def drain() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.log.append(line)
                match = LISTENING.search(line)
                if match and not found.is_set():
                    self.port = int(match.group(2))
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            tail = "\n".join(self.log[-10:])
            raise RuntimeError(f"{self.name} did not start:\n{tail}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def gaspar_server(name: str, workers: int, handler: str = "work") -> Server:
    argv = [sys.executable, "-m", "gaspar", "serve", f"benchmarks.handlers:{handler}"]
    argv += ["--port", "0", "--workers", str(workers), "--log-level", "info"]
    return Server(name, argv)


def baseline_server(name: str, workers: int, handler: str = "work") -> Server:
    """The baseline called `name` in BASELINES."""
    loop, pool = BASELINES[name]
    argv = [sys.executable, "benchmarks/baseline.py", "--loop", loop, "--pool", pool]
    argv += ["--workers", str(workers), "--port", "0", "--handler", handler]
    return Server(name, argv)


# -- measuring -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


class LoadGen:
    """Runs one load and returns a normalized result (the C generator, or gaspar bench)."""

    def __init__(self, use_c: bool, processes: int) -> None:
        self.use_c = use_c
        self.processes = processes

    @property
    def name(self) -> str:
        return "C (benchmarks/c/loadgen)" if self.use_c else "gaspar bench (Python)"

    def run(
        self,
        port: int,
        *,
        concurrency: int,
        duration: float,
        warmup: float,
        protocol: str = "v1",
        size: int = 16,
        mix: str | None = None,
        payload_file: str | None = None,
    ) -> dict[str, Any]:
        if self.use_c:
            argv = [str(C_LOADGEN), "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--protocol", protocol, "--concurrency", str(concurrency)]
            argv += ["--duration", str(duration), "--warmup", str(warmup)]
            # Two threads: on v1 one thread alone can be the limit against the C server.
            argv += ["--threads", str(min(2, concurrency))]
            if mix:
                argv += ["--mix", mix]
            elif payload_file:
                argv += ["--payload-file", payload_file, "--expect", "echo"]
            else:
                argv += ["--size", str(size), "--expect", "echo"]
            out = subprocess.run(argv, capture_output=True, timeout=duration + warmup + 60)
            if out.returncode != 0:
                raise RuntimeError(f"loadgen failed: {out.stderr.decode(errors='replace')}")
            raw = json.loads(out.stdout)
            lat = raw["latency_ms"]
            return {
                "rps": raw["rps"],
                "p50": lat["p50"],
                "p99": lat["p99"],
                "errors": sum(raw["errors"].values()),
                "error_kinds": {k: v for k, v in raw["errors"].items() if v},
                "mb_per_s": raw.get("mb_per_s", 0.0),
                "cpu_share": raw["cpu"]["share"],
                "classes": raw.get("classes", []),
            }
        if mix:
            raise RuntimeError("mixed loads need the C load generator")
        argv = [sys.executable, "-m", "gaspar", "bench", f"127.0.0.1:{port}", "--json"]
        argv += ["--protocol", protocol, "--concurrency", str(concurrency), "--quiet"]
        argv += ["--duration", str(duration), "--warmup", str(warmup)]
        argv += ["--processes", str(min(self.processes, concurrency)), "--check-echo"]
        argv += ["--payload-file", payload_file] if payload_file else ["--size", str(size)]
        out = subprocess.run(argv, capture_output=True, timeout=duration + warmup + 90, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"gaspar bench failed: {out.stderr.decode(errors='replace')}")
        raw = json.loads(out.stdout)
        lat = raw["latency_ms"]
        errors = {k: v for k, v in raw["errors"].items() if v}
        return {
            "rps": raw["rps"],
            "p50": lat["p50"],
            "p99": lat["p99"],
            "errors": sum(errors.values()),
            "error_kinds": errors,
            "mb_per_s": raw["rps"] * size / 1e6,
            "cpu_share": raw["cpu"]["share"],
            "classes": [],
        }


# -- the suite -------------------------------------------------------------------------


@dataclass
class Row:
    """One (scenario, server) cell: the runs of every repeat, then their medians."""

    scenario: str
    server: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        values = [run[key] for run in self.runs if run.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    def errors(self) -> int:
        return sum(run["errors"] for run in self.runs)


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: dict[tuple[str, str], Row] = {}
        self.notes: list[str] = []
        self.use_c = shutil.which(os.environ.get("CC", "cc")) is not None and self._build_c()
        if not self.use_c:
            self.notes.append("No C compiler: the C server is skipped; gaspar bench is the load.")
        self.load = LoadGen(self.use_c, args.processes)
        self.servers: dict[str, Server] = {}
        self.producer_cpu: dict[str, list[float]] = {}
        self.memory: dict[str, Any] = {}

    def _build_c(self) -> bool:
        out = subprocess.run(["make", "-s", "-C", str(CDIR)], capture_output=True)
        if out.returncode != 0:
            self.notes.append("The C tools did not build: " + out.stderr.decode()[-300:])
            return False
        return C_LOADGEN.exists() and C_ECHO.exists()

    def record(self, scenario: str, server: str, result: dict[str, Any]) -> None:
        self.rows.setdefault((scenario, server), Row(scenario, server)).runs.append(result)
        print(
            f"  {scenario:<22} {server:<18} {result['rps']:>9,.0f} req/s  "
            f"p50 {result['p50']:.3f} ms  p99 {result['p99']:.3f} ms  errors {result['errors']}",
            flush=True,
        )

    def start_servers(self) -> None:
        servers = [gaspar_server("gaspar", 2), gaspar_server("gaspar 1 worker", 1)]
        servers += [baseline_server(name, 2) for name in BASELINES]
        if self.use_c:
            servers.append(Server("C epoll", [str(C_ECHO), "--host", "127.0.0.1", "--port", "0"]))
        for server in servers:
            server.start()
            self.servers[server.name] = server

    def stop_servers(self) -> None:
        for server in self.servers.values():
            server.stop()

    def run_interleaved(self, cases: Sequence[tuple[str, str, Load]]) -> None:
        """Run every (scenario, server, load) case once per repeat, interleaved."""
        for repeat in range(self.args.repeat):
            print(f"repeat {repeat + 1}/{self.args.repeat}", flush=True)
            for scenario, server, load in cases:
                self.record(scenario, server, load(self.servers[server].port))

    def scenarios(self) -> None:
        a, d, w = self.args, self.args.duration, self.args.warmup
        pythons = ["gaspar", *BASELINES]
        refs = pythons + (["C epoll"] if self.use_c else [])
        cases: list[tuple[str, str, Load]] = []

        def echo(conc: int, protocol: str = "v1", size: int = 16, file: str | None = None) -> Load:
            return lambda port: self.load.run(
                port,
                concurrency=conc,
                duration=d,
                warmup=w,
                protocol=protocol,
                size=size,
                payload_file=file,
            )

        # 1: echo, 16 B, v1, 1 / 16 / 64 in flight
        for conc in (1, 16, 64):
            cases += [(f"1. echo v1 c={conc}", name, echo(conc)) for name in refs]
        # 2: echo over v2, 1 and 64 in flight
        for conc in (1, 64):
            cases.append((f"2. echo v2 c={conc}", "gaspar", echo(conc, "v2")))
        # 5: 1 MiB echo, 4 in flight
        big = ROOT / "benchmarks" / "results" / "payload-1mib.bin"
        big.parent.mkdir(parents=True, exist_ok=True)
        big.write_bytes(os.urandom(MIB))
        for name in refs:
            cases.append(("5. echo 1 MiB c=4", name, echo(4, file=str(big), size=MIB)))
        self.run_interleaved(cases)

        # 3: CPU-bound ~2 ms, 16 in flight, 1 worker against 2. The CPU per request of each
        # server's main process (all its threads): gaspar's producer, a baseline's parent.
        for _ in range(a.repeat):
            for name in ("gaspar 1 worker", *pythons):
                server = self.servers[name]
                before = cpu_seconds(server.pid)
                result = self.load.run(
                    server.port, concurrency=16, duration=d, warmup=0, mix="1:cpu:2000"
                )
                spent = cpu_seconds(server.pid) - before
                requests = result["rps"] * d
                result["main_us"] = spent / requests * 1e6 if requests else float("nan")
                self.record("3. cpu 2 ms c=16", name, result)

        # 4: mixed, 10% ~50 ms and 90% ~1 ms, 8 in flight; the short ones' latency
        mix = "10:cpu:50000,90:cpu:1000"
        for _ in range(a.repeat):
            for name in pythons:
                result = self.load.run(
                    self.servers[name].port, concurrency=8, duration=d, warmup=w, mix=mix
                )
                short = next(c for c in result["classes"] if c["text"] == "cpu:1000")
                result["short_p50"], result["short_p99"] = short["p50"], short["p99"]
                self.record("4. mixed c=8", name, result)

    def memory_scenario(self) -> None:
        """6: resident memory after warm-up and after --memory-requests requests, each server."""
        total = self.args.memory_requests
        servers = [gaspar_server("gaspar", 2, "echo")]
        servers += [baseline_server(name, 2, "echo") for name in BASELINES]
        for server in servers:
            server.start()
            try:
                self.load.run(server.port, concurrency=16, duration=2, warmup=0)
                after_warmup = self._memory(server.pid)
                done = 0
                started = time.monotonic()
                while done < total:
                    result = self.load.run(server.port, concurrency=64, duration=10, warmup=0)
                    done += int(result["rps"] * 10)
                    if time.monotonic() - started > self.args.memory_budget:
                        self.notes.append(
                            f"Memory run on {server.name} stopped at {done:,} requests "
                            f"(time budget {self.args.memory_budget:.0f} s)."
                        )
                        break
                self.memory[server.name] = {
                    "warm": after_warmup,
                    "end": self._memory(server.pid),
                    "requests": done,
                }
                print(f"  6. memory {server.name}: {self.memory[server.name]}", flush=True)
            finally:
                server.stop()

    def _memory(self, pid: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in process_tree(pid):
            try:
                rss, pss = memory_kib(p)
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            out.append({"pid": p, "rss_kib": rss, "pss_kib": pss, "root": p == pid, "cmd": cmd})
        return out


# -- the report ------------------------------------------------------------------------


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({model}), "
        f"Python {platform.python_version()}, gaspar at {commit or 'unknown commit'}"
    )


def targets(suite: Suite) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows from the medians of this run: issue 10's targets.

    A verdict of "-" marks a reference row (no target); "ab.py" a target judged elsewhere.
    """
    r, nan = suite.rows, float("nan")
    out: list[tuple[str, str, str]] = []

    def med(scenario: str, server: str, key: str) -> float:
        row = r.get((scenario, server))
        return row.median(key) if row else nan

    def best(scenario: str, key: str, higher: bool = True) -> tuple[float, str]:
        """The best baseline's median of `key` in `scenario`, and that baseline's name."""
        found = [(med(scenario, name, key), name) for name in BASELINES]
        found = [(value, name) for value, name in found if not math.isnan(value)]
        if not found:
            return nan, "no baseline"
        return (max if higher else min)(found)

    def ratio(
        label: str,
        num: float,
        den: float,
        goal: float | None,
        higher: bool = True,
        detail: str = "",
    ) -> None:
        """A row num / den against `goal` (None: a reference row, no verdict)."""
        value = num / den if den else nan
        # Three decimals: a ratio of 1.995 must not read "2.00x ... missed".
        measured = f"{value:.3f}x" + (f" ({detail})" if detail else "")
        if goal is None:
            out.append((f"{label} (reference)", measured, "-"))
            return
        met = value >= goal if higher else value <= goal
        sign = ">=" if higher else "<="
        out.append((f"{label} {sign} {goal:g}x", measured, "met" if met else "missed"))

    def no_c(label: str) -> None:
        out.append((label, "no C server in this run", "-"))

    # echo 16 B, 1 in flight: latency
    s = "1. echo v1 c=1"
    base, name = best(s, "p50", higher=False)
    p50 = med(s, "gaspar", "p50")
    ratio(
        "echo 16 B v1 c=1: gaspar p50 / best baseline p50",
        p50,
        base,
        0.4,
        higher=False,
        detail=f"{p50:.3f} / {base:.3f} ms, {name}",
    )
    label = "echo 16 B v2 c=1: gaspar v2 p50 / C epoll v1 c=1 p50"
    if suite.use_c:
        v2, c = med("2. echo v2 c=1", "gaspar", "p50"), med(s, "C epoll", "p50")
        ratio(label, v2, c, 1.0, higher=False, detail=f"{v2:.3f} / {c:.3f} ms")
    else:
        no_c(label)
    # echo 16 B, many in flight: throughput (c=16 kept as a reference)
    for conc, goal_base, goal_c in ((64, 3.5, 0.5), (16, None, None)):
        s = f"1. echo v1 c={conc}"
        rps = med(s, "gaspar", "rps")
        base, name = best(s, "rps")
        ratio(
            f"echo 16 B v1 c={conc}: gaspar / best baseline req/s",
            rps,
            base,
            goal_base,
            detail=name,
        )
        label = f"echo 16 B v1 c={conc}: gaspar / C epoll req/s"
        if suite.use_c:
            ratio(label, rps, med(s, "C epoll", "rps"), goal_c)
        else:
            no_c(label)
    v2 = med("2. echo v2 c=64", "gaspar", "rps")
    v1 = med("1. echo v1 c=64", "gaspar", "rps")
    out.append(
        (
            "echo 16 B v2 c=64: gaspar req/s (target >= 1.5x the revision before issue 10, "
            "judged from one benchmarks/ab.py run)",
            f"{v2:,.0f} req/s (v2 / v1 c=64 {v2 / v1 if v1 else nan:.3f}x)",
            "ab.py",
        )
    )
    # 2 ms CPU-bound handler: the producer's CPU against the baseline's main process
    s = "3. cpu 2 ms c=16"
    ours, theirs = med(s, "gaspar", "main_us"), med(s, CPU_BASELINE, "main_us")
    ratio(
        f"cpu 2 ms c=16: gaspar producer CPU per request / {CPU_BASELINE} main process's",
        ours,
        theirs,
        0.33,
        higher=False,
        detail=f"{ours:.0f} / {theirs:.0f} us",
    )
    ratio(
        "cpu 2 ms c=16: gaspar 2 workers / 1 worker req/s",
        med(s, "gaspar", "rps"),
        med(s, "gaspar 1 worker", "rps"),
        1.85,
    )
    # 1 MiB echo, 4 in flight
    s = "5. echo 1 MiB c=4"
    mb = med(s, "gaspar", "mb_per_s")
    base, name = best(s, "mb_per_s")
    ratio("echo 1 MiB c=4: gaspar / best baseline MB/s", mb, base, 3.0, detail=name)
    label = "echo 1 MiB c=4: gaspar / C epoll MB/s"
    if suite.use_c:
        ratio(label, mb, med(s, "C epoll", "mb_per_s"), 0.6)
    else:
        no_c(label)
    # memory (scenario 6): PSS counts a page the forked processes share once, RSS once each
    mem = suite.memory

    def pss(snap: list[dict[str, Any]]) -> int:
        return sum(p["pss_kib"] for p in snap)

    def rss(snap: list[dict[str, Any]]) -> int:
        return sum(p["rss_kib"] for p in snap)

    if "gaspar" in mem:
        ends = {name: mem[name]["end"] for name in BASELINES if name in mem}
        if ends:
            name = min(ends, key=lambda n: pss(ends[n]))
            ratio(
                "memory: PSS of all of gaspar's processes / best baseline's",
                pss(mem["gaspar"]["end"]),
                pss(ends[name]),
                1.0,
                higher=False,
                detail=f"{pss(mem['gaspar']['end']):,} / {pss(ends[name]):,} KiB, {name}",
            )
            name = min(ends, key=lambda n: rss(ends[n]))
            ratio(
                "memory: RSS sum of gaspar's processes / best baseline's",
                rss(mem["gaspar"]["end"]),
                rss(ends[name]),
                None,
                detail=f"{rss(mem['gaspar']['end']):,} / {rss(ends[name]):,} KiB, {name}",
            )
        producer = [
            next(p["rss_kib"] for p in mem["gaspar"][k] if p["root"]) for k in ("warm", "end")
        ]
        growth = producer[1] / producer[0] - 1
        done, goal = mem["gaspar"]["requests"], suite.args.memory_requests
        verdict = "met" if growth < 0.05 else "missed"
        if done < goal:
            verdict = f"not judged: {done:,} of {goal:,} requests"
        out.append(
            (
                f"memory: gaspar producer RSS growth, warm-up to {goal:,} requests < 5%",
                f"{growth * 100:+.1f}% after {done:,} requests",
                verdict,
            )
        )
    # mixed load: as before issue 10
    s = "4. mixed c=8"
    base, name = best(s, "short_p99", higher=False)
    ratio(
        "mixed c=8: 1 ms requests' p99, gaspar / best baseline",
        med(s, "gaspar", "short_p99"),
        base,
        1.0,
        higher=False,
        detail=name,
    )
    return out


def write_report(suite: Suite, command: str, started: datetime.datetime) -> None:
    docs = ROOT / "docs"
    lines = [
        "# Benchmarks",
        "",
        f"Run on {started:%Y-%m-%d %H:%M} UTC: {machine()}.",
        f"Load generator: {suite.load.name}. Each figure is the median of "
        f"{suite.args.repeat} interleaved runs of {suite.args.duration:g} s "
        f"(after {suite.args.warmup:g} s of warm-up), every server with 2 workers unless "
        "named otherwise. The machine is shared and noisy: read ratios within this run, "
        "not absolute figures across runs.",
        "",
        "Baselines (benchmarks/baseline.py, protocol v1, the same handlers): asyncio+PPE and "
        "uvloop+PPE, `asyncio.start_server` + ProcessPoolExecutor through `run_in_executor`; "
        "uvloop+Pebble, the same server + Pebble's `ProcessPool` through "
        "`pool.schedule(..., timeout=TASK_TIMEOUT)` (a per-task timeout that no scenario "
        "reaches) and `asyncio.wrap_future`. "
        '"Best baseline" in a target is the best of the three on that figure (named beside it).',
        "",
        "Command (from a fresh clone):",
        "",
        "```sh",
        "make bench",
        f"# which runs: {command}",
        "```",
        "",
        "![throughput and p99 latency per scenario](benchmarks.png)",
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(suite)]
    lines += [
        "",
        "## Scenarios",
        "",
        "| scenario | server | req/s | p50 ms | p99 ms | MB/s | errors | loadgen CPU | extra |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in suite.rows.values():
        extra = ""
        if row.runs and "main_us" in row.runs[0]:
            main = "producer" if row.server.startswith("gaspar") else "main process"
            extra = f"{main} CPU {row.median('main_us'):.0f} us/request"
        if row.runs and "short_p99" in row.runs[0]:
            short = row.median("short_p50"), row.median("short_p99")
            extra = f"1 ms requests: p50 {short[0]:.2f} ms, p99 {short[1]:.2f} ms"
        lines.append(
            f"| {row.scenario} | {row.server} | {row.median('rps'):,.0f} | "
            f"{row.median('p50'):.3f} | {row.median('p99'):.3f} | {row.median('mb_per_s'):.1f} | "
            f"{row.errors()} | {row.median('cpu_share') * 100:.0f}% | {extra} |"
        )
    if suite.memory:
        lines += [
            "",
            "## Memory (scenario 6)",
            "",
            "Resident (RSS) and proportional (PSS) memory of every process of the server, "
            "after a 2 s warm-up and after the requests shown.",
            "",
            "| server | process | RSS warm KiB | RSS end KiB | PSS end KiB |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for name, snap in suite.memory.items():
            warm = {p["pid"]: p for p in snap["warm"]}
            for proc in snap["end"]:
                was = warm.get(proc["pid"], {}).get("rss_kib", 0)
                role = "producer / parent" if proc["root"] else proc["cmd"][:40]
                lines.append(
                    f"| {name} ({snap['requests']:,} requests) | {role} | {was:,} | "
                    f"{proc['rss_kib']:,} | {proc['pss_kib']:,} |"
                )
    if suite.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in suite.notes]
    lines += kept_section(docs / "benchmarks.md")
    (docs / "benchmarks.md").write_text("\n".join(lines) + "\n")
    chart(suite, docs / "benchmarks.png")


def kept_section(page: Path) -> list[str]:
    """The lines of `page` from KEPT_BEGIN to KEPT_END (none if absent), after a blank one."""
    text = page.read_text() if page.exists() else ""
    if KEPT_BEGIN not in text or KEPT_END not in text:
        return []
    block = text.split(KEPT_BEGIN, 1)[1].split(KEPT_END, 1)[0]
    return ["", KEPT_BEGIN, *block.strip("\n").splitlines(), KEPT_END]


def chart(suite: Suite, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        suite.notes.append(
            "matplotlib is not installed (pip install -r benchmarks/requirements.txt): no chart."
        )
        return
    scenarios = list(dict.fromkeys(row.scenario for row in suite.rows.values()))
    servers = list(dict.fromkeys(row.server for row in suite.rows.values()))
    fig, axes = plt.subplots(2, 1, figsize=(12, 8))
    width = 0.8 / len(servers)
    for i, server in enumerate(servers):
        xs, rps, p99 = [], [], []
        for j, scenario in enumerate(scenarios):
            row = suite.rows.get((scenario, server))
            if row:
                xs.append(j + i * width)
                rps.append(row.median("rps"))
                p99.append(row.median("p99"))
        axes[0].bar(xs, rps, width, label=server)
        axes[1].bar(xs, p99, width, label=server)
    for ax, title in zip(
        axes,
        ("requests per second (higher is better)", "p99 latency, ms (lower is better)"),
        strict=True,
    ):
        ax.set_title(title)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scenarios))])
        ax.set_xticklabels(scenarios, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per run")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--processes", type=int, default=2, help="Python load processes")
    parser.add_argument("--memory-requests", type=int, default=500_000)
    parser.add_argument("--memory-budget", type=float, default=300.0, help="seconds at most")
    parser.add_argument("--no-memory", action="store_true", help="skip scenario 6")
    args = parser.parse_args(argv)
    command = "python benchmarks/suite.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    suite = Suite(args)
    try:
        suite.start_servers()
        suite.scenarios()
    finally:
        suite.stop_servers()
    if not args.no_memory:
        suite.memory_scenario()
    write_report(suite, command.strip(), started)
    print((ROOT / "docs" / "benchmarks.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A/B: gaspar at two git revisions, run interleaved under one load.

    python benchmarks/ab.py BASE [HEAD] [--concurrency 16] [--protocol v1|v2]
        [--size 16 | --payload-file F | --mix W:TEXT,...] [--handler echo|work]
        [--workers 2] [--duration 3] [--warmup 1] [--repeat 5]

BASE and HEAD are git revisions (HEAD defaults to the working tree).  Each
side's ``gaspar`` package is exported to a temporary directory and served from
there (``python -m gaspar serve benchmarks.handlers:HANDLER``, the handlers of
the working tree); the runs alternate A B A B ... so that the machine's drift
falls on both, and the medians are printed with the ratio B/A: requests/s,
p50 and p99 latency, the producer's CPU per request (all its threads), the
rest of the server's CPU per request (supervisor and workers), and the
server's total RSS and PSS at the end of each run.  The load comes from the C
generator (``benchmarks/c``).  Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.suite import (  # noqa: E402
    CDIR,
    ROOT,
    LoadGen,
    Server,
    cpu_seconds,
    memory_kib,
    process_tree,
)

WORKTREE = "worktree"
COLUMNS = [
    ("rps", "req/s", "{:,.0f}"),
    ("p50", "p50 ms", "{:.3f}"),
    ("p99", "p99 ms", "{:.3f}"),
    ("producer_us", "producer CPU us/req", "{:.1f}"),
    ("others_us", "workers+supervisor CPU us/req", "{:.1f}"),
    ("rss_kib", "RSS KiB", "{:,.0f}"),
    ("pss_kib", "PSS KiB", "{:,.0f}"),
]


def export(rev: str, dest: Path) -> None:
    """Put the gaspar package as of `rev` (or the working tree) under `dest`."""
    if rev == WORKTREE:
        shutil.copytree(ROOT / "gaspar", dest / "gaspar")
        return
    archive = subprocess.run(
        ["git", "archive", rev, "gaspar"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def measure(server: Server, load: LoadGen, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then one measured load; CPU and memory of the server's processes."""
    options: dict[str, Any] = {"protocol": args.protocol, "concurrency": args.concurrency}
    if args.mix:
        options["mix"] = args.mix
    elif args.payload_file:
        options["payload_file"] = args.payload_file
    else:
        options["size"] = args.size
    if args.warmup > 0:
        load.run(server.port, duration=args.warmup, warmup=0, **options)
    tree = process_tree(server.pid)
    before = {pid: cpu_seconds(pid) for pid in tree}
    result = load.run(server.port, duration=args.duration, warmup=0, **options)
    spent = {pid: cpu_seconds(pid) - before[pid] for pid in tree}
    requests = result["rps"] * args.duration or float("nan")
    result["producer_us"] = spent[server.pid] / requests * 1e6
    result["others_us"] = sum(v for pid, v in spent.items() if pid != server.pid) / requests * 1e6
    memory = [memory_kib(pid) for pid in tree]
    result["rss_kib"] = sum(rss for rss, _ in memory)
    result["pss_kib"] = sum(pss for _, pss in memory)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="git revision for A")
    parser.add_argument("head", nargs="?", default=WORKTREE, help="git revision for B")
    parser.add_argument("--protocol", choices=["v1", "v2"], default="v1")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--payload-file")
    parser.add_argument("--mix", help="as the C load generator's --mix (with --handler work)")
    parser.add_argument("--handler", choices=["echo", "work"], default="echo")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if subprocess.run(["make", "-s", "-C", str(CDIR)], capture_output=True).returncode:
        print("the C load generator did not build (make -C benchmarks/c)", file=sys.stderr)
        return 1
    load = LoadGen(use_c=True, processes=1)
    sides = {"A": args.base, "B": args.head}
    results: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="gaspar-ab-") as tmp:
        dirs = {}
        for side, rev in sides.items():
            dirs[side] = Path(tmp) / side
            dirs[side].mkdir()
            export(rev, dirs[side])
        for repeat in range(args.repeat):
            for side in ("A", "B"):
                # Run from the exported tree, so that its gaspar is the one imported.
                server = Server(
                    f"{side} ({sides[side]})",
                    [sys.executable, "-m", "gaspar", "serve", f"benchmarks.handlers:{args.handler}"]
                    + ["--port", "0", "--workers", str(args.workers), "--log-level", "info"],
                    cwd=dirs[side],
                    env={**os.environ, "PYTHONPATH": f"{dirs[side]}:{ROOT}"},
                )
                server.start()
                try:
                    result = measure(server, load, args)
                finally:
                    server.stop()
                results[side].append(result)
                print(
                    f"repeat {repeat + 1}/{args.repeat} {side}: {result['rps']:,.0f} req/s, "
                    f"p50 {result['p50']:.3f} ms, producer {result['producer_us']:.1f} us/req, "
                    f"errors {result['errors']}",
                    flush=True,
                )
    print()
    print(f"| median of {args.repeat} | A: {args.base} | B: {args.head} | B/A |")
    print("| --- | ---: | ---: | ---: |")
    for key, label, fmt in COLUMNS:
        a = statistics.median(r[key] for r in results["A"])
        b = statistics.median(r[key] for r in results["B"])
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f}x |")
    errors = sum(r["errors"] for side in results.values() for r in side)
    print(f"\nerrors: {errors}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

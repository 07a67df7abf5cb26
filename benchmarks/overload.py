"""Overload: how much worker time goes to requests whose client had already given up.

    python benchmarks/overload.py [--workers 2] [--work 0.02] [--factor 10]
        [--duration 10] [--client-timeout 1.0]

A producer on 127.0.0.1 (a child process) serves a handler that simulates
`--work` seconds of work and writes (request tag, start, end) for every run
to a file per worker in a temporary directory.  An open-loop asyncio client
offers `--factor` times what the workers can serve (workers / work requests a
second) for `--duration` seconds, each request with a timeout of
`--client-timeout`, and notes when it gave up on each tag.  Two phases, same
load: "off" (``AsyncClient(deadlines=False)``: plain v2, no deadline, no
cancel) and "on" (the default: each request carries its timeout as a deadline
and is cancelled when the client gives up).

Reported per phase: requests offered, answered in time, given up, refused
(OVERLOADED); worker time in the load window; and the share of it spent on
requests whose client had already given up: runs that started after the
give-up ("wasted, started late"), and that plus the part after the give-up of
runs already under way ("wasted, all").  Every time is CLOCK_MONOTONIC, which
the processes of one host share.  Bounded: about 2 x (duration + 6) seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gaspar  # noqa: E402
from gaspar import aio  # noqa: E402

RECORD_DIR = "GASPAR_OVERLOAD_DIR"
WORK = "GASPAR_OVERLOAD_WORK"


def handler(message: bytes) -> bytes:
    """Simulate WORK seconds of work; append (tag, start, end) to this worker's file."""
    start = time.monotonic()
    time.sleep(float(os.environ[WORK]))  # handler: simulated work of a known length
    end = time.monotonic()
    path = os.path.join(os.environ[RECORD_DIR], f"worker-{os.getpid()}.log")
    with open(path, "a") as f:
        f.write(f"{message.decode()} {start:.6f} {end:.6f}\n")
    return message


def serve(workers: int) -> None:
    """The child: serve until stdin closes, printing the port once ready."""
    producer = gaspar.Producer(handler, 0, processes=workers, host="127.0.0.1", timeout=30)
    producer.start(blocking=False)
    print(producer.address[1], flush=True)
    sys.stdin.read()
    producer.stop(grace=0)


async def offer(port: int, deadlines: bool, rate: float, duration: float, timeout: float):
    """Open-loop load: one request every 1/rate s; returns outcomes and give-up times."""
    gave_up: dict[str, float] = {}
    outcome = {"ok": 0, "gave_up": 0, "refused": 0, "other": 0}
    async with aio.AsyncClient(
        ("127.0.0.1", port), connections=16, max_in_flight=128, deadlines=deadlines
    ) as client:

        async def one(tag: str) -> None:
            try:
                await client.request(tag, timeout=timeout)
                outcome["ok"] += 1
            except gaspar.RequestTimeout:
                gave_up[tag] = time.monotonic()
                outcome["gave_up"] += 1
            except gaspar.Overloaded:
                outcome["refused"] += 1
            except gaspar.RequestFailed:
                outcome["other"] += 1

        await client.request("warm-up", timeout=10)  # connections open before the clock starts
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        tasks = []
        n = 0
        while (now := time.monotonic()) < start + duration:
            due = start + n / rate
            if due > now:
                await asyncio.sleep(due - now)  # pacing of the open-loop generator
                continue
            tasks.append(loop.create_task(one(f"t{n}")))
            n += 1
        end = time.monotonic()
        await asyncio.gather(*tasks)
    return n, outcome, gave_up, start, end


def worker_time(directory: Path, gave_up: dict[str, float], start: float, end: float):
    """(total, wasted started late, wasted all) worker seconds of runs started in [start, end]."""
    total = late = partial = 0.0
    for path in directory.glob("worker-*.log"):
        for line in path.read_text().splitlines():
            tag, s, e = line.split()
            began, ended = float(s), float(e)
            if not start <= began <= end:
                continue
            total += ended - began
            given = gave_up.get(tag)
            if given is None or given >= ended:
                continue
            if given <= began:
                late += ended - began
            else:
                partial += ended - given
    return total, late, late + partial


def phase(name: str, deadlines: bool, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        env = dict(os.environ, **{RECORD_DIR: tmp, WORK: str(args.work)})
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(args.workers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            port = int(child.stdout.readline())
            rate = args.factor * args.workers / args.work
            n, outcome, gave_up, start, end = asyncio.run(
                offer(port, deadlines, rate, args.duration, args.client_timeout)
            )
            child.stdin.close()
            child.wait(30)
        finally:
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
                child.wait()
        total, late, wasted = worker_time(Path(tmp), gave_up, start, end)
    share_late = late / total if total else 0.0
    share_all = wasted / total if total else 0.0
    print(
        f"{name:>4}: offered {n} ({rate:.0f}/s for {args.duration:g} s), "
        f"answered {outcome['ok']}, gave up {outcome['gave_up']}, "
        f"refused {outcome['refused']}, other {outcome['other']}; "
        f"worker time {total:.1f} s, wasted: started late {share_late:.1%}, "
        f"all {share_all:.1%}",
        flush=True,
    )
    return {"late": share_late, "all": share_all, "ok": outcome["ok"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=float, default=0.02, help="seconds per request")
    parser.add_argument("--factor", type=float, default=10.0, help="offered load / capacity")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--client-timeout", type=float, default=1.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    print(
        f"{args.workers} workers x {args.work * 1000:g} ms: capacity "
        f"{args.workers / args.work:.0f}/s; offered {args.factor:g}x; "
        f"clients give up at {args.client_timeout:g} s",
        flush=True,
    )
    phase("off", False, args)
    phase("on", True, args)


if __name__ == "__main__":
    main()

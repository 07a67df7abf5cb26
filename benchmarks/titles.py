"""What a worker's busy/idle title and its liveness timeout cost per request.

    python benchmarks/titles.py [--rounds 9] [--requests 20000]

A worker (gaspar.worker.serve, forked, as the supervisor runs it) answers
16-byte jobs on a Unix socket pair; this process sends one job at a time
and waits for its reply (the frames of gaspar/workerproto.py).  Four kinds of
run alternate: bare, with titles (setproctitle when installed, else prctl),
with the liveness receive timeout (SO_RCVTIMEO), and with both; the medians
of the round trip and of the worker's CPU per request are printed, and each
one's difference from the bare run of its round.  Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gaspar import workerproto as wp  # noqa: E402
from gaspar.consumer import Consumer  # noqa: E402
from gaspar.proctitle import setter  # noqa: E402
from gaspar.worker import _titles, serve  # noqa: E402


def run(titles: bool, liveness: bool, requests: int) -> tuple[float, float]:
    """(round trip in µs, worker CPU in µs) per request."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        busy = _titles(setter(), "gaspar: worker 1") if titles else None
        serve(Consumer(lambda m: m), theirs, 1 << 20, busy=busy, liveness=30 if liveness else None)
        os._exit(0)
    theirs.close()
    reader = wp.FrameReader(1 << 20)

    def next_message() -> wp.Message:
        while (message := reader.next()) is None:
            n = ours.recv_into(reader.get_buffer())
            assert n
            reader.feed(n)
        return message

    assert next_message()[0] == wp.READY
    job = wp.frame(wp.JOB, wp.job_id(1), b"x" * 16)[0]
    for _ in range(1000):  # warm-up
        ours.sendall(job)
        next_message()
    cpu0 = _cpu(pid)
    started = time.perf_counter()
    for _ in range(requests):
        ours.sendall(job)
        next_message()
    elapsed = time.perf_counter() - started
    cpu = _cpu(pid) - cpu0
    ours.close()
    os.waitpid(pid, 0)
    return elapsed / requests * 1e6, cpu / requests * 1e6


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    kinds = {
        "bare": (False, False),
        "titles": (True, False),
        "liveness": (False, True),
        "both": (True, True),
    }
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in kinds}
    for _ in range(args.rounds):
        for name, (titles, liveness) in kinds.items():
            rows[name].append(run(titles, liveness, args.requests))
    bare = rows["bare"]
    for name, runs in rows.items():
        rtt = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        d_rtt = statistics.median(a - b for (a, _), (b, _) in zip(runs, bare, strict=True))
        d_cpu = statistics.median(a - b for (_, a), (_, b) in zip(runs, bare, strict=True))
        print(
            f"{name:9} round trip {rtt:6.2f} us ({d_rtt:+5.2f})"
            f"   worker CPU {cpu:6.2f} us/request ({d_cpu:+5.2f})"
        )


if __name__ == "__main__":
    main()

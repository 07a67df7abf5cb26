"""Simulated worker hosts: N bare DEALER sockets in one process, for what hosts cost a producer.

    python benchmarks/hosts.py ENDPOINT --hosts 50 --heartbeat 1.0
        [--key FILE --server-key FILE | --insecure] [--echo]

Each simulated host is one DEALER socket (one worker slot) that speaks the
worker wire of docs/protocol.md ("The worker wire") and nothing more: it
says READY (as a host of its own), sends a HEARTBEAT every interval and
reads the producer's; with
``--echo`` it also answers each JOB (and each job of a BATCH) with DONE and
the payload, so the producer can be loaded through many slots.  There is no
supervisor and no handler: what the producer spends on them is its own cost
per host.  It prints ``joined N`` on standard output once every socket has
heard from the producer, and on SIGTERM or SIGINT it prints one JSON line
(messages and payload bytes each way, the bytes of HEARTBEAT frames both ways,
the seconds it ran, its own CPU seconds) and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import zmq
import zmq.auth

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gaspar import workerproto as wp  # noqa: E402

# The heartbeat frame: its kind (docs/protocol.md, "The worker wire"), job id 0, no body.
HEARTBEAT = getattr(wp, "HEARTBEAT", b"H")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("endpoint")
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--key", help="the hosts' secret certificate (one for all)")
    parser.add_argument("--server-key", help="the producer's public certificate")
    parser.add_argument("--insecure", action="store_true", help="no CURVE (loopback only)")
    parser.add_argument("--echo", action="store_true", help="answer jobs with their payload")
    args = parser.parse_args()
    if not args.insecure and not (args.key and args.server_key):
        parser.error("--key and --server-key, or --insecure")

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    ctx = zmq.Context()
    sockets: list[zmq.Socket[bytes]] = []
    for n in range(args.hosts):
        sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if not args.insecure:
            public, secret = zmq.auth.load_certificate(args.key)
            server_public, _ = zmq.auth.load_certificate(args.server_key)
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = server_public
        sock.identity = b"sim-%d-%d" % (os.getpid(), n)
        sock.connect(args.endpoint)
        sockets.append(sock)
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    # READY's info names a host ("node") of its own for each socket: the producer takes a
    # READY from a known node and pid for a worker that joins again, and drops the former.
    base = json.loads(wp.ready_info())
    readies = [
        wp.head(wp.READY, wp.job_id(0))
        + json.dumps(
            {**base, "node": f"sim-{n}/{os.getpid()}", "heartbeat": args.heartbeat}
        ).encode()
        for n in range(len(sockets))
    ]
    beat = wp.head(HEARTBEAT, wp.job_id(0), int(args.heartbeat * 1000))
    counts = {"sent": 0, "sent_bytes": 0, "received": 0, "received_bytes": 0, "heartbeat_bytes": 0}
    started = time.monotonic()

    def send(sock: zmq.Socket[bytes], message: bytes) -> None:
        sock.send(message)
        counts["sent"] += 1
        counts["sent_bytes"] += len(message)
        if message[:1] == HEARTBEAT:
            counts["heartbeat_bytes"] += len(message)

    for sock, ready in zip(sockets, readies, strict=True):
        send(sock, ready)
    heard: set[int] = set()
    announced = False
    next_beat = time.monotonic() + args.heartbeat
    while not stop:
        timeout = max(0.0, next_beat - time.monotonic())
        try:
            events = poller.poll(timeout * 1000)
        except zmq.ZMQError:  # interrupted by a signal
            continue
        for sock, _ in events:
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                counts["received"] += 1
                counts["received_bytes"] += sum(map(len, frames))
                if frames[0][:1] == HEARTBEAT:
                    counts["heartbeat_bytes"] += sum(map(len, frames))
                heard.add(id(sock))
                first = frames[0]
                kind, jid = first[:1], first[1:9]
                body = frames[1] if len(frames) > 1 else first[wp.HEAD_SIZE :]
                if args.echo and kind == wp.JOB:
                    send(sock, wp.head(wp.DONE, jid) + body)
                elif args.echo and kind == wp.BATCH:
                    count = int.from_bytes(first[9 : wp.HEAD_SIZE], "big")
                    for job, payload in wp.unpack_batch(body, count):
                        send(sock, wp.head(wp.DONE, job) + payload)
        if not announced and len(heard) == len(sockets):
            print(f"joined {len(sockets)}", flush=True)
            announced = True
        now = time.monotonic()
        if now >= next_beat:
            for sock in sockets:
                send(sock, beat)
            next_beat = now + args.heartbeat
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()
    usage = os.times()
    seconds = time.monotonic() - started
    cpu = usage.user + usage.system
    print(json.dumps({**counts, "seconds": seconds, "cpu_s": cpu}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

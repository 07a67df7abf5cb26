"""`run`: probe the server, start the generator processes, gather and merge their results.

The processes are started with multiprocessing's ``spawn`` context, so that
nothing of the caller (a producer, an event loop, a ZeroMQ context) is forked.
"""

from __future__ import annotations

import multiprocessing
import socket
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from ..address import format_address, parse_address
from ..clientcore import check_protocol
from ..protocol import MAGIC_V2
from . import CLIENTS, DEFAULT_TIMEOUT
from .generator import child_main
from .plan import DRAIN_GRACE, RESULT_SLACK, START_TIMEOUT, Plan, split
from .report import Progress, aggregate, ms, percentile

__all__ = ["run"]


def _resolve(host: str, port: int) -> tuple[int, str]:
    """Resolve `host` once, so that no request pays for a DNS look-up."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectionError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])


def _probe(family: int, ip: str, port: int, protocol: str, timeout: float) -> None:
    """Connect once (for v2, also check the server's preamble); raise ConnectionError if not."""
    where = format_address(ip, port)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect((ip, port))
            if protocol == "v2":
                sock.sendall(MAGIC_V2)
                answer = b""
                while len(answer) < len(MAGIC_V2):
                    chunk = sock.recv(len(MAGIC_V2) - len(answer))
                    if not chunk:
                        break
                    answer += chunk
                if answer != MAGIC_V2:
                    raise ConnectionError("it does not answer the protocol v2 preamble")
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConnectionError(f"cannot reach the server at {where}: {reason}") from exc


def _gather(
    conns: Sequence[Connection],
    tag: str,
    timeout: float,
    on_progress: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Receive one `tag` message from every connection within `timeout` seconds.

    "progress" messages that come first go to `on_progress(index, body)`.
    """
    deadline = time.monotonic() + timeout
    replies: dict[int, Any] = {}
    pending = {conn: i for i, conn in enumerate(conns)}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(
                f"{len(pending)} load generator process(es) sent no {tag} within {timeout:.0f}s"
            )
        for ready in wait(list(pending), left):
            conn = cast(Connection, ready)
            index = pending[conn]
            try:
                kind, body = conn.recv()
            except EOFError:
                raise RuntimeError(f"load generator process {index} exited early") from None
            if kind == "progress":
                if on_progress is not None:
                    on_progress(index, body)
                continue
            if kind == "error":
                raise RuntimeError(f"load generator process {index} failed: {body}")
            if kind != tag:
                raise RuntimeError(f"load generator process {index} sent {kind!r}, not {tag!r}")
            del pending[conn]
            replies[index] = body
    return [replies[i] for i in range(len(conns))]


def run(
    address: str | tuple[str, int],
    concurrency: int,
    duration: float,
    size: int = 16,
    processes: int = 1,
    warmup: float = 1.0,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    protocol: str = "v1",
    client: str = "raw",
    connections: int = 1,
    payload: bytes | None = None,
    check_echo: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Load the server at `address` in a closed loop; return the measured results.

    `concurrency` requests are kept in flight by `processes` generator
    processes (at most one per request in flight) for `warmup` + `duration`
    seconds; only the last `duration` seconds are measured.  Each request
    carries `payload` unchanged when given, else `size` random bytes (tagged
    per request when 12 bytes or more).  `protocol` is "v1" (a fresh
    connection per request) or "v2" (`connections` persistent connections per
    process, at most one per request in flight); `client` is "raw" (this
    module's own asyncio code) or "aio" (:mod:`gaspar.aio`).  `timeout`
    bounds each connect and each wait for a reply.  With `check_echo`, a
    reply must equal its request or it counts as a "mismatch"; without, any
    successful reply counts.  With `progress`, a line of running totals goes
    to standard error every second of the measured window.

    Raises ValueError for bad arguments, ConnectionError (an OSError) before
    any load starts when the server cannot be resolved or reached (one
    connection probes it; for v2 it also checks the server's preamble), and
    RuntimeError when a generator process fails.
    """
    if payload is not None:
        size = len(payload)
    if concurrency < 1 or processes < 1 or connections < 1:
        raise ValueError("concurrency, processes and connections must be at least 1")
    if duration <= 0 or warmup < 0 or timeout <= 0 or size < 0:
        raise ValueError("duration and timeout must be positive; warmup and size not negative")
    check_protocol(protocol)
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {', '.join(CLIENTS)}, not {client!r}")
    host, port = parse_address(address)
    family, ip = _resolve(host, port)
    _probe(family, ip, port, protocol, timeout)
    shares = split(concurrency, min(processes, concurrency))
    on_progress = Progress(len(shares), sys.stderr) if progress else None
    ctx = multiprocessing.get_context("spawn")
    children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        first_id = 0
        for index, coroutines in enumerate(shares):
            plan = Plan(
                ip,
                port,
                family,
                first_id,
                coroutines,
                size,
                warmup,
                duration,
                timeout,
                protocol=protocol,
                client=client,
                connections=min(connections, coroutines),
                payload=payload,
                check_echo=check_echo,
                progress=progress,
            )
            first_id += coroutines
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=child_main, args=(theirs, plan), name=f"gaspar-bench-{index}", daemon=True
            )
            proc.start()
            theirs.close()
            children.append((proc, ours))
        conns = [conn for _, conn in children]
        _gather(conns, "ready", START_TIMEOUT)
        for conn in conns:
            conn.send("go")
        parts = _gather(
            conns, "result", warmup + duration + DRAIN_GRACE + RESULT_SLACK, on_progress
        )
    except BaseException:  # a process failed, or Ctrl-C: stop the others at once
        for child, _ in children:
            if child.is_alive():
                child.kill()
        raise
    finally:
        for _, conn in children:
            conn.close()
        for child, _ in children:
            child.join(5.0)
            if child.is_alive():
                child.kill()
                child.join()
    merged = aggregate(parts)
    latencies = merged.pop("latencies")
    requests = len(latencies)
    return {
        "address": format_address(host, port),
        "protocol": protocol,
        "client": client,
        "concurrency": concurrency,
        "processes": len(shares),
        # v2: persistent connections over all processes; v1 opens one per request.
        "connections": sum(min(connections, s) for s in shares) if protocol == "v2" else None,
        "size": size,
        "payload": "random" if payload is None else "fixed",
        "check_echo": check_echo,
        "warmup": warmup,
        "duration": duration,
        "requests": requests,
        "rps": round(requests / duration, 2),
        "latency_ms": {
            "p50": ms(percentile(latencies, 50)),
            "p90": ms(percentile(latencies, 90)),
            "p99": ms(percentile(latencies, 99)),
            "mean": ms(sum(latencies) / requests if requests else None),
            "max": ms(latencies[-1] if latencies else None),
        },
        "error_total": sum(merged["errors"].values()),
        **merged,
    }

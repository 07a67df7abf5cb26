"""Remote workers measured: the pool side by side, the idle-only rule over a slow link, limits.

    python benchmarks/remote.py [--duration 3] [--warmup 1] [--repeat 3]
        [--parts pool,rtt,limits,hosts,curve] [--write]

Five parts (issue 11 items 4 and 6), each run interleaved (A B C A B C ...)
``--repeat`` times, medians reported; the load comes from the C generator
(benchmarks/c), the CPU times from /proc:

- pool: a 2 ms CPU-bound handler (benchmarks/handlers.py ``work``, ``cpu:2000``),
  16 in flight over v2, served by 2 local workers, 2 remote workers on loopback
  with CURVE, 2 remote without it (``--insecure-workers``), and 2 local + 2
  remote; req/s, p50/p99, and the CPU per request of the producer, of the
  worker host's own process (the relay between its DEALER sockets and its
  workers) and of the workers and supervisors.
- rtt: what the idle-only rule costs over a link with a 1 ms round trip:
  2 remote workers behind a producer that is a pure front end, 16 in flight,
  small handlers (16-byte echo, and ``cpu:500``, half a millisecond), with no
  delay and with 0.5 ms each way.  The delay is ``tc netem`` on a veth pair
  between two network namespaces where the kernel has netem; elsewhere a
  delay line in this process (a thread per direction that holds each chunk
  for the delay, then forwards it in order), with the reason printed.
- limits: what one producer's event loop can handle: 16-byte echo over v2,
  64 in flight, to 2 local workers and, as a pure front end, to 2 remote
  workers; the producer's CPU per request, and the rate at which its one
  thread would be saturated (1 s / CPU per request).
- hosts: what 50 worker hosts cost a producer (benchmarks/hosts.py: 50 bare
  DEALER sockets in one process that say READY and heartbeat): the
  producer's CPU per second idle with none and with 50, heartbeat traffic in
  bytes/s (every byte on the loopback of a namespace of its own, ZMTP, CURVE
  and TCP/IP included, where namespaces are available; the HEARTBEAT frames' bytes
  otherwise), and the producer's CPU per request when those 50 slots answer
  the echo load.

- curve: CURVE alone, a ROUTER and a DEALER in this process over tcp
  loopback, round trips of 16 bytes and of 64 KiB with CURVE on and off: the
  CPU per round trip (the I/O thread included).

``--write`` puts the report into docs/benchmarks.md, in its section between
the markers that ``benchmarks/suite.py`` keeps when it rewrites that file.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.suite import C_LOADGEN, CDIR, ROOT, machine  # noqa: E402
from benchmarks.suite import KEPT_BEGIN as BEGIN  # noqa: E402
from benchmarks.suite import KEPT_END as END  # noqa: E402
from benchmarks.suite import process_tree as tree_of  # noqa: E402

PYTHON = sys.executable
LISTENING = re.compile(r"listening on (\S+):(\d+)")
DOCS = ROOT / "docs" / "benchmarks.md"
NS_PREFIX = "gasparbench"
DELAY = 0.0005  # seconds each way: a 1 ms round trip
CPU_2MS = "1:cpu:2000"
RTT_TITLE = "### The idle-only rule over a 1 ms round trip"
HOSTS_TITLE = "### What 50 worker hosts cost one producer"


# -- processes -------------------------------------------------------------------------


@dataclass
class Proc:
    """A process of the benchmark (its own group), its standard error kept line by line."""

    name: str
    argv: list[str]
    ns: str | None = None
    proc: subprocess.Popen[bytes] = field(init=False)
    lines: list[str] = field(default_factory=list)
    out: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        argv = (["ip", "netns", "exec", self.ns] if self.ns else []) + self.argv
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for stream, into in ((self.proc.stderr, self.lines), (self.proc.stdout, self.out)):
            threading.Thread(target=self._drain, args=(stream, into), daemon=True).start()

    @staticmethod
    def _drain(stream: Any, into: list[str]) -> None:
        for raw in stream:
            into.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, pattern: re.Pattern[str], where: str = "err", timeout: float = 60) -> str:
        """The first line (of standard error, or "out") matching `pattern`, waiting for it."""
        lines = self.lines if where == "err" else self.out
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if pattern.search(line):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)  # poll interval, bounded by the deadline
        tail = "\n".join(self.lines[-15:])
        raise RuntimeError(f"{self.name}: no {pattern.pattern!r}:\n{tail}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Keys:
    """A producer's and a host's key pairs, and the producer's allow directory."""

    producer_secret: Path
    producer_public: Path
    host_secret: Path
    allow: Path

    @classmethod
    def make(cls, directory: Path) -> Keys:
        from gaspar.keys import create_keypair

        producer_public, producer_secret = create_keypair(directory / "producer", "producer")
        host_public, host_secret = create_keypair(directory / "host", "host")
        allow = directory / "allow"
        allow.mkdir()
        shutil.copy(host_public, allow / host_public.name)
        return cls(producer_secret, producer_public, host_secret, allow)


@dataclass
class Setup:
    """One way of serving: a producer and its worker hosts (connected to `connect`)."""

    name: str
    handler: str
    workers: int  # local
    remote: int = 0  # remote worker processes, on one host
    secure: bool = True
    delay: float = 0.0
    relayed: bool = False  # through a DelayLine of `delay` (on loopback)
    producer: Proc | None = None
    hosts: list[Proc] = field(default_factory=list)
    port: int = 0
    relay: DelayLine | None = None
    ns: str | None = None  # the producer's namespace, where its clients run

    def start(self, keys: Keys, ns: tuple[str, str, str] | None = None) -> None:
        """Start the producer, then its host; wait until every worker serves.

        With `ns` (producer's namespace, host's namespace, producer's address), each runs
        in its namespace; otherwise on loopback, through a delay line if `delay`.
        """
        producer_ns, host_ns, address = ns if ns else (None, None, "127.0.0.1")
        self.ns = producer_ns
        bind = f"tcp://{address}:{free_port() if not ns else 5555}"
        argv = [PYTHON, "-m", "gaspar", "serve", f"benchmarks.handlers:{self.handler}"]
        argv += ["--host", "127.0.0.1", "--port", "0" if not ns else "10123"]
        argv += ["--workers", str(self.workers), "--log-level", "info"]
        if self.remote:
            argv += ["--worker-bind", bind]
            argv += security(keys, self.secure, producer=True)
        self.producer = Proc(self.name, argv, producer_ns)
        line = self.producer.wait_line(LISTENING)
        match = LISTENING.search(line)
        assert match is not None
        self.port = int(match.group(2))
        if not self.remote:
            return
        connect = bind
        if self.relayed and ns is None:
            self.relay = DelayLine(int(bind.rsplit(":", 1)[1]), self.delay)
            connect = f"tcp://127.0.0.1:{self.relay.port}"
        argv = [PYTHON, "-m", "gaspar", "worker", connect, f"benchmarks.handlers:{self.handler}"]
        argv += ["--processes", str(self.remote)] + security(keys, self.secure, producer=False)
        self.hosts.append(Proc(f"{self.name} host", argv, host_ns))
        wait_joined(self, int(bind.rsplit(":", 1)[1]), producer_ns)

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()
        if self.producer is not None:
            self.producer.stop()
        if self.relay is not None:
            self.relay.close()


def security(keys: Keys, secure: bool, *, producer: bool) -> list[str]:
    if not secure:
        return ["--insecure-workers"]
    if producer:
        return ["--key", str(keys.producer_secret), "--allow", str(keys.allow)]
    return ["--key", str(keys.host_secret), "--server-key", str(keys.producer_public)]


def wait_joined(setup: Setup, port: int, ns: str | None, timeout: float = 60) -> None:
    """Wait until every remote worker has a connection to the producer's worker port.

    One connection is one worker's DEALER; its READY follows the handshake at
    once, and every measurement starts with a warm-up.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if established(port, ns) >= setup.remote:
            return
        time.sleep(0.05)  # poll interval, bounded by the deadline
    raise RuntimeError(f"{setup.name}: the workers did not all join within {timeout:.0f} s")


def established(port: int, ns: str | None) -> int:
    """TCP connections established to local `port` (IPv4), in namespace `ns` or here."""
    argv = (["ip", "netns", "exec", ns] if ns else []) + ["cat", "/proc/net/tcp"]
    table = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    count = 0
    for line in table.splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            count += 1
    return count


# -- load and measurement ----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of `pid`'s threads, to the nanosecond (/proc/PID/task/*/schedstat).

    Finer than /proc/PID/stat's clock ticks (10 ms), which an idle producer's
    few milliseconds a second need; a thread that ended is no longer counted.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def load(
    port: int,
    ns: str | None = None,
    *,
    concurrency: int,
    duration: float,
    warmup: float = 0.0,
    protocol: str = "v2",
    size: int = 16,
    mix: str | None = None,
) -> dict[str, Any]:
    """One run of the C load generator (inside `ns` if given)."""
    argv = (["ip", "netns", "exec", ns] if ns else []) + [str(C_LOADGEN)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--protocol", protocol]
    argv += ["--concurrency", str(concurrency), "--duration", str(duration)]
    argv += ["--warmup", str(warmup), "--threads", str(min(2, concurrency))]
    argv += ["--mix", mix] if mix else ["--size", str(size), "--expect", "echo"]
    out = subprocess.run(argv, capture_output=True, timeout=duration + warmup + 60)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr.decode(errors='replace')}")
    raw = json.loads(out.stdout)
    return {
        "rps": raw["rps"],
        "p50": raw["latency_ms"]["p50"],
        "p99": raw["latency_ms"]["p99"],
        "errors": sum(raw["errors"].values()),
    }


def measure(setup: Setup, args: argparse.Namespace, **options: Any) -> Any:
    """A warm-up, then one measured run; CPU per request of each kind of process."""
    assert setup.producer is not None
    ns = setup.ns
    if args.warmup:
        load(setup.port, ns, duration=args.warmup, **options)
    roots = [setup.producer.pid] + [h.pid for h in setup.hosts]
    pids = [pid for root in roots for pid in tree_of(root)]
    before = {pid: cpu_seconds(pid) for pid in pids}
    result = load(setup.port, ns, duration=args.duration, **options)
    spent = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            spent[pid] = cpu_seconds(pid) - before[pid]
    requests = result["rps"] * args.duration or float("nan")
    hosts = [h.pid for h in setup.hosts]
    result["producer_us"] = spent.get(setup.producer.pid, 0.0) / requests * 1e6
    result["producer_share"] = spent.get(setup.producer.pid, 0.0) / args.duration
    result["host_us"] = sum(spent.get(pid, 0.0) for pid in hosts) / requests * 1e6
    result["workers_us"] = sum(v for pid, v in spent.items() if pid not in roots) / requests * 1e6
    return result


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def interleaved(
    setups: list[Setup], args: argparse.Namespace, options: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Every setup measured once per repeat, in turn; their runs by name."""
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in setups}
    for repeat in range(args.repeat):
        for setup in setups:
            result = measure(setup, args, **options)
            runs[setup.name].append(result)
            print(
                f"  {repeat + 1}/{args.repeat} {setup.name:<34} {result['rps']:>9,.0f} req/s "
                f"p50 {result['p50']:.3f} ms p99 {result['p99']:.3f} ms "
                f"producer {result['producer_us']:.1f} us/req errors {result['errors']}",
                flush=True,
            )
    return runs


def remote_missing() -> str | None:
    """Why remote workers cannot be run here, or None."""
    argv = [PYTHON, "-m", "gaspar", "worker", "--help"]
    if subprocess.run(argv, capture_output=True, cwd=ROOT).returncode:
        return "gaspar worker is not available in this revision"
    return None


def runnable(setups: list[Setup], report: list[str]) -> list[Setup]:
    """`setups` less those that need remote workers where there are none (said in `report`)."""
    reason = remote_missing()
    if reason is None:
        return setups
    skipped = [s.name for s in setups if s.remote]
    if skipped:
        report += [f"Not run ({reason}): {', '.join(skipped)}.", ""]
    return [s for s in setups if not s.remote]


@contextlib.contextmanager
def started(
    setups: list[Setup], keys: Keys, where: list[tuple[str, str, str]] | None = None
) -> Iterator[list[Setup]]:
    """Every setup started (each in its namespaces of `where`, if given); all stopped after."""
    try:
        for n, setup in enumerate(setups):
            setup.start(keys, where[n] if where else None)
        yield setups
    finally:
        for setup in setups:
            setup.stop()


# -- a delay line ------------------------------------------------------------------------


class DelayLine:
    """A TCP relay on loopback that holds every chunk for `delay` seconds each way, in order.

    A thread reads each direction and stamps what it reads; another sends it when
    due (time.sleep is precise to tens of microseconds, an event loop's timers
    only to a millisecond).  Stands in for tc netem where the kernel lacks it.
    """

    def __init__(self, target: int, delay: float) -> None:
        self.delay = delay
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [client, server]
            self._pump(client, server)
            self._pump(server, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        held: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()

        def read() -> None:
            while True:
                try:
                    data = source.recv(262144)
                except OSError:
                    data = b""
                with ready:
                    held.append((time.monotonic() + self.delay, data))
                    ready.notify()
                if not data:
                    return

        def write() -> None:
            while True:
                with ready:
                    while not held:
                        ready.wait()
                    due, data = held.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # the delay line's delay itself
                try:
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def delay_line_rtt(delay: float, rounds: int = 200) -> float:
    """The median round trip, in seconds, of 16 bytes through a DelayLine to an echo."""
    echo = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = echo.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    line = DelayLine(echo.getsockname()[1], delay)
    times = []
    try:
        with socket.create_connection(("127.0.0.1", line.port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(rounds):
                start = time.perf_counter()
                sock.sendall(b"x" * 16)
                sock.recv(64)
                times.append(time.perf_counter() - start)
    finally:
        line.close()
        echo.close()
    return statistics.median(times)


# -- namespaces ----------------------------------------------------------------------------


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def namespaces(delay: float, n: int = 0) -> Iterator[tuple[str, str, str]]:
    """Two namespaces joined by a veth pair, `delay` of netem on each end (0: none).

    Named with this process's pid and `n` (several pairs at once); yields the
    producer's namespace, the host's and the producer's address.
    """
    tag = f"{os.getpid()}{n}"
    names = f"{NS_PREFIX}-{tag}-p", f"{NS_PREFIX}-{tag}-h"
    devs = f"gspb{tag}p", f"gspb{tag}h"
    try:
        for ns in names:
            out = ip("netns", "add", ns)
            if out.returncode:
                raise OSError(f"ip netns add failed: {out.stderr.strip()}")
        ip("link", "add", devs[0], "type", "veth", "peer", "name", devs[1])
        for ns, dev, address in zip(names, devs, ("10.78.0.1", "10.78.0.2"), strict=True):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{address}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            if delay:
                out = subprocess.run(
                    ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay"]
                    + [f"{delay * 1e6:.0f}us"],
                    capture_output=True,
                    text=True,
                )
                if out.returncode:
                    raise OSError(f"tc qdisc add ... netem: {out.stderr.strip()}")
        yield names[0], names[1], "10.78.0.1"
    finally:
        for ns in names:
            for pid in ip("netns", "pids", ns).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", ns)
        ip("link", "del", devs[0])


def netem_unavailable() -> str | None:
    """Why the netem delay cannot be used here, or None."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    try:
        with namespaces(DELAY):
            return None
    except OSError as exc:
        return str(exc)


def lo_bytes(ns: str) -> int:
    """Bytes received on the loopback of namespace `ns` (what was sent on it, once)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/sys/class/net/lo/statistics/rx_bytes"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


# -- the parts -----------------------------------------------------------------------------


def part_pool(args: argparse.Namespace, keys: Keys, report: list[str]) -> None:
    print("pool: a 2 ms CPU-bound handler, 16 in flight", flush=True)
    setups = [
        Setup("2 local", "work", 2),
        Setup("2 remote, CURVE", "work", 0, 2),
        Setup("2 remote, --insecure-workers", "work", 0, 2, secure=False),
        Setup("2 local + 2 remote, CURVE", "work", 2, 2),
    ]
    notes: list[str] = []
    with started(runnable(setups, notes), keys) as running:
        runs = interleaved(running, args, {"concurrency": 16, "mix": CPU_2MS})
    report += [
        "### A 2 ms CPU-bound handler: local and remote workers",
        "",
        "16 requests in flight over v2, `cpu:2000` (benchmarks/handlers.py `work`), "
        "the worker host on loopback. CPU per request: the producer's process, the worker "
        "host's own process (the relay between its DEALER sockets and its workers' local "
        "links), and every supervisor and worker.",
        "",
        "| served by | req/s | p50 ms | p99 ms | producer CPU us/req | host process CPU "
        "us/req | workers+supervisors CPU us/req | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in runs.items():
        report.append(
            f"| {name} | {median(rows, 'rps'):,.0f} | {median(rows, 'p50'):.2f} | "
            f"{median(rows, 'p99'):.2f} | {median(rows, 'producer_us'):.1f} | "
            f"{median(rows, 'host_us'):.1f} | {median(rows, 'workers_us'):.0f} | "
            f"{sum(r['errors'] for r in rows)} |"
        )
    report += ["", *notes]
    if len(runs) < len(setups):
        return
    local, curve, plain = (runs[s.name] for s in setups[:3])
    hop = median(curve, "producer_us") - median(local, "producer_us")
    cost = median(curve, "producer_us") + median(curve, "host_us")
    cost -= median(plain, "producer_us") + median(plain, "host_us")
    report += [
        "",
        f"The remote hop costs the producer {hop:+.1f} us per request over a local worker "
        f"(2 remote with CURVE against 2 local), and the host process "
        f"{median(curve, 'host_us'):.1f} us; CURVE costs {cost:+.1f} us per request over "
        "`--insecure-workers`, producer and host process together (a figure lost in the noise at "
        "this rate: see the limits part for CURVE at a high one). With 2 local + 2 remote "
        "the four workers share this machine's cores with the producer, the host and the "
        "load generator, so it shows that the pools add up, not by how much on real hosts.",
        "",
    ]


def part_rtt(args: argparse.Namespace, keys: Keys, report: list[str]) -> None:
    if missing := remote_missing():
        report += [RTT_TITLE, "", f"Not run: {missing}.", ""]
        return
    reason = netem_unavailable()
    how = "tc netem on a veth pair between two namespaces"
    if reason:
        rtts = [delay_line_rtt(d) * 1e3 for d in (0.0, DELAY)]
        how = (
            f"the delay line of benchmarks/remote.py on loopback (no netem here: {reason}); "
            f"its own round trip, 16 bytes to an echo: {rtts[0]:.2f} ms with no delay, "
            f"{rtts[1]:.2f} ms with {DELAY * 1e3:g} ms each way"
        )
    print(f"rtt: 2 remote workers over a 1 ms round trip, through {how}", flush=True)
    loads = {"echo 16 B": {"size": 16}, "cpu:500": {"mix": "1:cpu:500"}}
    runs: dict[str, list[dict[str, Any]]] = {}
    for label, options in loads.items():
        setups = [
            Setup(f"{label}, {d * 2e3:g} ms round trip", "work", 0, 2, delay=d)
            for d in (0.0, DELAY)
        ]
        for setup in setups:
            setup.relayed = bool(reason)
        with contextlib.ExitStack() as stack:
            where = None
            if not reason:
                where = [
                    stack.enter_context(namespaces(setup.delay, n))
                    for n, setup in enumerate(setups)
                ]
            stack.enter_context(started(setups, keys, where))
            runs.update(interleaved(setups, args, {"concurrency": 16, **options}))
    report += [
        RTT_TITLE,
        "",
        f"2 remote workers (CURVE) behind a pure front end, 16 in flight over v2; the link "
        f"between producer and host: {how}.",
        "",
        "| load, link | req/s | p50 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in runs.items():
        report.append(
            f"| {name} | {median(rows, 'rps'):,.0f} | {median(rows, 'p50'):.2f} | "
            f"{median(rows, 'p99'):.2f} | {sum(r['errors'] for r in rows)} |"
        )
    kept = [
        median(runs[f"{label}, {DELAY * 2e3:g} ms round trip"], "rps")
        / median(runs[f"{label}, 0 ms round trip"], "rps")
        for label in loads
    ]
    report += [
        "",
        f"Over the round trip the echo keeps {kept[0]:.2f}x of its rate and `cpu:500` "
        f"{kept[1]:.2f}x. A slot is sent a job only when idle, so it pays a round trip per "
        "message: the echo's jobs, short, go in batches (many per round trip); a job of more "
        "than 0.5 ms is never batched. docs/design.md (What limits one producer) says what "
        "a prefetch of one job per remote slot would change.",
        "",
    ]


def part_limits(args: argparse.Namespace, keys: Keys, report: list[str]) -> None:
    print("limits: 16-byte echo over v2, 64 in flight", flush=True)
    setups = [
        Setup("2 local workers", "work", 2),
        Setup("front end, 2 remote, CURVE", "work", 0, 2),
        Setup("front end, 2 remote, --insecure-workers", "work", 0, 2, secure=False),
    ]
    notes: list[str] = []
    with started(runnable(setups, notes), keys) as running:
        runs = interleaved(running, args, {"concurrency": 64, "size": 16})
    report += [
        "### What one producer's event loop handles",
        "",
        "16-byte echo over v2, 64 in flight. The producer is one thread: 1 s divided by its "
        "CPU per request is the rate at which that thread would be busy all the time.",
        "",
        "| workers | req/s | producer CPU us/req | producer CPU share | one thread saturated "
        "at req/s | host process CPU us/req | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in runs.items():
        us = median(rows, "producer_us")
        report.append(
            f"| {name} | {median(rows, 'rps'):,.0f} | {us:.1f} | "
            f"{median(rows, 'producer_share') * 100:.0f}% | {1e6 / us:,.0f} | "
            f"{median(rows, 'host_us'):.1f} | {sum(r['errors'] for r in rows)} |"
        )
    report += ["", *notes]
    if len(runs) == len(setups):
        curve, plain = (runs[s.name] for s in setups[1:])
        cost = median(curve, "producer_us") + median(curve, "host_us")
        cost -= median(plain, "producer_us") + median(plain, "host_us")
        report += [
            f"CURVE at this rate costs {cost:+.1f} us per request, producer and host process "
            f"together (the host process: {median(curve, 'host_us'):.1f} us per request with "
            f"CURVE, {median(plain, 'host_us'):.1f} us without).",
            "",
        ]


def part_hosts(args: argparse.Namespace, keys: Keys, report: list[str]) -> None:
    if missing := remote_missing():
        report += [HOSTS_TITLE, "", f"Not run: {missing}.", ""]
        return
    hosts, idle = 50, max(10.0, args.duration * 2)  # as HOSTS_TITLE says
    print(f"hosts: {hosts} simulated worker hosts, {idle:g} s idle", flush=True)
    try:
        with namespaces(0) as (ns, _, _):
            figures = simulate(keys, hosts, idle, args, ns)
        where = "all bytes on the loopback of a namespace of its own (ZMTP, CURVE, TCP/IP)"
    except OSError as exc:
        figures = simulate(keys, hosts, idle, args, None)
        where = f"the HEARTBEAT frames' bytes as the hosts counted them (no namespace: {exc})"
    per_host = (figures["cpu_with"] - figures["cpu_without"]) / hosts
    report += [
        HOSTS_TITLE,
        "",
        f"benchmarks/hosts.py: {hosts} DEALER sockets in one process, each a worker host of "
        "one slot that says READY and heartbeats every second (CURVE on), against a pure "
        f"front end, over {idle:g} s idle; traffic: {where}.",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| producer CPU, no hosts | {figures['cpu_without'] * 1e3:.2f} ms/s |",
        f"| producer CPU, {hosts} idle hosts | {figures['cpu_with'] * 1e3:.2f} ms/s |",
        f"| producer CPU per idle host | {per_host * 1e6:.0f} us/s |",
        f"| heartbeat traffic, {hosts} hosts | {figures['bytes'] / 1e3:,.1f} kB/s "
        f"({figures['bytes'] / hosts:,.0f} B/s per host) |",
        f"| echo v2 c=64 through the {hosts} slots: req/s | {figures['rps']:,.0f} |",
        f"| echo v2 c=64 through the {hosts} slots: producer CPU us/req | "
        f"{figures['producer_us']:.1f} |",
        "",
    ]


def simulate(
    keys: Keys, hosts: int, idle: float, args: argparse.Namespace, ns: str | None
) -> dict[str, float]:
    """Producer CPU/s without and with `hosts` simulated hosts, traffic, and a load through them."""
    setup = Setup("front end", "work", 0, 0, ns=ns)
    bind = f"tcp://127.0.0.1:{free_port()}"
    argv = [PYTHON, "-m", "gaspar", "serve", "benchmarks.handlers:work", "--host", "127.0.0.1"]
    argv += ["--port", "0", "--workers", "0", "--worker-bind", bind, "--log-level", "info"]
    argv += security(keys, True, producer=True)
    producer = setup.producer = Proc("front end", argv, ns)
    sim = None
    try:
        match = LISTENING.search(producer.wait_line(LISTENING))
        assert match is not None
        setup.port = int(match.group(2))
        before = cpu_seconds(producer.pid)
        time.sleep(idle)  # the measured idle period
        cpu_without = (cpu_seconds(producer.pid) - before) / idle
        argv = [PYTHON, str(ROOT / "benchmarks" / "hosts.py"), bind, "--hosts", str(hosts)]
        argv += ["--key", str(keys.host_secret), "--server-key", str(keys.producer_public)]
        sim = Proc("hosts", [*argv, "--echo"], ns)
        sim.wait_line(re.compile(r"^joined"), where="out")
        bytes_before = lo_bytes(ns) if ns else 0
        before = cpu_seconds(producer.pid)
        time.sleep(idle)  # the measured idle period
        cpu_with = (cpu_seconds(producer.pid) - before) / idle
        traffic = (lo_bytes(ns) - bytes_before) / idle if ns else 0.0
        result = measure(setup, args, concurrency=64, size=16)
        sim.stop()
        counts = json.loads(sim.out[-1])
        if not ns:
            traffic = counts["heartbeat_bytes"] / counts["seconds"]
        return {
            "cpu_without": cpu_without,
            "cpu_with": cpu_with,
            "bytes": traffic,
            "rps": result["rps"],
            "producer_us": result["producer_us"],
        }
    finally:
        if sim is not None:
            sim.stop()
        producer.stop()


def part_curve(args: argparse.Namespace, keys: Keys, report: list[str]) -> None:
    """CURVE's CPU per request in isolation: a job and its reply, both ends in one process."""
    print("curve: round trips over tcp loopback, CURVE on and off", flush=True)
    sizes = {16: 20_000, 65536: 2_000}  # bytes each way: round trips
    runs: dict[tuple[int, bool], list[float]] = {}
    for _ in range(args.repeat):
        for size, rounds in sizes.items():
            for secure in (False, True):
                spent = curve_round_trips(keys, secure, rounds, size) / rounds * 1e6
                runs.setdefault((size, secure), []).append(spent)
    report += [
        "### CURVE alone",
        "",
        "A ROUTER and a DEALER in one process over tcp loopback, round trips of one message "
        "each way (a job and its reply), the CPU time of the process (its ZeroMQ I/O thread "
        "included) per round trip, medians of the repeats:",
        "",
        "| message | plain us | CURVE us | CURVE's cost us |",
        "| --- | ---: | ---: | ---: |",
    ]
    for size in sizes:
        plain = statistics.median(runs[size, False])
        curve = statistics.median(runs[size, True])
        report.append(f"| {size:,} B | {plain:.1f} | {curve:.1f} | {curve - plain:+.1f} |")
    report.append("")


def curve_round_trips(keys: Keys, secure: bool, rounds: int, size: int) -> float:
    """CPU seconds this process spends on `rounds` ROUTER/DEALER round trips."""
    import zmq
    import zmq.auth

    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        if secure:
            router.curve_server = True
            router.curve_publickey, router.curve_secretkey = zmq.auth.load_certificate(
                keys.producer_secret
            )
            dealer.curve_publickey, dealer.curve_secretkey = zmq.auth.load_certificate(
                keys.host_secret
            )
            dealer.curve_serverkey = zmq.auth.load_certificate(keys.producer_public)[0]
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        message = b"x" * size
        dealer.send(message)
        router.recv_multipart()  # the handshake is done
        start = cpu_seconds(os.getpid())
        for _ in range(rounds):
            dealer.send(message)
            identity, body = router.recv_multipart()
            router.send_multipart([identity, body])
            dealer.recv()
        return cpu_seconds(os.getpid()) - start
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


PARTS: dict[str, Callable[[argparse.Namespace, Keys, list[str]], None]] = {
    "pool": part_pool,
    "rtt": part_rtt,
    "limits": part_limits,
    "hosts": part_hosts,
    "curve": part_curve,
}


def write_section(parts: dict[str, list[str]], intro: list[str]) -> None:
    """Put `parts` (each a "### " title's lines) into docs/benchmarks.md, between the markers.

    A part replaces the part of the same title already there; the others stay, so
    that one part can be run again alone.
    """
    page = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    kept: dict[str, list[str]] = {}
    if BEGIN in page and END in page:
        head, rest = page.split(BEGIN, 1)
        old, tail = rest.split(END, 1)
        title = ""
        for line in old.strip("\n").splitlines():
            if line.startswith("### "):
                title = line
            if title:
                kept.setdefault(title, []).append(line)
    else:
        head, tail = page.rstrip("\n") + "\n\n", "\n"
    kept.update(parts)
    lines = [*intro, *(line for part in kept.values() for line in part)]
    block = "\n".join(lines).rstrip("\n")
    DOCS.write_text(f"{head}{BEGIN}\n{block}\n{END}\n{tail.lstrip(chr(10))}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per run")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts, comma-separated")
    parser.add_argument("--write", action="store_true", help="write into docs/benchmarks.md")
    args = parser.parse_args()
    if subprocess.run(["make", "-s", "-C", str(CDIR)], capture_output=True).returncode:
        print("the C load generator did not build (make -C benchmarks/c)", file=sys.stderr)
        return 1
    started_at = datetime.datetime.now(datetime.timezone.utc)
    command = ("python benchmarks/remote.py " + " ".join(sys.argv[1:])).strip()
    run = (
        f"Run on {started_at:%Y-%m-%d %H:%M} UTC, {machine()}: `{command}` (medians of "
        f"{args.repeat} interleaved runs of {args.duration:g} s after {args.warmup:g} s of "
        "warm-up, load from the C generator)."
    )
    parts: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="gaspar-remote-bench-") as tmp:
        keys = Keys.make(Path(tmp))
        for name in args.parts.split(","):
            lines: list[str] = []
            PARTS[name](args, keys, lines)
            lines[2:2] = [run, ""]  # after the title and its blank line
            parts[lines[0]] = lines
    intro = [
        "## Remote workers (benchmarks/remote.py)",
        "",
        "Each part says the run it comes from; `--parts NAME --write` runs one again.",
        "",
    ]
    print("\n" + "\n".join(line for part in parts.values() for line in part))
    if args.write:
        write_section(parts, intro)
    return 0


if __name__ == "__main__":
    sys.exit(main())

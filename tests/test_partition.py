"""Partitions: a producer and a worker host in two network namespaces, the link cut mid-load.

Issue 11 item 3's points, on a real link: the producer runs in one namespace
(`ip netns exec`), a `gaspar worker` host in another, joined by a veth pair;
a client inside the producer's namespace keeps requests in flight, the link
goes down (`ip link set ... down`) and comes back.  Running jobs on the host
must fail WORKER_LOST within about 3 heartbeats, queued ones be served by the
producer's own worker, nothing hang, and the host rejoin with no restart.
The detection and rejoin times are printed (``pytest -s``).

Needs root and iproute2; skips with the reason otherwise.  Namespaces and
devices are named with this run's pid under PREFIX / DEVICE_PREFIX, removed
whatever happens, and a crashed run's leftovers are removed first.

Run as ``python -m tests.test_partition client HOST:PORT CONCURRENCY MESSAGE``
this file is the load client (inside the namespace): it keeps CONCURRENCY
requests in flight until its standard input closes, printing one JSON line
per request.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GASPAR = str(BIN / "gaspar") if (BIN / "gaspar").exists() else "gaspar"
LISTENING = re.compile(r"listening on (\S+):(\d+)")
# Names of what a run makes: namespaces PREFIX-PID-p / -h, devices DEVICE_PREFIX PID p / h
# (a device name has at most 15 characters).
PREFIX = "gaspart"
DEVICE_PREFIX = "gspt"
PRODUCER_ADDRESS, HOST_ADDRESS = "10.77.0.1", "10.77.0.2"
WORKER_PORT, CLIENT_PORT = 5555, 10123
# Heartbeat seconds: 0.2 in CI, the default (1.0) in the slow variant.
HEARTBEATS = [0.2, pytest.param(1.0, marks=pytest.mark.slow)]
JOB = b"work:0.3"  # long enough never to be batched, short enough to keep the run brief


def work(message: bytes) -> bytes:
    """The handler served here: ``work:SECONDS`` sleeps, then replies with the worker's pid."""
    verb, _, arg = message.partition(b":")
    if verb == b"work":
        time.sleep(float(arg))  # handler: simulated work of a known length
    return str(os.getpid()).encode()


# -- processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    """A subprocess in its own process group whose standard error is kept, line by line."""

    argv: list[str]
    stdin: bool = False
    proc: subprocess.Popen[bytes] = field(init=False)
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            stdin=subprocess.PIPE if self.stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.out: list[str] = []
        for stream, into in ((self.proc.stderr, self.lines), (self.proc.stdout, self.out)):
            threading.Thread(target=self._drain, args=(stream, into), daemon=True).start()

    @staticmethod
    def _drain(stream: Any, into: list[str]) -> None:
        for raw in stream:
            into.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return "\n".join(self.lines[-30:])

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """The first line of standard error that matches, waiting for it."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            if self.proc.poll() is not None and not found:
                raise AssertionError(f"{self.argv[:6]} exited:\n{self.log()}")
            found.extend(m for m in map(pattern.search, list(self.lines)) if m)
            return bool(found)

        assert wait_until(seen, timeout), f"no {pattern.pattern!r} in:\n{self.log()}"
        return found[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process (its group if it does not go) and reap it; its exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def process_tree(pid: int) -> set[int]:
    """`pid` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        tree.add(current)
        todo.extend(children.get(current, []))
    return tree


def worker_command_missing() -> str | None:
    """Why `gaspar worker` cannot be run here, or None."""
    out = subprocess.run([GASPAR, "worker", "--help"], capture_output=True, cwd=ROOT)
    if out.returncode != 0:
        return "gaspar worker is not available (the remote workers of issue 11)"
    return None


def make_keys(directory: Path) -> dict[str, Path]:
    """Key pairs for a producer and a host, and the producer's allow directory."""
    from gaspar.keys import create_keypair

    producer_public, producer_secret = create_keypair(directory / "producer", "producer")
    host_public, host_secret = create_keypair(directory / "host", "host")
    allow = directory / "allow"
    allow.mkdir()
    shutil.copy(host_public, allow / host_public.name)
    return {
        "producer_secret": producer_secret,
        "producer_public": producer_public,
        "host_secret": host_secret,
        "allow": allow,
    }


# -- the load client ----------------------------------------------------------------------


@dataclass
class Reply:
    """One request as the client saw it: sent at t0, ended at t1 (monotonic seconds)."""

    t0: float
    t1: float
    status: str
    pid: int | None


def replies(proc: Proc) -> list[Reply]:
    """The requests the client has finished so far."""
    found = []
    for line in list(proc.out):
        record = json.loads(line)
        if "status" in record:
            found.append(Reply(record["t0"], record["t1"], record["status"], record["pid"]))
    return found


def client_main(address: str, concurrency: int, message: bytes) -> int:
    """Keep `concurrency` requests in flight until standard input closes; a JSON line each."""
    from gaspar.client import Client
    from gaspar.errors import RequestFailed, RequestTimeout, WorkerLost

    lock = threading.Lock()
    stop = threading.Event()
    client = Client(address, timeout=10.0, pool_size=concurrency)

    def emit(record: dict[str, Any]) -> None:
        with lock:
            print(json.dumps(record), flush=True)

    def loop() -> None:
        while not stop.is_set():
            t0, pid, status = time.monotonic(), None, "ok"
            try:
                pid = int(client.request(message))
            except WorkerLost:
                status = "worker_lost"
            except RequestTimeout:
                status = "timeout"
            except RequestFailed as exc:
                status = type(exc).__name__
            emit({"t0": t0, "t1": time.monotonic(), "status": status, "pid": pid})

    threads = [threading.Thread(target=loop) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    sys.stdin.read()
    stop.set()
    for thread in threads:
        thread.join(30)
    emit({"done": True, "hung": sum(thread.is_alive() for thread in threads)})
    client.close()
    return 0


# -- namespaces ---------------------------------------------------------------------------


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_namespace(name: str) -> None:
    """Kill what runs in namespace `name` (by pid), then delete it."""
    pids = ip("netns", "pids", name, check=False).stdout.split()
    for pid in map(int, pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    ip("netns", "del", name, check=False)


def remove_leftovers() -> None:
    """Namespaces and devices of earlier runs whose test process is gone."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}-(\d+)-[ph]", name)
        if match and not pid_alive(int(match.group(1))):
            remove_namespace(name)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        match = re.search(rf"\d+: ({DEVICE_PREFIX}(\d+)[ph])[@:]", line)
        if match and not pid_alive(int(match.group(2))):
            ip("link", "del", match.group(1), check=False)


@dataclass
class Link:
    """Two namespaces, the producer's and the host's, joined by one veth pair."""

    producer_ns: str
    host_ns: str
    producer_dev: str
    host_dev: str

    def exec(self, ns: str, argv: list[str], stdin: bool = False) -> Proc:
        return Proc(["ip", "netns", "exec", ns, *argv], stdin=stdin)

    def set(self, state: str) -> None:
        ip("-n", self.producer_ns, "link", "set", self.producer_dev, state)


def namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    return None


@pytest.fixture
def link() -> Iterator[Link]:
    """A fresh pair of namespaces and its veth link; removed whatever happens."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    remove_leftovers()
    tag = os.getpid()
    made = Link(f"{PREFIX}-{tag}-p", f"{PREFIX}-{tag}-h", f"{DEVICE_PREFIX}{tag}p", "")
    made.host_dev = f"{DEVICE_PREFIX}{tag}h"
    try:
        out = ip("netns", "add", made.producer_ns, check=False)
        if out.returncode != 0:
            pytest.skip(f"ip netns add failed: {out.stderr.strip()}")
        try:
            ip("netns", "add", made.host_ns)
            ip("link", "add", made.producer_dev, "type", "veth", "peer", "name", made.host_dev)
            for ns, dev, address in (
                (made.producer_ns, made.producer_dev, PRODUCER_ADDRESS),
                (made.host_ns, made.host_dev, HOST_ADDRESS),
            ):
                ip("link", "set", dev, "netns", ns)
                ip("-n", ns, "addr", "add", f"{address}/30", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except RuntimeError as exc:  # what this machine allows, not what is under test
            pytest.skip(f"no veth link between namespaces: {exc}")
        yield made
    finally:
        for ns in (made.producer_ns, made.host_ns):
            remove_namespace(ns)
        ip("link", "del", made.producer_dev, check=False)  # if it never left the root


# -- the test ------------------------------------------------------------------------------


@pytest.mark.parametrize("heartbeat", HEARTBEATS)
def test_cut_link_fails_running_jobs_only_and_host_rejoins(
    link: Link, tmp_path: Path, heartbeat: float
) -> None:
    missing = worker_command_missing()
    if missing:
        pytest.skip(missing)
    keys = make_keys(tmp_path)
    hb = str(heartbeat)
    producer = link.exec(
        link.producer_ns,
        [GASPAR, "serve", "tests.test_partition:work", "--host", "127.0.0.1"]
        + ["--port", str(CLIENT_PORT), "--workers", "1", "--heartbeat", hb]
        + ["--worker-bind", f"tcp://{PRODUCER_ADDRESS}:{WORKER_PORT}"]
        + ["--key", str(keys["producer_secret"]), "--allow", str(keys["allow"])],
    )
    host = client = None
    try:
        producer.wait_for(LISTENING)
        host = link.exec(
            link.host_ns,
            [GASPAR, "worker", f"tcp://{PRODUCER_ADDRESS}:{WORKER_PORT}"]
            + ["tests.test_partition:work", "--processes", "2", "--heartbeat", hb]
            + ["--key", str(keys["host_secret"]), "--server-key", str(keys["producer_public"])],
        )
        client = link.exec(
            link.producer_ns,
            [sys.executable, "-m", "tests.test_partition", "client"]
            + [f"127.0.0.1:{CLIENT_PORT}", "6", JOB.decode()],
            stdin=True,
        )
        local = process_tree(producer.pid)

        def remote_ok(since: float) -> list[Reply]:
            return [
                r
                for r in replies(client)
                if r.status == "ok" and r.pid not in local and r.t0 >= since
            ]

        assert wait_until(lambda: bool(remote_ok(0)), 30), f"host never served:\n{host.log()}"
        host_tree = process_tree(host.pid)

        cut = time.monotonic()
        link.set("down")
        assert wait_until(
            lambda: any(r.status == "worker_lost" for r in replies(client)), 10 * heartbeat + 5
        ), f"no job failed after the cut:\n{producer.log()}"
        lost = [r for r in replies(client) if r.status == "worker_lost"]
        detection = max(r.t1 for r in lost) - cut
        # The producer's own worker serves what was queued, and the requests after.
        assert wait_until(
            lambda: (
                len([r for r in replies(client) if r.t1 > cut + detection and r.pid in local]) >= 3
            ),
            10,
        )
        failed_while_cut = [r for r in replies(client) if r.status != "ok"]

        up = time.monotonic()
        link.set("up")
        assert wait_until(lambda: bool(remote_ok(up)), 30), f"no rejoin:\n{host.log()}"
        rejoin = min(r.t1 for r in remote_ok(up)) - up
        assert host.proc.poll() is None
        assert process_tree(host.pid) == host_tree, "the host's processes changed"

        assert client.proc.stdin is not None
        client.proc.stdin.close()
        assert client.proc.wait(30) == 0
        done = json.loads(client.out[-1])
        assert done == {"done": True, "hung": 0}
        every = replies(client)
        statuses = {r.status for r in every}
        assert statuses <= {"ok", "worker_lost"}, statuses
        # Only the jobs running on the host when the link went down failed (2 processes).
        assert len(lost) == len([r for r in every if r.status == "worker_lost"]) <= 2
        assert all(r.t0 < cut for r in lost)
        assert detection < 10 * heartbeat + 2, detection
        print(
            f"\npartition at heartbeat {heartbeat} s: running jobs failed {detection:.2f} s "
            f"after the cut ({len(lost)} WORKER_LOST, {len(failed_while_cut)} failed in all, "
            f"{len(every)} requests); the host served again {rejoin:.2f} s after the link "
            "came back"
        )
    finally:
        for proc in (client, host, producer):
            if proc is not None:
                proc.stop()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "client":
        sys.exit(client_main(sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()))
    print(__doc__, file=sys.stderr)
    sys.exit(2)

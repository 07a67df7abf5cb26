"""The command: `gaspar serve` and `gaspar request`, as separate processes."""

from __future__ import annotations

import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import gaspar
from gaspar.client import request
from gaspar.errors import RequestFailed
from tests.conftest import alive, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTENING = re.compile(rb"listening on (\S+):(\d+) with (\d+) workers")


class Server:
    """`gaspar serve` in a subprocess, with its log lines read under a deadline."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gaspar", "serve", *args, "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            bufsize=0,  # unbuffered, so select() sees every line not yet read
        )
        self.log: list[bytes] = []
        self.port = 0
        match = self.wait_for_line(LISTENING)
        self.port = int(match.group(2))

    def wait_for_line(self, pattern: re.Pattern[bytes], timeout: float = 20) -> re.Match[bytes]:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], deadline - time.monotonic())
            if not ready:
                break
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            match = pattern.search(line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern.pattern!r} in {self.log!r}")

    def finish(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(30)
        finally:
            self.proc.kill()
        assert self.proc.stderr is not None
        self.log.extend(self.proc.stderr.read().splitlines(keepends=True))
        return code


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server("tests.handlers:behave", "--workers", "2", "--timeout", "5")
    yield srv
    srv.proc.kill()
    srv.proc.wait(10)


def gaspar_request(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gaspar", "request", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        cwd=ROOT,
    )


def test_serve_and_request(server: Server) -> None:
    address = f"127.0.0.1:{server.port}"
    result = gaspar_request(address, "echo:hello")
    assert result.returncode == 0 and result.stdout == b"hello"
    result = gaspar_request(address, "--timeout", "10", stdin=b"echo:\x00binary\xff")
    assert result.returncode == 0 and result.stdout == b"\x00binary\xff"


def test_request_failure_exits_non_zero(server: Server) -> None:
    result = gaspar_request(f"127.0.0.1:{server.port}", "raise:boom")
    assert result.returncode == 1 and result.stdout == b""
    assert b"reset" in result.stderr
    assert gaspar_request("127.0.0.1:1", "x").returncode == 1
    assert gaspar_request("not-an-address", "x").returncode == 1


def test_handler_traceback_is_logged_on_one_line(server: Server) -> None:
    gaspar_request(f"127.0.0.1:{server.port}", "raise:logged")
    match = server.wait_for_line(re.compile(rb"handler raised.*ValueError: logged"))
    assert b"Traceback" in match.string and match.string.count(b"\n") == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_server_and_its_workers(sig: int) -> None:
    srv = Server("tests.handlers:behave", "--workers", "2")
    pids = [int(request(("127.0.0.1", srv.port), b"pid", timeout=10)) for _ in range(4)]
    assert srv.finish(sig) == 0
    assert not any(alive(p) for p in pids)
    assert any(b"stopped" in line for line in srv.log)


@pytest.mark.parametrize("target", ["tests.handlers:prefixed", "tests.handlers:Prefixed"])
def test_serve_consumer_instance_and_class(target: str) -> None:
    srv = Server(target, "--workers", "1")
    try:
        reply = request(("127.0.0.1", srv.port), b"m", timeout=10)
        assert re.fullmatch(rb"\d+:m", reply)
    finally:
        assert srv.finish() == 0


def test_python_dash_m_and_console_script_agree() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "gaspar")
    out = subprocess.run([script, "--help"], capture_output=True, timeout=30)
    assert out.returncode == 0 and b"serve" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "gaspar", "--help"], capture_output=True, timeout=30
    )
    assert out.returncode == 0 and b"request" in out.stdout


def test_bad_target_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gaspar", "serve", "tests.handlers:nothing", "--port", "0"],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2 and b"cannot load" in result.stderr


def test_second_signal_cuts_the_grace_period_short(tmp_path) -> None:
    srv = Server("tests.handlers:behave", "--workers", "1", "--grace", "60")
    marker = tmp_path / "running"
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(request(("127.0.0.1", srv.port), b"mark:%s" % bytes(marker), 60))
        except RequestFailed as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert wait_until(marker.exists, timeout=20)  # the handler is running
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    srv.wait_for_line(re.compile(rb"stopping: 1 requests in flight"))
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    caller.join(30)
    assert time.monotonic() - started < 20
    assert isinstance(outcome[0], RequestFailed)


def test_serving_does_not_load_the_benchmark_tool() -> None:
    code = "import sys, gaspar.cli; print('gaspar.bench' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, cwd=ROOT)
    assert out.stdout.strip() == b"False"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tune_malloc acts on glibc only")
def test_serve_tunes_malloc_unless_told_not_to() -> None:
    """The served process says that it set glibc's thresholds (mallopt returned success)."""
    tuned = re.compile(rb"gaspar\.producer: malloc tuned")
    srv = Server("tests.handlers:echo", "--workers", "1")
    try:
        assert any(tuned.search(line) for line in srv.log), srv.log
    finally:
        assert srv.finish() == 0
    srv = Server("tests.handlers:echo", "--workers", "1", "--no-tune-malloc")
    try:
        assert not any(b"malloc" in line for line in srv.log), srv.log
    finally:
        assert srv.finish() == 0


def test_the_command_line_loads_little_before_serving() -> None:
    """What `gaspar serve` loads to parse its flags is inherited by every forked process."""
    script = (
        "import sys, gaspar.cli; gaspar.cli.build_parser();"
        "print(' '.join(m for m in ('asyncio', 'zmq', 'dataclasses', 'inspect',"
        " 'gaspar.bench.runner', 'gaspar.server') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.split() == []


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.5", False),
        ("10.0.0.1", False),
        ("fe80::1", False),
        ("::ffff:10.0.0.1", False),
        ("example.org", False),
        ("localhost.example.org", False),
    ],
)
def test_loopback_hosts_are_told_from_the_rest(host: str, loopback: bool) -> None:
    from gaspar.address import is_loopback_host

    assert is_loopback_host(host) is loopback


EXPOSED = re.compile(
    rb"WARNING .*--host 0\.0\.0\.0 .*unauthenticated and unencrypted.*docs/deploy/"
)


def test_serve_on_a_non_loopback_host_warns_once() -> None:
    """Binding 0.0.0.0 (an ephemeral port; the test sends nothing) logs the warning once."""
    srv = Server("tests.handlers:echo", "--workers", "1", "--host", "0.0.0.0")
    try:
        assert request(("127.0.0.1", srv.port), b"still served", timeout=10) == b"still served"
    finally:
        assert srv.finish() == 0
    assert sum(1 for line in srv.log if EXPOSED.search(line)) == 1, srv.log


def test_serve_on_loopback_does_not_warn() -> None:
    srv = Server("tests.handlers:echo", "--workers", "1", "--host", "127.0.0.1")
    assert srv.finish() == 0
    assert not any(b"unauthenticated" in line for line in srv.log), srv.log


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gaspar", "--version"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stdout.strip() == f"gaspar {gaspar.__version__}"


def test_request_over_v2_prints_typed_errors() -> None:
    srv = Server("tests.handlers:behave", "--workers", "1", "--timeout", "0.5")
    try:
        address = f"127.0.0.1:{srv.port}"
        result = gaspar_request(address, "echo:over v2", "--protocol", "v2")
        assert result.returncode == 0 and result.stdout == b"over v2"
        result = gaspar_request(address, "spin", "--protocol", "v2")
        assert result.returncode == 1 and result.stdout == b""
        assert result.stderr.decode().splitlines() == [
            f"gaspar request: timeout: request ran past the server's timeout ({address})"
        ]
        result = gaspar_request(address, "raise:boom", "--protocol", "v2")
        assert result.returncode == 1
        assert result.stderr.startswith(
            b"gaspar request: handler_error: handler raised ValueError: boom"
        )
        result = gaspar_request(address, "raise:boom", "--protocol", "v1")
        assert result.returncode == 1 and b"reset" in result.stderr
    finally:
        assert srv.finish() == 0


def gaspar_call(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gaspar", "call", *args], capture_output=True, timeout=30, cwd=ROOT
    )


def test_call_a_task_of_an_app() -> None:
    srv = Server("tests.app_example:app", "--workers", "1")
    try:
        address = f"127.0.0.1:{srv.port}"
        result = gaspar_call(address, "add", "[1, 2]")
        assert result.returncode == 0 and result.stdout == b"3\n", result.stderr
        result = gaspar_call(address, "kwargs", '{"a": [1, "x"], "timeout": 5}')
        assert json.loads(result.stdout) == {"args": [], "kwargs": {"a": [1, "x"], "timeout": 5}}
        result = gaspar_call(address, "echo", '"just one"')
        assert json.loads(result.stdout) == "just one"
        result = gaspar_call(address, "fail", '["it broke"]')
        assert result.returncode == 1 and result.stdout == b""
        assert result.stderr.startswith(
            b"gaspar call: handler_error: task 'fail' raised ValueError"
        )
        result = gaspar_call(address, "no_such_task")
        assert result.returncode == 1 and b"UnknownTask" in result.stderr
        result = gaspar_call(address, "add", "[1,")
        assert result.returncode == 2 and b"ARGS is not JSON" in result.stderr
    finally:
        assert srv.finish() == 0

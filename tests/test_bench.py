"""`gaspar bench`: the load generator as a command, run as a subprocess against real servers."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import gaspar
from gaspar import bench, clientcore
from tests import handlers

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRESS = re.compile(r"^ *\d+\.\ds  [\d,]+ req/s  ok [\d,]+  errors [\d,]+$", re.MULTILINE)
Serve = Callable[..., gaspar.Producer]


def gaspar_bench(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a short `gaspar bench` against `address`; bounded by its own timeout."""
    command = [sys.executable, "-m", "gaspar", "bench", address]
    command += ["--duration", "1", "--warmup", "0", "--concurrency", "4", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT)


def where(producer: gaspar.Producer) -> str:
    host, port = producer.address
    return f"{host}:{port}"


def parsed(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.fixture
def behave(serve: Serve) -> str:
    return where(serve(handlers.behave, processes=2))


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening, so connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_json_reports_throughput_without_errors(behave: str, protocol: str) -> None:
    data = parsed(gaspar_bench(behave, "--protocol", protocol, "--json"))
    assert data["protocol"] == protocol and data["concurrency"] == 4
    assert data["rps"] > 0 and data["requests"] > 0
    assert data["error_total"] == 0 and not any(data["errors"].values())
    assert data["latency_ms"]["p50"] <= data["latency_ms"]["p99"] <= data["latency_ms"]["max"]
    assert data["check_echo"] is False


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_progress_then_summary(behave: str, protocol: str) -> None:
    result = gaspar_bench(behave, "--protocol", protocol)
    assert result.returncode == 0, result.stderr
    assert PROGRESS.search(result.stderr), result.stderr
    assert "requests/s" in result.stdout and "p99" in result.stdout
    assert re.search(r"^errors +none$", result.stdout, re.MULTILINE), result.stdout


def test_quiet_prints_no_progress(behave: str) -> None:
    result = gaspar_bench(behave, "--quiet", "--protocol", "v2", "--client", "aio")
    assert result.returncode == 0 and result.stderr == ""
    assert "requests/s" in result.stdout


def test_handler_errors_are_counted_and_the_command_still_succeeds(
    behave: str, tmp_path: Path
) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"raise:boom")
    data = parsed(
        gaspar_bench(behave, "--payload-file", str(payload), "--protocol", "v2", "--json")
    )
    assert data["errors"]["handler_error"] > 0
    assert data["requests"] == 0 and data["size"] == len(b"raise:boom")
    assert data["payload"] == "fixed" and data["payload_file"] == str(payload)


def test_echo_check_passes_against_an_echo(serve: Serve) -> None:
    address = where(serve(handlers.echo, processes=2))
    data = parsed(gaspar_bench(address, "--check-echo", "--size", "16", "--json"))
    assert data["check_echo"] is True and data["size"] == 16
    assert data["requests"] > 0 and data["errors"]["mismatch"] == 0
    assert data["error_total"] == 0


@pytest.mark.parametrize("check", [True, False])
def test_only_echo_checking_counts_mismatches(behave: str, tmp_path: Path, check: bool) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"echo:abc")  # the reply is "abc": fine, unless it must be an echo
    flags = ["--check-echo"] if check else []
    data = parsed(
        gaspar_bench(behave, "--payload-file", str(payload), "--protocol", "v2", "--json", *flags)
    )
    if check:
        assert data["errors"]["mismatch"] > 0 and data["requests"] == 0
    else:
        assert data["error_total"] == 0 and data["requests"] > 0


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_unreachable_server_exits_1(closed_port: int, protocol: str) -> None:
    result = gaspar_bench(f"127.0.0.1:{closed_port}", "--protocol", protocol)
    assert result.returncode == 1
    assert "cannot reach" in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["--concurrency", "0"],
        ["--duration", "0"],
        ["--warmup", "-1"],
        ["--timeout", "nan"],
        ["--size", "-1"],
        ["--processes", "two"],
        ["--protocol", "v3"],
        ["--client", "sync"],
        ["--size", "4", "--payload-file", "payload"],
        ["--payload-file", "no/such/file"],
    ],
)
def test_bad_arguments_exit_2(closed_port: int, args: list[str]) -> None:
    result = gaspar_bench(f"127.0.0.1:{closed_port}", *args)
    assert result.returncode == 2, result.stderr
    assert "gaspar bench" in result.stderr and result.stdout == ""


def test_bad_address_exits_2() -> None:
    result = gaspar_bench("no-port-here")
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


def test_run_as_a_library_is_silent_by_default(
    serve: Serve, capfd: pytest.CaptureFixture[str]
) -> None:
    result = bench.run(serve(handlers.echo).address, 2, 0.5, 32, warmup=0, check_echo=True)
    assert result["requests"] > 0 and result["error_total"] == 0
    assert result["size"] == 32 and result["check_echo"] is True
    assert capfd.readouterr() == ("", "")


def test_report_formats() -> None:
    assert bench.format_progress(3.0, 9412.4, 28236, 0) == (
        "  3.0s  9,412 req/s  ok 28,236  errors 0"
    )
    result: dict[str, Any] = {
        "address": "127.0.0.1:1",
        "protocol": "v2",
        "client": "raw",
        "concurrency": 4,
        "processes": 2,
        "connections": 2,
        "size": 16,
        "payload": "random",
        "check_echo": False,
        "warmup": 1.0,
        "duration": 5.0,
        "requests": 0,
        "rps": 0.0,
        "latency_ms": dict.fromkeys(["p50", "p90", "p99", "mean", "max"]),
        "error_total": 7,
        "errors": {**dict.fromkeys(bench.ERROR_KINDS, 0), "timeout": 3, "other": 4},
        "details": {"other: ECONNABORTED": 4},
        "warmup_errors": 0,
        "cpu": {"seconds": 9.5, "share": 1.9, "busiest_process": 0.95},
        "uvloop": True,
    }
    report = bench.format_report(result)
    assert "errors      timeout 3, other 4" in report
    assert "other: ECONNABORTED (4)" in report
    assert "no request succeeded" in report
    assert "over 2 processes (busiest 95%)" in report and "add --processes" in report


def test_importing_the_package_loads_no_generator() -> None:
    """`gaspar serve` imports gaspar.bench to build its parser: no asyncio, zmq or generator."""
    code = (
        "import sys, argparse, gaspar.bench\n"
        "parser = argparse.ArgumentParser()\n"
        "gaspar.bench.register(parser.add_subparsers())\n"
        "heavy = ['asyncio', 'zmq', 'multiprocessing', 'uvloop', 'gaspar.aio', 'gaspar.client']\n"
        "heavy += [m for m in sys.modules if m.startswith('gaspar.bench.') and\n"
        "          m != 'gaspar.bench.command']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def own_parser() -> argparse.ArgumentParser:
    """A parser of our own with only the subcommand the package registers."""
    parser = argparse.ArgumentParser(prog="gaspar")
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_registered_subcommand_runs(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    address = where(serve(handlers.echo, processes=2))
    args = own_parser().parse_args(
        ["bench", address, "--duration", "0.5", "--warmup", "0", "--concurrency", "2"]
        + ["--protocol", "v2", "--check-echo", "--json", "--quiet"]
    )
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["requests"] > 0 and data["error_total"] == 0 and err == ""


def test_registered_subcommand_defaults_and_bad_values(
    closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = own_parser()
    args = parser.parse_args(["bench", f"127.0.0.1:{closed_port}"])
    assert (args.concurrency, args.duration, args.warmup, args.size) == (64, 5.0, 1.0, 16)
    assert (args.protocol, args.client, args.timeout) == ("v1", "raw", bench.DEFAULT_TIMEOUT)
    for bad in (["--concurrency", "0"], ["--timeout", "nan"], ["--client", "sync"]):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(["bench", f"127.0.0.1:{closed_port}", *bad])
        assert info.value.code == 2
    args = parser.parse_args(["bench", f"127.0.0.1:{closed_port}", "--quiet", "--duration", "1"])
    assert args.func(args) == 1
    assert "cannot reach the server at 127.0.0.1:" in capsys.readouterr().err


def test_error_kinds_come_from_the_client_core() -> None:
    assert set(clientcore.STATUS_KINDS.values()) <= set(bench.ERROR_KINDS)
    assert set(clientcore.TRANSPORT_KINDS) <= set(bench.ERROR_KINDS)
    assert bench.PROTOCOLS == clientcore.PROTOCOLS


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_an_ipv6_server_is_printed_in_brackets(serve: Serve, protocol: str) -> None:
    try:
        producer = serve(handlers.echo, processes=1, host="::1")
    except gaspar.StartupError:
        pytest.skip("no IPv6 loopback")
    address = f"[::1]:{producer.address[1]}"
    result = gaspar_bench(address, "--protocol", protocol)
    assert result.returncode == 0, result.stderr
    assert f"gaspar bench {address}:" in result.stdout
    data = parsed(gaspar_bench(address, "--protocol", protocol, "--json", "--quiet"))
    assert data["address"] == address and data["requests"] > 0

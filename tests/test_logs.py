"""Logs: one line per event, text or JSON, with process, worker, client; the access log."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys

import pytest

import gaspar
from gaspar.client import request
from gaspar.logs import ACCESS_FIELDS, JsonFormatter, OneLineFormatter, role
from gaspar.protocol import MAGIC_V2, pack_request_v2
from tests.test_cli import ROOT, Server

ACCESS_JSON = re.compile(rb'"logger": "gaspar\.access"')


def access_lines(srv: Server, count: int) -> list[dict]:
    """The first `count` access log lines (JSON) the server writes."""
    found = [json.loads(line) for line in srv.log if ACCESS_JSON.search(line)]
    while len(found) < count:
        found.append(json.loads(srv.wait_for_line(ACCESS_JSON).string))
    return found


def test_access_log_json_lines_carry_every_field() -> None:
    srv = Server(
        "tests.handlers:behave",
        *("--workers", "1", "--timeout", "1", "--access-log", "--log-format", "json"),
    )
    try:
        address = ("127.0.0.1", srv.port)
        worker = int(request(address, b"pid", timeout=20))
        with socket.create_connection(address, timeout=20) as sock:
            client = f"127.0.0.1:{sock.getsockname()[1]}"
            sock.sendall(MAGIC_V2 + pack_request_v2(41, b"echo:abc"))
            sock.sendall(pack_request_v2(42, b"raise:no"))
            got = b""
            while len(got) < 4 + 9 + 3 + 9 + len("ValueError: no"):
                got += sock.recv(65536)
        lines = access_lines(srv, 3)
    finally:
        assert srv.finish() == 0
    for line in lines:
        assert set(ACCESS_FIELDS) <= set(line), line
        assert {"time", "level", "logger", "message", "role", "pid"} <= set(line)
        assert line["level"] == "INFO" and line["role"] == "producer"
        assert line["worker"] == worker and line["run_time"] >= 0 and line["queue_wait"] >= 0
    first, ok, failed = lines
    assert (first["protocol"], first["request_id"], first["status"]) == ("v1", 0, "ok")
    assert (first["bytes_in"], first["bytes_out"]) == (3, len(str(worker)))
    assert ok["client"] == client and failed["client"] == client
    assert (ok["protocol"], ok["request_id"], ok["status"], ok["bytes_in"]) == ("v2", 41, "ok", 8)
    assert ok["bytes_out"] == 3
    assert (failed["request_id"], failed["status"]) == (42, "handler_error")
    assert failed["bytes_out"] == len("ValueError: no")
    # Every line the server wrote is one JSON object.
    for raw in srv.log:
        entry = json.loads(raw)
        assert {"time", "level", "logger", "message", "role", "pid"} <= set(entry)


ACCESS_TEXT = re.compile(
    rb"INFO \[producer (\d+)\] gaspar\.access: client=127\.0\.0\.1:(\d+) protocol=v1 "
    rb"request_id=0 bytes_in=(\d+) bytes_out=(\d+) status=(\w+) queue_wait=(\d+\.\d{6}) "
    rb"run_time=(\d+\.\d{6}) worker=(\d+)$"
)


def test_access_log_text_line_and_refusals() -> None:
    srv = Server(
        "tests.handlers:behave", "--workers", "1", "--access-log", "--max-message-size", "10"
    )
    try:
        address = ("127.0.0.1", srv.port)
        worker = request(address, b"pid", timeout=20)
        match = srv.wait_for_line(ACCESS_TEXT)
        assert int(match.group(1)) == srv.proc.pid
        assert match.group(3) == b"3" and match.group(4) == b"%d" % len(worker)
        assert match.group(5) == b"ok" and match.group(8) == worker
        with pytest.raises(gaspar.RequestFailed):
            request(address, b"x" * 11, timeout=20)
        refused = srv.wait_for_line(re.compile(rb"gaspar\.access: .*status=too_large"))
        assert b"bytes_in=11 bytes_out=0" in refused.string
        assert b"queue_wait=- run_time=- worker=-" in refused.string
    finally:
        assert srv.finish() == 0


def test_access_log_is_off_by_default() -> None:
    srv = Server("tests.handlers:echo", "--workers", "1")
    try:
        assert request(("127.0.0.1", srv.port), b"quiet", timeout=20) == b"quiet"
    finally:
        assert srv.finish() == 0
    assert srv.log and not any(b"gaspar.access" in line for line in srv.log)


def test_json_lines_name_the_process_the_worker_and_the_client() -> None:
    srv = Server(
        "tests.handlers:behave", "--workers", "1", "--log-format", "json", "--timeout", "1"
    )
    try:
        address = ("127.0.0.1", srv.port)
        worker = int(request(address, b"pid", timeout=20))
        with pytest.raises(gaspar.RequestFailed):
            request(address, b"raise:boom", timeout=20)
        raised = json.loads(srv.wait_for_line(re.compile(rb"handler raised")).string)
        assert (raised["role"], raised["pid"], raised["level"]) == ("worker", worker, "ERROR")
        assert "ValueError: boom" in raised["message"] + raised.get("exception", "")
        with pytest.raises(gaspar.RequestFailed):
            request(address, b"spin", timeout=20, protocol="v2")
        killed = json.loads(srv.wait_for_line(re.compile(rb"ran past the")).string)
        assert killed["worker"] == worker and killed["role"] == "producer"
        # A client's fault: its address, in the message and as a field.
        with socket.create_connection(address, timeout=20) as sock:
            client = f"127.0.0.1:{sock.getsockname()[1]}"
            sock.sendall(MAGIC_V2 + pack_request_v2(5, b"sleep:0.5") + pack_request_v2(5, b"x"))
            with pytest.raises(ConnectionResetError):
                while sock.recv(65536):
                    pass
        fault = json.loads(srv.wait_for_line(re.compile(rb"reused while in flight")).string)
        assert fault["client"] == client and client in fault["message"]
        listening = json.loads(next(line for line in srv.log if b"listening on" in line))
        assert (listening["role"], listening["pid"]) == ("producer", srv.proc.pid)
    finally:
        assert srv.finish() == 0


def test_roles_follow_the_process_tree() -> None:
    """The configuring process, its child (the supervisor), their children (workers)."""
    script = """
import os, sys
from gaspar.logs import configure_logging, role
configure_logging("info")
print(role(), flush=True)
pid = os.fork()
if pid == 0:
    print(role(), flush=True)
    inner = os.fork()
    if inner == 0:
        print(role(), flush=True)
        os._exit(0)
    os.waitpid(inner, 0)
    os._exit(0)
os.waitpid(pid, 0)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert out.stdout.split() == ["producer", "supervisor", "worker"], out.stderr
    assert role() in ("producer", "supervisor", "worker")


def make_record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("gaspar.x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_formatters_keep_one_line_and_the_extra_fields() -> None:
    try:
        raise ValueError("two\nlines")
    except ValueError:
        exc_info = sys.exc_info()
    record = make_record(worker=12, client="127.0.0.1:9")
    record.exc_info = exc_info
    text = OneLineFormatter("%(levelname)s [%(role)s %(process)d] %(message)s").format(record)
    assert "\n" not in text and text.startswith(f"WARNING [producer {os.getpid()}] a b")
    assert " worker=12 client=127.0.0.1:9" in text and "ValueError: two\\nlines" in text
    entry = json.loads(JsonFormatter().format(make_record(worker=12, request_id=3)))
    assert entry["message"] == "a b" and entry["level"] == "WARNING"
    assert entry["logger"] == "gaspar.x" and entry["worker"] == 12 and entry["request_id"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    failed = make_record()
    failed.exc_info = exc_info
    line = JsonFormatter().format(failed)
    assert "\n" not in line and "ValueError: two" in json.loads(line)["exception"]

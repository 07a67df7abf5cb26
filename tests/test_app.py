"""gaspar.app: named tasks with msgpack-encoded calls, in process and served."""

from __future__ import annotations

import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

import gaspar
from gaspar.app import App, call, decode_result, encode_call
from gaspar.client import Client, request
from gaspar.errors import (
    BadArguments,
    BadRequest,
    HandlerError,
    RequestFailed,
    UnknownTask,
)
from tests import app_example
from tests.app_example import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTENING = re.compile(rb"listening on (\S+):(\d+)")

Serve = Callable[..., gaspar.Producer]

# Values that survive the trip unchanged, type included (bytes stay bytes, str stay str).
ROUND_TRIP = [
    b"",
    b"\x00\xff binary",
    "",
    "h\u00e9llo \u2603",
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    1.5,
    -0.0,
    math.inf,
    None,
    True,
    False,
    [],
    [1, "two", b"three", None, 4.5],
    {},
    {"a": 1, "b": b"bytes", "c": "str"},
    {"nested": {"list": [1, [2, [3, {"deep": b"\x01"}]]], "none": None}, "n": [{"x": 1.25}]},
]


def reply(*fields: Any) -> bytes:
    data: bytes = msgpack.packb(list(fields), use_bin_type=True)
    return data


def outcome(data: bytes) -> list[Any]:
    decoded: list[Any] = msgpack.unpackb(data, raw=False)
    return decoded


@pytest.fixture
def address(serve: Serve) -> tuple[str, int]:
    """tests.app_example:app served by one worker."""
    return serve(app, processes=1).address


# --- codec, no server -------------------------------------------------------------------------


def test_encode_call_wire_format() -> None:
    data = encode_call("resize", (b"px", 2), {"flip": True})
    assert msgpack.unpackb(data, raw=False) == [1, "resize", [b"px", 2], {"flip": True}]
    assert msgpack.unpackb(encode_call("pid"), raw=False) == [1, "pid", [], {}]


@pytest.mark.parametrize("bad", [object(), {1, 2}, 2**64, -(2**63) - 1, [object()]])
def test_encode_call_rejects_unencodable_arguments(bad: Any) -> None:
    with pytest.raises(TypeError, match="cannot encode the arguments of 'echo'"):
        encode_call("echo", (bad,))
    with pytest.raises(TypeError):
        encode_call("echo", (), {"value": bad})


def test_encode_call_rejects_misuse() -> None:
    with pytest.raises(TypeError, match="sequence of arguments"):
        encode_call("echo", b"not a tuple")
    with pytest.raises(TypeError, match="keyword argument names must be str"):
        encode_call("echo", (), {1: "x"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="task name must be a str"):
        encode_call(b"echo", ())  # type: ignore[arg-type]


def test_decode_result_success() -> None:
    for value in ROUND_TRIP:
        result = decode_result(reply(0, value))
        assert result == value and type(result) is type(value)
    assert decode_result(reply(0, {1: "int keys are fine in results"})) == {
        1: "int keys are fine in results"
    }


def test_decode_result_failures() -> None:
    with pytest.raises(UnknownTask, match="no task named 'nope'"):
        decode_result(reply(1, "unknown_task", "", "no task named 'nope'"))
    with pytest.raises(BadArguments, match="bad arguments for task 'add': missing a required"):
        decode_result(reply(1, "bad_arguments", "TypeError", "missing a required argument"), "add")
    with pytest.raises(HandlerError) as info:
        decode_result(reply(1, "error", "ValueError", "boom"), "fail")
    assert str(info.value) == "task 'fail' raised ValueError: boom"
    assert (info.value.remote_type, info.value.remote_message) == ("ValueError", "boom")
    with pytest.raises(HandlerError, match=r"^task raised KeyError$"):
        decode_result(reply(1, "error", "KeyError", ""))
    with pytest.raises(BadRequest, match="rejected the call"):
        decode_result(reply(1, "bad_call", "", "expected [version, name, args, kwargs]"))
    with pytest.raises(BadRequest, match="cannot encode: set"):
        decode_result(reply(1, "unencodable", "TypeError", "set: can not serialize"), "make_set")
    with pytest.raises(RequestFailed, match=r"failed \(from_the_future\)"):
        decode_result(reply(1, "from_the_future", "", "?"))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        reply(0, 1) + b"x",
        reply(0),
        reply(2, 1),
        reply(True, 1),
        reply(1, "error", 5, "not a str"),
        reply(1, "error", "ValueError"),
        msgpack.packb({"0": 1}),
    ],
)
def test_decode_result_rejects_what_is_not_a_reply(data: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_result(data)


def test_every_error_is_a_request_failure() -> None:
    for error in (UnknownTask, BadArguments, HandlerError, BadRequest):
        assert issubclass(error, RequestFailed)


def test_import_without_msgpack_and_the_hint() -> None:
    """gaspar.app imports without msgpack; using it says how to install it."""
    code = (
        "import sys; sys.modules['msgpack'] = None\n"
        "import gaspar.app\n"
        "try:\n"
        "    gaspar.app.App()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "try:\n"
        "    gaspar.app.encode_call('x')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=30, check=True
    )
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 2
    assert all("pip install '.[msgpack]' (from a gaspar checkout)" in line for line in lines)


# --- the App in process -----------------------------------------------------------------------


def test_task_decorator_registers_and_returns_the_function() -> None:
    local = App()

    @local.task
    def double(x: int) -> int:
        return 2 * x

    def triple(x: int) -> int:
        return 3 * x

    assert local.task(name="times3")(triple) is triple
    assert local.tasks == {"double": double, "times3": triple}
    assert double(2) == 4  # still callable locally
    assert local.task(double) is double  # the same function again is fine
    with pytest.raises(ValueError, match="already registered"):
        local.task(name="double")(triple)
    with pytest.raises(ValueError, match="non-empty str"):
        local.task(name="")(triple)
    assert decode_result(local.handle(encode_call("times3", (5,)))) == 15
    assert isinstance(local, gaspar.Consumer)
    assert gaspar.consumer.as_consumer(local) is local


def test_setup_hook() -> None:
    ran: list[int] = []
    App(setup=lambda: ran.append(1)).setup()
    App().setup()
    assert ran == [1]


def test_handle_round_trip_in_process() -> None:
    for value in ROUND_TRIP:
        result = decode_result(app.handle(encode_call("echo", (value,))))
        assert result == value and type(result) is type(value)
    assert decode_result(app.handle(encode_call("echo", ((1, 2),)))) == [1, 2]  # tuples -> lists


def test_handle_binds_arguments_before_calling() -> None:
    calls: list[Any] = []
    local = App()

    @local.task
    def one(x: Any, /, *, key: str = "") -> None:
        calls.append(x)

    for args, kwargs in [((), {}), ((1, 2), {}), ((), {"x": 1}), ((1,), {"other": 2})]:
        data = local.handle(encode_call("one", args, kwargs))
        assert outcome(data)[:3] == [1, "bad_arguments", "TypeError"]
    assert calls == []
    assert decode_result(local.handle(encode_call("one", (1,), {"key": "k"}))) is None
    assert calls == [1]


def test_handle_reports_task_errors_and_logs_them(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gaspar.app"):
        data = app.handle(encode_call("fail", ("boom",)))
    assert outcome(data) == [1, "error", "ValueError", "boom"]
    [record] = [r for r in caplog.records if r.name == "gaspar.app"]
    assert "fail" in record.getMessage()
    assert "Traceback" in record.getMessage() and "ValueError: boom" in record.getMessage()
    assert outcome(app.handle(encode_call("add", (1, "x"))))[:3] == [1, "error", "TypeError"]


def test_handle_unencodable_and_unprintable() -> None:
    assert outcome(app.handle(encode_call("make_set")))[:2] == [1, "unencodable"]
    local = App()

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    @local.task
    def surrogate() -> None:
        raise ValueError("bad \udcff byte")  # as os.fsdecode() can make

    @local.task
    def unprintable() -> None:
        raise Unprintable

    # Neither exception makes handle() raise: their replies are still encodable.
    with pytest.raises(HandlerError, match=re.escape("ValueError: bad \\udcff byte")):
        decode_result(local.handle(encode_call("surrogate")))
    with pytest.raises(HandlerError, match="Unprintable: <unprintable Unprintable>"):
        decode_result(local.handle(encode_call("unprintable")))


def test_handle_unknown_task_lists_the_tasks() -> None:
    with pytest.raises(UnknownTask, match=r"no task named 'nope'; tasks: .*resize"):
        decode_result(app.handle(encode_call("nope")))


BAD_CALLS = [
    b"",
    b"\xc1",
    b"\x92",  # truncated array
    reply(1, "echo", [1], {}) + b"trailing",
    reply(1, "echo", [1]),
    reply(2, "echo", [1], {}),
    reply(True, "echo", [1], {}),
    reply(1, b"echo", [1], {}),
    reply(1, "echo", {"value": 1}, {}),
    reply(1, "echo", [1], []),
    reply(1, "echo", [], {b"value": 1}),
    reply(1, "echo", [{1: "int keys are refused in calls"}], {}),
    b"\x94\x01\xa4ech\xff\x90\x80",  # a str that is not UTF-8
    msgpack.packb("just a string"),
]


@pytest.mark.parametrize("data", BAD_CALLS)
def test_handle_rejects_bad_calls(data: bytes) -> None:
    assert outcome(app.handle(data))[:2] == [1, "bad_call"]
    with pytest.raises(BadRequest):
        decode_result(app.handle(data))


# --- served -----------------------------------------------------------------------------------


def test_round_trip(address: tuple[str, int]) -> None:
    for value in ROUND_TRIP:
        result = call(address, "echo", value, timeout=10)
        assert result == value and type(result) is type(value)
    assert call(address, "echo", value=b"by keyword", timeout=10) == b"by keyword"


def test_positional_and_keyword_arguments(address: tuple[str, int]) -> None:
    pixels = bytes(range(16))  # 4x4
    assert call(address, "resize", pixels, 4, 4, 2, timeout=10) == bytes([0, 2, 8, 10])
    assert call(address, "resize", pixels, 4, 4, new_width=2, flip=True, timeout=10) == bytes(
        [8, 10, 0, 2]
    )
    assert call(address, "resize", pixels, 4, 4, 8, 1) == bytes([0, 0, 1, 1, 2, 2, 3, 3])


def test_nested_result(address: tuple[str, int]) -> None:
    result = call(address, "stats", b"\x03\x01\x03", label="three")
    assert result == {
        "label": "three",
        "size": 3,
        "extremes": [1, 3],
        "histogram": {"3": 2, "1": 1},
        "head": {"bytes": b"\x03\x01\x03", "hex": "030103"},
    }


def test_keywords_named_like_calls_parameters(address: tuple[str, int]) -> None:
    assert call(address, "kwargs", 1, name="n", address="a", timeout=10) == {
        "args": [1],
        "kwargs": {"name": "n", "address": "a"},
    }
    # `timeout` belongs to call(); a task gets one through encode_call.
    assert call(address, "kwargs", timeout=10) == {"args": [], "kwargs": {}}
    data = request(address, encode_call("kwargs", (), {"timeout": 3}), timeout=10)
    assert decode_result(data) == {"args": [], "kwargs": {"timeout": 3}}


def test_unknown_task(address: tuple[str, int]) -> None:
    with pytest.raises(UnknownTask, match="no task named 'nope'"):
        call(address, "nope", timeout=10)


def test_bad_arguments(address: tuple[str, int]) -> None:
    before = call(address, "records", timeout=10)
    with pytest.raises(BadArguments, match="too many positional"):
        call(address, "record", 1, 2, timeout=10)
    with pytest.raises(BadArguments, match="missing a required argument"):
        call(address, "record", timeout=10)
    with pytest.raises(BadArguments, match="unexpected keyword argument 'colour'"):
        call(address, "record", 1, colour="red", timeout=10)
    with pytest.raises(BadArguments):
        call(address, "record", item=1, timeout=10)  # positional-only
    with pytest.raises(BadArguments, match="bad arguments for task 'resize'"):
        call(address, "resize", b"", 0, timeout=10)
    assert call(address, "records", timeout=10) == before  # the task never ran
    assert call(address, "record", "ok", tag="t", timeout=10) == len(before) + 1


def test_type_error_inside_a_task_is_a_handler_error(address: tuple[str, int]) -> None:
    with pytest.raises(HandlerError) as info:
        call(address, "add", 1, "x", timeout=10)
    assert not isinstance(info.value, BadArguments)
    assert info.value.remote_type == "TypeError"
    assert "unsupported operand" in info.value.remote_message
    assert call(address, "add", 1, 2, timeout=10) == 3


def test_remote_exception(address: tuple[str, int]) -> None:
    with pytest.raises(HandlerError) as info:
        call(address, "fail", "it broke", timeout=10)
    assert info.value.remote_type == "ValueError"
    assert info.value.remote_message == "it broke"
    assert str(info.value) == "task 'fail' raised ValueError: it broke"
    with pytest.raises(HandlerError, match="is not 4x4"):
        call(address, "resize", b"short", 4, 4, 2, timeout=10)


def test_unencodable_result(address: tuple[str, int]) -> None:
    with pytest.raises(BadRequest, match="'make_set' returned a result msgpack cannot encode"):
        call(address, "make_set", timeout=10)


def test_malformed_calls_sent_raw(address: tuple[str, int]) -> None:
    for data in BAD_CALLS:
        with pytest.raises(BadRequest):
            decode_result(request(address, data, timeout=10))


def test_unencodable_argument_fails_before_sending() -> None:
    with pytest.raises(TypeError):  # not ConnectionFailed: nothing was sent to port 1
        call(("127.0.0.1", 1), "echo", object(), timeout=10)


def test_worker_survives_every_failure(serve: Serve) -> None:
    producer = serve(app, processes=1)
    address = producer.address
    pid = call(address, "pid", timeout=10)
    assert producer.worker_pids() == [pid]
    failures: list[Callable[[], Any]] = [
        lambda: call(address, "nope", timeout=10),
        lambda: call(address, "record", 1, 2, timeout=10),
        lambda: call(address, "add", 1, "x", timeout=10),
        lambda: call(address, "fail", "boom", timeout=10),
        lambda: call(address, "make_set", timeout=10),
        *[
            lambda data=data: decode_result(request(address, data, timeout=10))
            for data in BAD_CALLS
        ],
    ]
    for failure in failures:
        with pytest.raises(RequestFailed):
            failure()
        assert call(address, "pid", timeout=10) == pid
    assert producer.worker_pids() == [pid]


def test_setup_runs_once_in_each_worker(serve: Serve) -> None:
    """Two workers, each busy with a request at once: both ran setup(), once, after fork."""
    producer = serve(app, processes=2)
    address = producer.address
    workers = set(producer.worker_pids())
    assert len(workers) == 2
    seen: dict[int, dict[str, Any]] = {}
    with Client(address, timeout=10, pool_size=2) as client:

        def ask() -> None:
            # Each call holds its worker for a while, so the two calls take both workers.
            info = client.call("setup_info", 0.3)
            seen[info["pid"]] = info

        for _ in range(3):
            threads = [threading.Thread(target=ask) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
    assert set(seen) == workers  # both workers answered
    for pid, info in seen.items():
        assert info["setups"] == 1 and info["setup_pid"] == pid
    assert app_example.state["setup_pid"] != os.getpid()  # never in the producer's process


def test_gaspar_serve_serves_an_app() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gaspar", "serve", "tests.app_example:app", "--port", "0"]
        + ["--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        bufsize=0,  # unbuffered, so select() sees every line not yet read
    )
    try:
        assert proc.stderr is not None
        log: list[bytes] = []
        match = None
        deadline = time.monotonic() + 20
        while match is None and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
            line = proc.stderr.readline() if ready else b""
            if not line:
                break
            log.append(line)
            match = LISTENING.search(line)
        assert match is not None, f"no 'listening on' line in {log!r}"
        address = (match.group(1).decode(), int(match.group(2)))
        pixels = bytes(range(16))
        assert call(address, "resize", pixels, 4, 4, 2, timeout=10) == bytes([0, 2, 8, 10])
        with pytest.raises(HandlerError, match="ValueError: boom"):
            call(address, "fail", "boom", timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        rest = proc.stderr.read()
        assert b"task 'fail' raised" in b"".join(log) + rest
    finally:
        proc.kill()
        proc.wait(10)


def test_the_clients_do_not_import_the_app() -> None:
    """No import cycle: the call codec is gaspar.callcodec, which imports neither side."""
    code = (
        "import sys, gaspar.client, gaspar.aio\n"
        "print('gaspar.app' in sys.modules)\n"
        "import gaspar.callcodec as codec, gaspar.app as app\n"
        "print(app.encode_call is codec.encode_call, app.decode_result is codec.decode_result)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True"]

"""One table of options: Producer, `gaspar serve` and the README all follow gaspar/options.py."""

from __future__ import annotations

import argparse
import inspect
import math
import os
import re
import subprocess
import sys

import pytest

import gaspar
from gaspar import options
from gaspar.cli import build_parser
from gaspar.options import OPTIONS, PRODUCER_OPTIONS, REQUIRED
from tests import handlers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_START = "<!-- options table: generated from gaspar/options.py; a test keeps it in step -->\n"
README_END = "<!-- end of options table -->"


def serve_args(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gaspar", "serve", "tests.handlers:echo", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_producer_signature_and_the_table_agree() -> None:
    params = list(inspect.signature(gaspar.Producer.__init__).parameters.values())[2:]
    assert [p.name for p in params] == [o.name for o in PRODUCER_OPTIONS]
    for param, option in zip(params, PRODUCER_OPTIONS, strict=True):
        expected = inspect.Parameter.empty if option.default is REQUIRED else option.default
        assert param.default == expected, option.name


def test_readme_table_is_the_generated_one() -> None:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    between = text.split(README_START, 1)[1].split(README_END, 1)[0]
    assert between == options.markdown_table()


def test_every_producer_option_is_a_flag_of_serve_with_the_same_default() -> None:
    args = build_parser().parse_args(["serve", "tests.handlers:echo"])
    for option in OPTIONS:
        assert getattr(args, option.name) == option.command_default, option.name
    assert args.max_queue == 1000 and args.port == 10123 and args.tune_malloc is True
    flags = build_parser().parse_args(
        ["serve", "x:y", "--write-timeout", "2", "--max-pipeline", "3", "--idle-timeout", "4"]
    )
    assert (flags.write_timeout, flags.max_pipeline, flags.idle_timeout) == (2.0, 3, 4.0)
    switches = build_parser().parse_args(["serve", "x:y", "--no-tune-malloc", "--no-uvloop"])
    assert switches.tune_malloc is False and switches.use_uvloop is False


def test_serve_help_shows_every_flag_and_its_default() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gaspar", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for option in OPTIONS:
        assert option.flag_name in text
    assert "(default: 1000)" in text and "(default: 10123)" in text and "(default: 16 MiB)" in text


BAD_PYTHON = [
    ("port", 99999, "port must be an integer from 0 to 65535, got 99999"),
    ("port", -1, "port must be an integer from 0 to 65535"),
    ("processes", -1, "processes must be an integer at least 0 or None, got -1"),
    ("timeout", 0, "timeout must be a number above 0 or None, got 0"),
    ("timeout", math.nan, "timeout must be a number above 0 or None, got nan"),
    ("grace", -1, "grace must be a number at least 0, got -1"),
    ("max_queue", 0, "max_queue must be an integer at least 1, got 0"),
    ("max_queue", 2.5, "max_queue must be an integer at least 1, got 2.5"),
    ("max_connections", True, "max_connections must be an integer at least 1, got True"),
    ("max_message_size", 1 << 31, "max_message_size must be an integer from 0 to"),
    ("read_timeout", "30", "read_timeout must be a number above 0, got '30'"),
    ("write_timeout", 0, "write_timeout must be a number above 0"),
    ("max_pipeline", 0, "max_pipeline must be an integer at least 1"),
    ("idle_timeout", -5, "idle_timeout must be a number above 0"),
    ("host", 1, "host must be a string, got 1"),
    ("use_uvloop", "yes", "use_uvloop must be true or false or None"),
    ("tune_malloc", 1, "tune_malloc must be true or false, got 1"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_PYTHON)
def test_producer_refuses_a_bad_option_in_one_line(name: str, value: object, message: str) -> None:
    settings: dict[str, object] = {"port": 0, name: value}
    port = settings.pop("port")
    with pytest.raises(ValueError) as info:
        gaspar.Producer(handlers.echo, port, **settings)  # type: ignore[arg-type]
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_producer_accepts_the_edges_of_each_range() -> None:
    producer = gaspar.Producer(
        handlers.echo, 65535, processes=1, timeout=1, grace=0, max_message_size=0, max_queue=1
    )
    assert producer.timeout == 1.0 and isinstance(producer.timeout, float)
    assert producer.grace == 0.0 and producer.max_queue == 1


BAD_FLAGS = [
    (["--port", "99999"], "argument --port: must be an integer from 0 to 65535, got '99999'"),
    (["--workers", "-1"], "argument --workers: must be an integer at least 0, got '-1'"),
    (["--timeout", "0"], "argument --timeout: must be a number above 0, got '0'"),
    (["--log-level", "loud"], "argument --log-level: must be one of debug, info, warning"),
    (["--grace", "-1"], "argument --grace: must be a number at least 0, got '-1'"),
    (["--max-queue", "0"], "argument --max-queue: must be an integer at least 1, got '0'"),
    (["--max-queue", "many"], "argument --max-queue: must be an integer at least 1"),
    (["--read-timeout", "inf"], "argument --read-timeout: must be a number above 0"),
]


@pytest.mark.parametrize(("args", "message"), BAD_FLAGS)
def test_serve_refuses_a_bad_flag_in_one_line_with_exit_code_2(
    args: list[str], message: str
) -> None:
    result = serve_args(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gaspar serve: " + message)
    assert result.stdout == ""


def test_log_level_is_read_in_any_case() -> None:
    assert build_parser().parse_args(["serve", "x:y", "--log-level", "DEBUG"]).log_level == "debug"


def test_a_new_option_is_one_entry() -> None:
    """What later flags need (a path, a choice, an optional value, a switch) fits one Option."""
    extra = (
        options.Option("key", str, None, "secret certificate", optional=True, producer=False),
        options.Option("log_format", str, "text", "format", choices=("text", "json")),
        options.Option("max_requests", int, None, "recycle after N", low=1, optional=True),
        options.Option("insecure_workers", bool, False, "allow plain tcp on loopback"),
    )
    parser = argparse.ArgumentParser()
    options.add_flags(parser, extra)
    args = parser.parse_args(
        ["--key", "k.key_secret", "--log-format", "JSON", "--insecure-workers"]
    )
    assert (args.key, args.log_format, args.max_requests, args.insecure_workers) == (
        "k.key_secret",
        "json",
        None,
        True,
    )
    assert re.search(r"max_requests must be an integer at least 1 or None", extra[2].complaint(0))

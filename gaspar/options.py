"""The producer's options, declared once: name, type, default, bound and help.

``Producer`` validates its arguments against this table, ``gaspar serve``
builds one flag from each entry, and the README's table of options is
generated from it (a test keeps the README in step).  A new option is one
``Option(...)`` line here, plus its keyword in ``Producer.__init__`` (a test
checks that the signature and the table agree); options that only the command
has (``producer=False``) need nothing else.

A bad value, from Python or from the command line, is refused with one line
that names the option and what it may be.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from .protocol import DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_PIPELINE, MAX_MESSAGE_SIZE_LIMIT

__all__ = [
    "COMMAND_OPTIONS",
    "DEFAULTS",
    "OPTIONS",
    "PRODUCER_OPTIONS",
    "REQUIRED",
    "Option",
    "add_flags",
    "markdown_table",
    "validate",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


# The default of an option that Python callers must pass (the command has its own).
REQUIRED: Any = _Required()
# An option's command-line default when it is the same as Producer's.
SAME: Any = object()


class Option(NamedTuple):
    """One option: what it is called, what it may be, what it defaults to.

    A NamedTuple rather than a dataclass: ``dataclasses`` would load ``inspect``
    and ``ast`` into every process that parses the command line.
    """

    name: str
    kind: type[int] | type[float] | type[bool] | type[str]
    default: Any
    help: str
    low: float | None = None  # the smallest value allowed
    high: float | None = None  # the largest value allowed
    above: bool = False  # `low` itself is not allowed
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is allowed (and means what `shown` says)
    flag: str = ""  # the command's flag, without "--"; the name with dashes if empty
    command: Any = SAME  # the command's default, when it differs from Producer's
    shown: str = ""  # the default as documented, when the value alone says too little
    producer: bool = True  # False: the command's alone, not a Producer option
    metavar: str = ""

    @property
    def flag_name(self) -> str:
        return "--" + (self.flag or self.name.replace("_", "-"))

    @property
    def command_default(self) -> Any:
        return self.default if self.command is SAME else self.command

    def rule(self) -> str:
        """What a value may be, as words: "an integer from 0 to 65535"."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "a string"
        noun = "an integer" if self.kind is int else "a number"
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"{noun} from {low} to {high}"
        if self.low is not None:
            return f"{noun} {'above' if self.above else 'at least'} {low}"
        if self.high is not None:
            return f"{noun} at most {high}"
        return noun

    def complaint(self, value: object, name: str = "") -> str:
        rule = self.rule() + (" or None" if self.optional and not name else "")
        return f"{name or self.name} must be {rule}, got {value!r}"

    def check(self, value: Any) -> Any:
        """`value` if allowed (an int given for a float becomes a float); else ValueError."""
        if value is None and self.optional:
            return None
        if not self._allowed(value):
            raise ValueError(self.complaint(value))
        return float(value) if self.kind is float else value

    def parse(self, text: str) -> Any:
        """An argparse type: the value of `text`, checked against the same rule."""
        value: Any = text
        try:
            if self.kind is int:
                value = int(text)
            elif self.kind is float:
                value = float(text)
            elif self.choices:
                value = text.lower()
        except ValueError:
            pass
        if not self._allowed(value):
            raise argparse.ArgumentTypeError(f"must be {self.rule()}, got {text!r}")
        return value

    def _allowed(self, value: Any) -> bool:
        if isinstance(value, bool) and self.kind is not bool:
            return False
        if self.kind is float:
            if not isinstance(value, int | float) or not math.isfinite(value):
                return False
        elif not isinstance(value, self.kind):
            return False
        if self.choices:
            return value in self.choices
        if self.kind in (int, float):
            if self.low is not None and (value < self.low or (self.above and value == self.low)):
                return False
            if self.high is not None and value > self.high:
                return False
        return True

    def documented_default(self, command: bool = False) -> str:
        value = self.command_default if command else self.default
        if self.shown and value is self.default:
            return self.shown
        if value is REQUIRED:
            return "required"
        if self.kind is bool:
            return "on" if value else "off"
        return _number(value) if isinstance(value, int | float) else str(value)


def _number(value: object) -> str:
    if value == MAX_MESSAGE_SIZE_LIMIT:
        return "2 GiB - 1"
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value >> 20} MiB"
    return f"{value:g}" if isinstance(value, float) else str(value)


OPTIONS: tuple[Option, ...] = (
    Option(
        "port",
        int,
        REQUIRED,
        "TCP port; 0 binds a free one, readable as `producer.address`",
        low=0,
        high=65535,
        command=10123,
    ),
    Option(
        "processes",
        int,
        None,
        "worker processes",
        low=1,
        optional=True,
        flag="workers",
        shown="the CPUs this process may use",
        metavar="N",
    ),
    Option("host", str, "127.0.0.1", "address to bind; `::1` or `::` for IPv6"),
    Option(
        "timeout",
        float,
        None,
        "seconds a request may run in its worker; past it the request"
        " fails and the worker is killed and replaced",
        low=0,
        above=True,
        optional=True,
        shown="none",
        metavar="S",
    ),
    Option(
        "max_message_size",
        int,
        DEFAULT_MAX_MESSAGE_SIZE,
        "largest request accepted, in bytes",
        low=0,
        high=MAX_MESSAGE_SIZE_LIMIT,
        metavar="B",
    ),
    Option(
        "max_queue",
        int,
        1000,
        "requests waiting for a free worker; past it, new requests are refused",
        low=1,
        metavar="N",
    ),
    Option(
        "max_connections",
        int,
        1024,
        "open client connections; past it, the v2 connection idle the longest is closed"
        " to admit a new one, and when none is idle new ones are reset",
        low=1,
        metavar="N",
    ),
    Option(
        "read_timeout",
        float,
        30.0,
        "seconds a client has to send its whole request",
        low=0,
        above=True,
        metavar="S",
    ),
    Option(
        "write_timeout",
        float,
        30.0,
        "seconds a client has to take its reply",
        low=0,
        above=True,
        metavar="S",
    ),
    Option(
        "max_pipeline",
        int,
        DEFAULT_MAX_PIPELINE,
        "requests in flight on one v2 connection",
        low=1,
        metavar="N",
    ),
    Option(
        "idle_timeout",
        float,
        300.0,
        "seconds after which a v2 connection with nothing in flight and nothing arriving is closed",
        low=0,
        above=True,
        metavar="S",
    ),
    Option(
        "grace",
        float,
        30.0,
        "at stop, seconds that in-flight and queued requests get to finish",
        low=0,
        metavar="S",
    ),
    Option(
        "use_uvloop",
        bool,
        None,
        "uvloop for the producer's event loop; unset: when installed (`pip install '.[uvloop]'`)",
        optional=True,
        flag="uvloop",
        shown="when installed",
    ),
    Option(
        "tune_malloc",
        bool,
        False,
        "on glibc, keep buffers below 4 MiB on the heap and up to"
        " 32 MiB of freed memory for reuse, in the producer's process only; large requests"
        " then cost about a quarter less CPU. Process-wide, hence off unless asked for;"
        " `gaspar serve` asks",
        command=True,
    ),
    Option(
        "log_level",
        str,
        "info",
        "least severe log records written",
        producer=False,
        choices=("debug", "info", "warning", "error", "critical"),
    ),
    # Issue 12, item 2: worker recycling and liveness (gaspar/worker.py, gaspar/links.py).
    Option(
        "max_requests",
        int,
        None,
        "requests after which a worker is replaced by a fresh one (none fails); unset: never",
        low=1,
        optional=True,
        shown="none",
        metavar="N",
    ),
    Option(
        "max_requests_jitter",
        int,
        0,
        "each worker's `max_requests` is that plus a random 0 to N, so that workers do not"
        " all leave at once",
        low=0,
        metavar="N",
    ),
    Option(
        "max_worker_memory",
        int,
        None,
        "MiB of resident memory (checked after each request) past which a worker is"
        " replaced by a fresh one (none fails); unset: never",
        low=1,
        optional=True,
        shown="none",
        metavar="MB",
    ),
    Option(
        "liveness_timeout",
        float,
        30.0,
        "seconds an idle worker may stay silent (it says it is alive every third of them)"
        " before it is killed and replaced as hung; busy ones are `timeout`'s",
        low=0,
        above=True,
        metavar="S",
    ),
)

PRODUCER_OPTIONS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.producer)
COMMAND_OPTIONS: tuple[Option, ...] = OPTIONS
DEFAULTS: dict[str, Any] = {o.name: o.default for o in PRODUCER_OPTIONS}
_BY_NAME = {o.name: o for o in OPTIONS}


def validate(**values: Any) -> dict[str, Any]:
    """Check each Producer option given by name; return them normalised, or raise ValueError."""
    return {name: _BY_NAME[name].check(value) for name, value in values.items()}


class _Switch(argparse.Action):
    """`--x` sets True, `--no-x` False (argparse's BooleanOptionalAction, alike on 3.10+)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        names = [*option_strings, *("--no-" + s[2:] for s in option_strings)]
        super().__init__(names, dest, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


def add_flags(parser: argparse.ArgumentParser, options: Iterable[Option] = COMMAND_OPTIONS) -> None:
    """One flag per option, its help ending with what it may be and its default."""
    for o in options:
        help_text = _plain(o.help)
        rule = "" if o.kind is str and not o.choices else "; " + o.rule()
        default = o.documented_default(command=True)
        if o.kind is bool:
            parser.add_argument(
                o.flag_name,
                dest=o.name,
                action=_Switch,
                default=o.command_default,
                help=f"{help_text} (default: {default})",
            )
            continue
        parser.add_argument(
            o.flag_name,
            dest=o.name,
            type=o.parse,
            default=o.command_default,
            metavar=o.metavar or ("{" + ",".join(o.choices) + "}" if o.choices else o.name.upper()),
            help=f"{help_text}{rule} (default: {default})",
        )


def _plain(text: str) -> str:
    return text.replace("`", "").replace("%", "%%")


def markdown_table() -> str:
    """The README's table of Producer options, generated from OPTIONS."""
    rows = [
        "| option | `gaspar serve` | default | allowed | meaning |",
        "| --- | --- | --- | --- | --- |",
        "| `consumer` | MODULE:ATTR | | | a `Consumer`, a `Consumer` subclass,"
        " or a plain callable |",
    ]
    for o in PRODUCER_OPTIONS:
        flag = (
            f"`{o.flag_name}`"
            if o.kind is not bool
            else f"`{o.flag_name}`, `--no-{o.flag_name[2:]}`"
        )
        default = o.documented_default()
        if o.command is not SAME:
            default += f" (`gaspar serve`: {o.documented_default(command=True)})"
        allowed = o.rule() + (", or `None`" if o.optional else "")
        rows.append(f"| `{o.name}` | {flag} | {default} | {allowed} | {o.help} |")
    return "\n".join(rows) + "\n"

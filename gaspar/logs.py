"""Log formatting for the ``gaspar`` command: one line per event, as text or JSON.

Every line names its process: its role (``producer``, ``supervisor``,
``worker``) and its pid.  The role is told from the process tree at format
time (the process that configured logging, its children, their children), so
the supervisor and the workers need no set-up of their own after the fork:
they inherit the handler.  Fields a log call passes as ``extra`` (``worker``,
``request_id``, ``client``, and the access log's) are part of the line: after
the message in text, as keys in JSON.

The access log (``--access-log``) is the logger ``gaspar.access``: one INFO
line per request that was answered, with :data:`ACCESS_FIELDS` as extra.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

__all__ = [
    "ACCESS_FIELDS",
    "FORMATS",
    "JsonFormatter",
    "OneLineFormatter",
    "configure_logging",
    "role",
]

FORMATS = ("text", "json")
#: The extra fields of each access log line, in the order the text line shows them.
ACCESS_FIELDS = (
    "client",
    "protocol",
    "request_id",
    "bytes_in",
    "bytes_out",
    "status",
    "queue_wait",
    "run_time",
    "worker",
)
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(role)s %(process)d] %(name)s: %(message)s"
# The roles by depth below the process that configured logging.
ROLES = ("producer", "supervisor", "worker")
HOST_ROLE = "host"  # gaspar worker's main process, which relays its workers to a producer

# Attributes every LogRecord has: anything else on a record came as `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
    "role",
    "taskName",
}
_main_pid = os.getpid()
_main_role = ROLES[0]


def role(pid: int | None = None) -> str:
    """This process's role: the configuring process's own, ``supervisor`` below it, then ``worker``.

    A process elsewhere in the tree (not below the configuring one) is named by that role too.
    """
    pid = os.getpid() if pid is None else pid
    if pid == _main_pid:
        return _main_role
    if os.getppid() == _main_pid:
        # Below a producer, or a worker host (gaspar worker), comes its supervisor.
        return ROLES[1] if _main_role in (ROLES[0], HOST_ROLE) else ROLES[2]
    return ROLES[2]


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class OneLineFormatter(logging.Formatter):
    """Format each record on one line: tracebacks have their newlines escaped.

    Extra fields follow the message as ``key=value`` (unless the record says,
    with ``_inline``, that its message shows them already: the access log's).
    """

    def format(self, record: logging.LogRecord) -> str:
        record.role = role(record.process)
        line = super().format(record)
        extras = {} if getattr(record, "_inline", False) else _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in extras.items())
        return line.replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, role, pid, and the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "role": role(record.process),
            "pid": record.process,
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _iso_time(created: float) -> str:
    """`created` as UTC ISO 8601 with milliseconds: 2026-12-01T13:45:00.123Z."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _text(value: object) -> str:
    text = str(value)
    return text if text and " " not in text else json.dumps(text)


def configure_logging(level: str, fmt: str = "text", main_role: str = ROLES[0]) -> None:
    """Log one line per event to standard error, as `fmt` (text or json).

    This process is `main_role`; processes it forks later are told apart by
    their place in the tree (see :func:`role`).
    """
    global _main_pid, _main_role
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    _main_pid, _main_role = os.getpid(), main_role
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else OneLineFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

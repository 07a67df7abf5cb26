"""Process titles, so that `ps` and `top` tell gaspar's processes apart.

    gaspar: producer HOST:PORT
    gaspar: supervisor
    gaspar: worker N idle|busy

With the `setproctitle` extra installed (``pip install '.[setproctitle]'``)
the whole title replaces the command line (/proc/PID/cmdline, what ``ps``
shows).  Without it, on Linux, ``prctl(PR_SET_NAME)`` sets the 15-byte
command name (/proc/PID/comm, what ``top`` and ``ps -o comm`` show): the title
without its "gaspar: " prefix, cut to 15 bytes ("worker 3 busy"); the command
line stays as it was.  Elsewhere titles are not set.

:func:`setter` returns the fastest way to set one, for a worker that switches
between idle and busy at each request (about half a microsecond either way).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

__all__ = ["COMM_MAX", "PREFIX", "set_title", "setter", "short_name"]

PREFIX = "gaspar: "
# The kernel's limit on a command name, less its terminating NUL.
COMM_MAX = 15
PR_SET_NAME = 15


def short_name(title: str) -> bytes:
    """What PR_SET_NAME is given for `title`: without the prefix, at most COMM_MAX bytes."""
    name = title[len(PREFIX) :] if title.startswith(PREFIX) else title
    return name.encode("utf-8", "replace")[:COMM_MAX]


def _nothing(title: str) -> None:
    pass


def setter() -> Callable[[str], None]:
    """A function that sets this process's title: setproctitle's, prctl's, or one that does not."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        pass
    else:
        return setproctitle
    if not sys.platform.startswith("linux"):
        return _nothing
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return _nothing

    def set_comm(title: str) -> None:
        prctl(PR_SET_NAME, short_name(title), 0, 0, 0)

    return set_comm


def set_title(title: str) -> None:
    """Set this process's title once (never raises: a title is a courtesy)."""
    with contextlib.suppress(Exception):
        setter()(title)

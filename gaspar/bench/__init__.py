"""``gaspar bench``: a closed-loop load generator for gaspar's wire protocols v1 and v2.

From the command line (:func:`register` adds the subcommand to a parser)::

    gaspar bench HOST:PORT [--concurrency 64] [--duration 5] [--size 16 | --payload-file F]
        [--protocol v1|v2] [--client raw|aio] [--connections 1] [--processes N]
        [--warmup 1] [--timeout 10] [--check-echo] [--quiet] [--json]

and as a module: :func:`run` returns the results as a dict, which
:func:`format_report` (several lines) and :func:`format_summary` (one line)
turn into text.

Exactly ``concurrency`` requests are in flight at any time.  They are split
over ``processes`` OS processes (started with multiprocessing's ``spawn``
context, so that nothing of the caller is forked), each running one asyncio
loop (uvloop when importable).  Closed loop: each reply triggers the next
request.  Payloads are either ``size`` random bytes, each carrying a unique
(client, sequence) tag when 12 bytes or more, or one fixed ``payload`` (a
file's bytes, say) sent unchanged in every request.

Replies: with ``check_echo`` the server is expected to echo, and a reply that
differs from its request counts as a mismatch (thanks to the tags, so does a
reply delivered to the wrong request).  Without it (the command's default:
users bench their own handlers) any successful reply counts: a v1 reply read
to EOF without a reset, a v2 reply with status OK.  Four ways to send, by
``protocol`` and ``client``:

- raw v1: each client coroutine loops: connect, write ``pack(payload)``, read
  to EOF, check the reply.  One fresh connection per request.
- raw v2: each process opens ``connections`` persistent connections (at most
  one per request in flight), writes the preamble, and keeps its share of the
  requests in flight on them, split evenly, from one asyncio Protocol per
  connection (no coroutine per request).  A request's v2 id is its slot on
  the connection; each reply (they come in completion order, matched by id)
  is checked (status OK and, with ``check_echo``, body equal to the payload)
  and at once replaced by the next request on that id; the replies of one
  read are answered with one write.  The server's preamble is checked by
  :class:`gaspar.protocol.ReplyReaderV2` before any reply is read.
- aio v1: each client coroutine loops on
  ``await gaspar.aio.request(address, payload, timeout=timeout)``.
- aio v2: the client coroutines of a process share one
  ``gaspar.aio.AsyncClient(address, connections=connections, timeout=timeout)``
  and loop on ``await client.request(payload)``.

The aio clients measure what gaspar's own asyncio client costs on top of the
raw protocol.

Timing: before anything starts, one connection probes the server (for v2, it
also checks the server's preamble), so an unreachable server fails at once.
The processes start together on a "go" from the parent.  The first
``warmup`` seconds are not measured; a request counts when it completes inside
the measured window of ``duration`` seconds that follows, and its latency runs
from its send (v2) or its connect (v1) to its reply.  No new request starts
after the window; requests still in flight get ``DRAIN_GRACE`` seconds and are
then abandoned, so a run is bounded in time.  Every connect and every reply
wait has its own timeout as well: on a raw v2 connection, a request without a
reply after ``timeout`` seconds fails every request on that connection, which
is then replaced.  With ``progress``, each process sends its running totals
to the parent every second of the window, and the parent prints one line per
second to standard error.

Results: requests/s (requests completed OK inside the window / duration),
latency percentiles (nearest rank, over the samples of every process), error
counts by kind (reset, refused, timeout, mismatch, the v2 statuses by their
lowercased :class:`gaspar.protocol.Status` name, other), and the generator's
own CPU time (user + sys, from ``resource.getrusage`` in each generator
process, over the measured window) relative to the window's wall time.
``cpu.busiest_process`` close to 1.0 (a full core) means the generator, not
the server, is the bottleneck; add ``--processes`` or CPUs.

The package is split by job: :mod:`.command` (the subcommand), :mod:`.plan`
(what a generator process does, and its counts), :mod:`.raw_v1`,
:mod:`.raw_v2` and :mod:`.coroutines` (the four ways to send),
:mod:`.generator` (a generator process), :mod:`.runner` (:func:`run`) and
:mod:`.report` (the figures as text).  Importing this package is cheap: no
asyncio, no ZeroMQ, no load generator until the subcommand runs or one of
:func:`run`, :func:`format_report`, :func:`format_summary` is used, because
``gaspar serve`` builds its parser with :func:`register` too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..clientcore import PROTOCOLS, STATUS_KINDS
from .command import register

if TYPE_CHECKING:
    from .report import format_progress, format_report, format_summary
    from .runner import run

__all__ = [
    "CLIENTS",
    "DEFAULT_TIMEOUT",
    "ERROR_KINDS",
    "PROTOCOLS",
    "format_progress",
    "format_report",
    "format_summary",
    "register",
    "run",
]

CLIENTS = ("raw", "aio")
#: Seconds per connect and per reply, unless told otherwise.
DEFAULT_TIMEOUT = 10.0
#: Failures by kind, in the report's order: the client core's kinds (a v2 status's
#: lower-case name, reset, refused) and "mismatch" (a reply that is not the echo).
ERROR_KINDS = (
    "reset",
    "refused",
    "timeout",
    "mismatch",
    *(kind for kind in STATUS_KINDS.values() if kind != "timeout"),
    "other",
)

# Loaded on first use, with the load generator.
_LAZY = {
    "run": "runner",
    "format_progress": "report",
    "format_report": "report",
    "format_summary": "report",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gaspar.bench' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value

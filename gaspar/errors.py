"""Exceptions that gaspar raises to its callers.

Every failure of a request is a :class:`RequestFailed`; its subclasses say why
when the protocol tells (v2 replies carry a status; v1 only resets).
"""

from __future__ import annotations

__all__ = [
    "BadArguments",
    "BadRequest",
    "ConnectionFailed",
    "GasparError",
    "HandlerError",
    "MessageTooLarge",
    "Overloaded",
    "RequestFailed",
    "RequestTimeout",
    "ShuttingDown",
    "StartupError",
    "UnknownTask",
    "WorkerLost",
]


class GasparError(Exception):
    """Base class of every gaspar exception."""


class StartupError(GasparError):
    """A producer could not start; the message is the cause, on one line.

    For example ``cannot listen on [::1]:10123: ...``, or for a worker whose
    setup() raised, ``worker 123: setup() failed: RuntimeError: no model``.
    """


class RequestFailed(GasparError):
    """A request got no reply; any underlying error is chained as __cause__."""


class ConnectionFailed(RequestFailed):
    """The server could not be reached, or the connection broke mid-request."""


class RequestTimeout(RequestFailed):
    """No reply in time: the client's timeout ran out, or the server's killed the handler."""


class HandlerError(RequestFailed):
    """The handler raised; `remote_type` and `remote_message` describe its exception."""

    def __init__(self, message: str, remote_type: str = "", remote_message: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = remote_message

    @classmethod
    def from_remote(cls, text: str) -> HandlerError:
        """Build from the server's "TypeName: message" text."""
        remote_type, sep, remote_message = text.partition(": ")
        if not sep:
            remote_type, remote_message = text, ""
        return cls(f"handler raised {text}", remote_type, remote_message)


class WorkerLost(RequestFailed):
    """The worker running the request died (crash, kill, or out of memory)."""


class Overloaded(RequestFailed):
    """The server refused the request: its queue or the connection's pipeline was full."""


class MessageTooLarge(RequestFailed):
    """The request (or the reply) was larger than the limit that applies to it."""


class BadRequest(RequestFailed):
    """The request was rejected as malformed (a structured call that cannot be decoded)."""


class ShuttingDown(RequestFailed):
    """The server is stopping and did not run, or did not finish, the request."""


class UnknownTask(RequestFailed):
    """A structured call named a task the server's App does not have."""


class BadArguments(RequestFailed):
    """A structured call's arguments do not fit the task's signature."""

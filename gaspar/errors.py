"""Exceptions that gaspar raises to its callers."""

from __future__ import annotations

__all__ = [
    "ConnectionFailed",
    "GasparError",
    "RequestFailed",
    "RequestTimeout",
    "StartupError",
]


class GasparError(Exception):
    """Base class of every gaspar exception."""


class StartupError(GasparError):
    """A producer could not start: a port in use, a worker whose setup() failed."""


class RequestFailed(GasparError):
    """A request got no reply; the underlying error is chained as __cause__."""


class ConnectionFailed(RequestFailed):
    """The server could not be reached, or dropped the connection mid-request."""


class RequestTimeout(RequestFailed):
    """No complete reply arrived within the client's timeout."""

"""The handler served in benchmarks: it returns the request unchanged.

Serve it with ``python -m gaspar serve benchmarks.echo:echo`` from the
repository root; the load generator checks that every reply equals its request.
"""

from __future__ import annotations


def echo(message: bytes) -> bytes:
    """Return `message` as the reply."""
    return message

"""What the blocking and the asyncio clients share: everything but reading and writing.

Framing is in :mod:`gaspar.protocol`; this module adds the client's
bookkeeping for v2 (request ids, replies that nobody waits for any more) and
the mapping from a reply's status to a typed exception.
"""

from __future__ import annotations

import sys
from typing import Generic, TypeVar

from .errors import (
    BadRequest,
    ConnectionFailed,
    HandlerError,
    MessageTooLarge,
    Overloaded,
    RequestFailed,
    RequestTimeout,
    ShuttingDown,
    WorkerLost,
)
from .protocol import MAX_REQUEST_ID, LimitExceeded, ProtocolError, Status

__all__ = [
    "EXCEPTIONS",
    "PROTOCOLS",
    "RequestIds",
    "as_request_failed",
    "check_protocol",
    "failure",
]

PROTOCOLS = ("v1", "v2")

# The exception a client raises for each v2 status but OK.
EXCEPTIONS: dict[Status, type[RequestFailed]] = {
    Status.HANDLER_ERROR: HandlerError,
    Status.TIMEOUT: RequestTimeout,
    Status.WORKER_LOST: WorkerLost,
    Status.OVERLOADED: Overloaded,
    Status.TOO_LARGE: MessageTooLarge,
    Status.BAD_REQUEST: BadRequest,
    Status.SHUTTING_DOWN: ShuttingDown,
}


def check_protocol(protocol: str) -> None:
    """Reject a protocol name other than "v1" or "v2"."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be 'v1' or 'v2', not {protocol!r}")


def failure(status: Status, body: bytes, where: str) -> RequestFailed:
    """The exception for a v2 reply whose status is not OK."""
    text = body.decode("utf-8", "replace")
    if status is Status.HANDLER_ERROR:
        exc = HandlerError.from_remote(text)
        exc.args = (f"{where}: {exc.args[0]}",)
        return exc
    return EXCEPTIONS.get(status, RequestFailed)(f"{where}: {text or status.name.lower()}")


def _is_asyncio_timeout(exc: BaseException) -> bool:
    # Before 3.11 asyncio has its own TimeoutError; looked up, not imported,
    # so that the blocking client does not load asyncio.
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and isinstance(exc, asyncio.TimeoutError)


def as_request_failed(
    exc: BaseException, where: str, reset: type[RequestFailed] = RequestFailed
) -> RequestFailed | None:
    """The RequestFailed for a socket or framing error, or None if `exc` is neither.

    A reset is how v1 reports a failed request (RequestFailed); in v2, where
    failures are replies, it means the connection broke (ConnectionFailed).
    """
    if isinstance(exc, TimeoutError) or _is_asyncio_timeout(exc):
        return RequestTimeout(f"{where}: no reply in time")
    if isinstance(exc, ConnectionResetError):
        return reset(f"{where}: the server reset the connection")
    if isinstance(exc, LimitExceeded):
        return MessageTooLarge(f"{where}: reply too large: {exc}")
    if isinstance(exc, ProtocolError):
        return ConnectionFailed(f"{where}: {exc}")
    if isinstance(exc, OSError):
        return ConnectionFailed(f"{where}: connection failed: {exc}")
    return None


W = TypeVar("W")


class RequestIds(Generic[W]):
    """Request ids of one v2 connection, and who waits for each reply.

    An id stays taken until the server's reply for it arrives, even when its
    caller gave up (timeout, cancellation): a late reply is then dropped here,
    and can never be taken for the reply of a later request that reused the id.
    """

    __slots__ = ("_abandoned", "_next", "waiting")

    def __init__(self) -> None:
        self.waiting: dict[int, W] = {}
        self._abandoned: set[int] = set()
        self._next = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self._abandoned)

    def open(self, waiter: W) -> int:
        """Take a fresh id for `waiter`."""
        rid = self._next
        while rid in self.waiting or rid in self._abandoned:
            rid = (rid + 1) & MAX_REQUEST_ID
        self._next = (rid + 1) & MAX_REQUEST_ID
        self.waiting[rid] = waiter
        return rid

    def abandon(self, rid: int) -> None:
        """The caller stopped waiting; keep the id taken until its reply arrives."""
        if self.waiting.pop(rid, None) is not None:
            self._abandoned.add(rid)

    def resolve(self, rid: int) -> W | None:
        """The reply for `rid` arrived: who waits for it, or None if nobody does."""
        waiter = self.waiting.pop(rid, None)
        if waiter is None:
            self._abandoned.discard(rid)
        return waiter

    def drain(self) -> list[W]:
        """The connection is gone: every waiter, to be failed."""
        waiters = list(self.waiting.values())
        self.waiting.clear()
        self._abandoned.clear()
        return waiters

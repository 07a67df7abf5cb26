"""Raw v1: one fresh connection per request, from an asyncio Protocol of the generator's own.

It drives the client core's :class:`~gaspar.clientcore.V1Exchange` (framing,
the reply limit, the check for a reset at the end of the stream), with a
plain timer instead of ``asyncio.wait_for`` to keep the generator cheap.
"""

from __future__ import annotations

import asyncio
from typing import cast

from ..aio import pending_error
from ..clientcore import V1Exchange
from .plan import Plan


class _Exchange(asyncio.Protocol):
    """One v1 exchange: write the framed request on connect, collect the reply to EOF."""

    def __init__(self, exchange: V1Exchange, done: asyncio.Future[bytes]) -> None:
        self.exchange = exchange
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.exchange.data)

    def data_received(self, data: bytes) -> None:
        try:
            self.exchange.feed(data)
        except Exception as exc:  # LimitExceeded
            self._fail(exc)
            assert self.transport is not None
            self.transport.abort()

    def eof_received(self) -> bool:
        if not self.done.done():
            assert self.transport is not None
            try:
                self.done.set_result(self.exchange.end(pending_error(self.transport)))
            except OSError as exc:
                self.done.set_exception(exc)
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionAbortedError("closed before the end of the reply"))

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


def _expire(done: asyncio.Future[bytes]) -> None:
    if not done.done():
        done.set_exception(TimeoutError("no complete reply in time"))


async def exchange(plan: Plan, payload: bytes) -> bytes:
    """Send one request on a fresh connection; return the reply read to EOF."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    v1 = V1Exchange(payload, plan.reply_limit)
    transport, _ = await asyncio.wait_for(
        loop.create_connection(
            lambda: _Exchange(v1, done), plan.host, plan.port, family=plan.family
        ),
        plan.timeout,
    )
    timer = loop.call_later(plan.timeout, _expire, done)
    try:
        return await done
    finally:
        timer.cancel()
        if not transport.is_closing():
            transport.abort()

"""Raw v1: one fresh connection per request, through the asyncio client's protocol.

:class:`gaspar.aio.V1Protocol` drives the client core's
:class:`~gaspar.clientcore.V1Exchange` (framing, the reply limit, the check for
a reset at the end of the stream); this module adds a plain timer instead of
``asyncio.wait_for`` to keep the generator cheap.
"""

from __future__ import annotations

import asyncio

from ..aio import V1Protocol
from ..clientcore import V1Exchange
from .plan import Plan


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
            lambda: V1Protocol(v1, done), plan.host, plan.port, family=plan.family
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

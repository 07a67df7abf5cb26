"""One coroutine per request in flight: raw v1, aio v1 and aio v2.

Each coroutine loops: send, await the reply, count it, send the next, until
the measured window closes.  Raw v1 is :mod:`.raw_v1`; the aio ways call
:func:`gaspar.aio.request` or share one :class:`gaspar.aio.AsyncClient`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from ..aio import AsyncClient
from ..aio import request as aio_request
from . import raw_v1
from .plan import ERROR_BACKOFF, Plan, Tally, error_kind
from .plan import payloads as make_payloads

Exchange = Callable[[bytes], Awaitable[bytes]]


async def client_loop(plan: Plan, ident: int, exchange: Exchange, tally: Tally) -> None:
    """Issue requests back to back until the measured window closes."""
    perf = time.perf_counter
    payloads = make_payloads(plan, ident)
    check_echo = plan.check_echo
    t_end = tally.t_end
    while True:
        start = perf()
        if start >= t_end:
            return
        payload = next(payloads)
        kind: str | None = None
        detail: str | None = None
        try:
            reply = await exchange(payload)
        except Exception as exc:
            kind, detail = error_kind(exc, plan)
        else:
            if check_echo and reply != payload:
                kind = "mismatch"
                detail = "empty reply" if not reply else "wrong reply"
        finished = perf()
        if kind is None:
            if tally.t_warm <= finished < t_end:
                tally.latencies.append(finished - start)
        else:
            tally.failed(kind, detail, finished)
            await asyncio.sleep(ERROR_BACKOFF)


class CoroutineLoad:
    """`plan.coroutines` client coroutines, each with one request in flight."""

    def __init__(self, plan: Plan, tally: Tally) -> None:
        self.plan = plan
        self.tally = tally
        self.tasks: list[asyncio.Task[None]] = []
        self.shared: AsyncClient | None = None

    def start(self) -> None:
        plan = self.plan
        exchange: Exchange
        if plan.client == "aio" and plan.protocol == "v2":
            self.shared = AsyncClient(
                (plan.host, plan.port), connections=plan.connections, timeout=plan.timeout
            )
            exchange = self.shared.request
        elif plan.client == "aio":
            address = (plan.host, plan.port)

            async def exchange(payload: bytes) -> bytes:
                return await aio_request(address, payload, timeout=plan.timeout)

        else:

            async def exchange(payload: bytes) -> bytes:
                return await raw_v1.exchange(plan, payload)

        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(client_loop(plan, plan.first_id + i, exchange, self.tally))
            for i in range(plan.coroutines)
        ]

    async def drain(self, grace: float) -> None:
        await asyncio.wait(self.tasks, timeout=grace)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        outcomes = await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.shared is not None:
            await self.shared.close()
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                raise outcome  # a bug in this module, not a failed request

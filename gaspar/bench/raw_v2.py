"""Raw v2: pipelined requests on persistent connections, one asyncio Protocol each.

A request's v2 id is its slot on the connection; each reply is checked and at
once replaced by the next request on that id, and the replies of one read are
answered with one write.  Framing is :mod:`gaspar.protocol`'s (the server's
preamble is checked by its ``ReplyReaderV2``); failures are counted by the
client core's classifier (:func:`.plan.error_kind`).
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from ..clientcore import STATUS_KINDS
from ..protocol import MAGIC_V2, ProtocolError, ReplyReaderV2, Status, pack_request_v2
from .plan import ERROR_BACKOFF, WATCH_INTERVAL, Plan, Tally, error_kind, payloads, split


class _Slot:
    """One request in flight on a v2 connection; its index there is its request id."""

    __slots__ = ("busy", "payload", "payloads", "start")

    def __init__(self, plan: Plan, ident: int) -> None:
        self.payloads = payloads(plan, ident)
        self.payload = b""
        self.start = 0.0
        self.busy = False


class _Pipeline(asyncio.Protocol):
    """One persistent v2 connection keeping its slots' requests in flight."""

    def __init__(self, load: PipelinedLoad, index: int) -> None:
        self.load = load
        self.index = index
        self.slots = load.slots[index]
        self.reader = ReplyReaderV2(load.plan.reply_limit)
        self.transport: asyncio.Transport | None = None
        self.in_flight = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.load.live[self.index] = self
        frames = [self._frame(rid) for rid in range(len(self.slots))] if self.load.sending else []
        start = time.perf_counter()
        for slot in self.slots:
            slot.start = start
        self.transport.write(b"".join([MAGIC_V2, *frames]))

    def _frame(self, rid: int) -> bytes:
        slot = self.slots[rid]
        payload = next(slot.payloads)
        slot.payload = payload
        slot.busy = True
        self.in_flight += 1
        return pack_request_v2(rid, payload)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.reader.feed(data)
        except ProtocolError as exc:  # LimitExceeded too
            self.fail(*error_kind(exc, self.load.plan))
            return
        now = time.perf_counter()
        tally = self.load.tally
        measured = tally.t_warm <= now < tally.t_end
        more = now < tally.t_end
        slots = self.slots
        check_echo = self.load.plan.check_echo
        frames: list[bytes] = []
        sent: list[_Slot] = []
        for rid, status, body in replies:
            slot = slots[rid] if rid < len(slots) else None
            if slot is None or not slot.busy:
                kind = "mismatch" if check_echo else "other"
                tally.failed(kind, "reply to an id not in flight", now)
                continue
            slot.busy = False
            self.in_flight -= 1
            if status is Status.OK and (not check_echo or body == slot.payload):
                if measured:
                    tally.latencies.append(now - slot.start)
                if more:
                    frames.append(self._frame(rid))
                    sent.append(slot)
                continue
            if status is not Status.OK:
                detail = "status TIMEOUT from the server" if status is Status.TIMEOUT else None
                tally.failed(STATUS_KINDS[status], detail, now)
            else:
                tally.failed("mismatch", "empty reply" if not body else "wrong reply", now)
            if more:
                asyncio.get_running_loop().call_later(ERROR_BACKOFF, self._resend, rid)
        if frames:
            assert self.transport is not None
            start = time.perf_counter()
            for slot in sent:
                slot.start = start
            self.transport.write(b"".join(frames))

    def _resend(self, rid: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or not self.load.sending:
            return
        frame = self._frame(rid)
        self.slots[rid].start = time.perf_counter()
        transport.write(frame)

    def eof_received(self) -> bool:
        return False  # connection_lost(None) follows

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._forget("other", "the server closed the connection")
        else:
            self._forget(*error_kind(exc, self.load.plan))
        if self.load.live[self.index] is self:
            self.load.live[self.index] = None
        self.transport = None
        self.load.reconnect(self.index)
        if not self.lost.done():
            self.lost.set_result(None)

    def oldest(self) -> float | None:
        """When the oldest request still in flight was sent, or None."""
        starts = [slot.start for slot in self.slots if slot.busy]
        return min(starts) if starts else None

    def fail(self, kind: str, detail: str | None) -> None:
        """Count the requests in flight as failed with `kind`; drop the connection."""
        self._forget(kind, detail)
        if self.transport is not None:
            self.transport.abort()

    def _forget(self, kind: str, detail: str | None) -> None:
        if not self.in_flight:
            return
        for slot in self.slots:
            slot.busy = False
        self.load.tally.failed(kind, detail, time.perf_counter(), self.in_flight)
        self.in_flight = 0


class PipelinedLoad:
    """`plan.connections` raw v2 connections sharing `plan.coroutines` requests in flight."""

    def __init__(self, plan: Plan, tally: Tally) -> None:
        self.plan = plan
        self.tally = tally
        shares = split(plan.coroutines, max(1, min(plan.connections, plan.coroutines)))
        ident = plan.first_id
        self.slots: list[list[_Slot]] = []
        for share in shares:
            self.slots.append([_Slot(plan, ident + i) for i in range(share)])
            ident += share
        self.live: list[_Pipeline | None] = [None] * len(shares)
        self.pipelines: list[_Pipeline] = []
        self.connecting: set[asyncio.Task[None]] = set()
        self.closing = False
        self.watchdog: asyncio.TimerHandle | None = None

    @property
    def sending(self) -> bool:
        """Whether new requests may start: not after the measured window."""
        return not self.closing and time.perf_counter() < self.tally.t_end

    def start(self) -> None:
        for index in range(len(self.slots)):
            self._connect_later(index, 0.0)
        self._watch()

    def reconnect(self, index: int) -> None:
        if self.sending:
            self._connect_later(index, ERROR_BACKOFF)

    def _connect_later(self, index: int, delay: float) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(index, delay))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _connect(self, index: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if not self.sending:
            return
        plan = self.plan
        loop = asyncio.get_running_loop()
        try:
            _, pipeline = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Pipeline(self, index), plan.host, plan.port, family=plan.family
                ),
                plan.timeout,
            )
        except Exception as exc:
            kind, detail = error_kind(exc, plan)
            self.tally.failed(kind, detail, time.perf_counter(), len(self.slots[index]))
            self.reconnect(index)
            return
        self.pipelines.append(pipeline)

    def _watch(self) -> None:
        """Fail the connections whose oldest request is past its timeout."""
        expired = time.perf_counter() - self.plan.timeout
        for pipeline in self.live:
            if pipeline is not None:
                oldest = pipeline.oldest()
                if oldest is not None and oldest < expired:
                    pipeline.fail("timeout", None)
        self.watchdog = asyncio.get_running_loop().call_later(WATCH_INTERVAL, self._watch)

    async def drain(self, grace: float) -> None:
        deadline = time.perf_counter() + grace
        while time.perf_counter() < deadline and any(
            p is not None and p.in_flight for p in self.live
        ):
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        self.closing = True
        if self.watchdog is not None:
            self.watchdog.cancel()
        for task in list(self.connecting):
            task.cancel()
        await asyncio.gather(*self.connecting, return_exceptions=True)
        for pipeline in self.live:
            if pipeline is not None and pipeline.transport is not None:
                pipeline.transport.abort()
        lost = [p.lost for p in self.pipelines if not p.lost.done()]
        if lost:
            await asyncio.wait(lost, timeout=1.0)

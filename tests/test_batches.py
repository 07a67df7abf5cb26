"""Batches: tiny jobs waiting for busy workers travel several to a message.

The dispatcher tests drive a real Dispatcher through its ZeroMQ link
(gaspar/link_zmq.py) over real ZeroMQ, with the test playing the workers' side
of gaspar/workerproto.py on DEALER sockets, so that what each worker is sent,
and when, can be checked exactly.  The producer tests check the same end to
end, over the local link.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from hypothesis import given
from hypothesis import strategies as st

import gaspar
from gaspar import workerproto as wp
from gaspar.aio import AsyncClient
from gaspar.dispatcher import BATCH_BUDGET, BATCH_MAX, Dispatcher
from gaspar.link_zmq import ZmqLink
from gaspar.protocol import Status
from tests import handlers

Outcome = tuple[Status, bytes]

jobs_strategy = st.lists(st.tuples(st.binary(min_size=8, max_size=8), st.binary(max_size=40)))


@given(jobs_strategy, st.data())
def test_batch_bodies_round_trip_and_every_cut_is_refused(jobs, data) -> None:
    body = wp.pack_batch(jobs)
    assert wp.unpack_batch(body, len(jobs)) == jobs
    if body:
        cut = data.draw(st.integers(0, len(body) - 1))
        with pytest.raises(ValueError):
            wp.unpack_batch(body[:cut], len(jobs))
        with pytest.raises(ValueError):
            wp.unpack_batch(body + b"x", len(jobs))
        with pytest.raises(ValueError):
            wp.unpack_batch(body, len(jobs) + 1)


class Worker:
    """The worker's side of the protocol, run by the test."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, pid: int) -> None:
        self.pid = pid
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    async def ready(self) -> None:
        info = json.dumps({"pid": self.pid, "host": "test"}).encode()
        await self.sock.send(wp.READY + wp.job_id(0) + bytes(4) + info)

    async def receive(self) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The next message: its kind and its jobs as (id, payload)."""
        frames = await asyncio.wait_for(self.sock.recv_multipart(), 5)
        head = frames[0]
        kind, jid, count = head[:1], head[1:9], int.from_bytes(head[9:13], "big")
        body = frames[1] if len(frames) > 1 else head[wp.HEAD_SIZE :]
        if kind == wp.BATCH:
            return kind, wp.unpack_batch(body, count)
        return kind, [(jid, body)]

    async def answer(self, jid: bytes, payload: bytes, micros: int = 5) -> None:
        await self.sock.send(wp.DONE + jid + micros.to_bytes(4, "big") + payload.upper())


@asynccontextmanager
async def dispatcher(
    tmp_path: Path,
    workers: int = 2,
    timeout: float | None = None,
    cls: type[Dispatcher] = Dispatcher,
) -> AsyncIterator[tuple[Dispatcher, list[Worker], list[int]]]:
    """A Dispatcher with a ZeroMQ link on an ipc endpoint, and `workers` test workers
    that said READY."""
    endpoint = f"ipc://{tmp_path}/d"
    ctx = zmq.Context()
    actx = zmq.asyncio.Context()
    killed: list[int] = []
    disp = cls(timeout=timeout, max_queue=1000)
    ZmqLink(disp, endpoint, kill=killed.append, ctx=ctx)
    peers = [Worker(actx, endpoint, 1000 + i) for i in range(workers)]
    try:
        for n, peer in enumerate(peers, 1):  # one by one: they are idle in this order
            await peer.ready()
            assert await disp.wait_for(lambda n=n: disp.ready_workers == n, 5)
        yield disp, peers, killed
    finally:
        for peer in peers:
            peer.sock.close()
        disp.close()
        actx.term()
        ctx.term()


def submit(disp: Dispatcher, payloads: list[bytes]) -> list[asyncio.Future[Outcome]]:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Outcome]] = []
    for payload in payloads:
        fut: asyncio.Future[Outcome] = loop.create_future()
        futures.append(fut)
        job = disp.submit(payload, lambda s, d, f=fut: f.set_result((s, bytes(d))))
        assert job is not None
    return futures


async def serve_quickly(peer: Worker, jobs: int, kinds: list[bytes], sizes: list[int]) -> None:
    """Answer `jobs` jobs at once, as a worker with a handler of 5 us."""
    while jobs > 0:
        kind, batch = await peer.receive()
        kinds.append(kind)
        sizes.append(len(batch))
        for jid, payload in batch:
            await peer.answer(jid, payload)
        jobs -= len(batch)


@pytest.mark.timeout(20)
def test_quick_jobs_queued_behind_busy_workers_go_in_batches(tmp_path: Path) -> None:
    async def main() -> None:
        async with dispatcher(tmp_path) as (disp, peers, _):
            payloads = [b"job %d" % i for i in range(600)]
            futures = submit(disp, payloads)
            kinds: list[bytes] = []
            sizes: list[int] = []
            counts = [0, 0]

            async def worker(i: int) -> None:
                while not all(f.done() for f in futures):
                    kind, batch = await peers[i].receive()
                    kinds.append(kind)
                    sizes.append(len(batch))
                    counts[i] += len(batch)
                    for jid, payload in batch:
                        await peers[i].answer(jid, payload)

            tasks = [asyncio.ensure_future(worker(i)) for i in range(2)]
            results = await asyncio.wait_for(asyncio.gather(*futures), 10)
            for task in tasks:
                task.cancel()
            # Each request got its own reply.
            assert results == [(Status.OK, p.upper()) for p in payloads]
            # The first jobs go one at a time (the handler's speed is not known
            # yet); once replies say it is quick, the queue goes out in batches,
            # never more than BATCH_MAX, and each leaves a job for the other worker.
            assert kinds[:10] == [wp.JOB] * 10
            assert wp.BATCH in kinds and disp.batches == kinds.count(wp.BATCH)
            assert max(sizes) == BATCH_MAX
            assert sum(sizes) == 600 and min(counts) > 100

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_a_long_run_stops_batching_and_slow_handlers_never_batch(tmp_path: Path) -> None:
    async def main() -> None:
        async with dispatcher(tmp_path, workers=1) as (disp, (peer,), _):
            futures = submit(disp, [b"x"] * 100)
            kinds: list[bytes] = []
            await serve_quickly(peer, 100, kinds, [])
            assert kinds[-1] == wp.BATCH
            await asyncio.gather(*futures)
            # One run longer than the budget: what follows goes one job at a time.
            futures = submit(disp, [b"y"] * 50)
            kind, ((jid, _),) = await peer.receive()
            await peer.answer(jid, b"y", micros=int(BATCH_BUDGET * 1e6 * 50))
            kinds = []
            await serve_quickly(peer, 49, kinds, [])
            assert kinds == [wp.JOB] * 49
            results = await asyncio.wait_for(asyncio.gather(*futures), 5)
            assert results == [(Status.OK, b"Y")] * 50

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_large_payloads_are_never_batched(tmp_path: Path) -> None:
    async def main() -> None:
        async with dispatcher(tmp_path, workers=1) as (disp, (peer,), _):
            await asyncio.gather(*submit(disp, [b"x"] * 60), serve_quickly(peer, 60, [], []))
            big = b"b" * wp.SPLIT_BODY
            kinds: list[bytes] = []
            sizes: list[int] = []
            futures = submit(disp, [big, big, b"s", b"s", big, b"s"])
            await serve_quickly(peer, 6, kinds, sizes)
            # The big ones go alone; the two small ones between them together.
            assert sizes == [1, 1, 2, 1, 1] or sizes == [1, 1, 2, 2]
            results = await asyncio.wait_for(asyncio.gather(*futures), 5)
            assert [r for _, r in results] == [big.upper()] * 2 + [b"S"] * 2 + [big.upper(), b"S"]

    asyncio.run(main())


async def warm_batch(
    disp: Dispatcher, peer: Worker, jobs: int, expect: int
) -> tuple[list[asyncio.Future[Outcome]], list[tuple[bytes, bytes]]]:
    """Make the handler look quick, queue `jobs` jobs, receive the first and a batch."""
    await asyncio.gather(*submit(disp, [b"w"] * 300), serve_quickly(peer, 300, [], []))
    futures = submit(disp, [b"j%d" % i for i in range(jobs)])
    kind, batch = await peer.receive()  # the first goes alone: the worker was idle
    assert kind == wp.JOB
    await peer.answer(batch[0][0], batch[0][1])
    kind, batch = await peer.receive()
    assert kind == wp.BATCH and len(batch) == expect
    return futures, batch


@pytest.mark.timeout(20)
def test_a_worker_death_fails_its_whole_batch_and_nothing_else(tmp_path: Path) -> None:
    async def main() -> None:
        async with dispatcher(tmp_path, workers=1) as (disp, (peer,), _):
            futures, batch = await warm_batch(disp, peer, 6, expect=5)
            await peer.answer(*batch[0])
            await asyncio.wait_for(futures[1], 5)
            link = disp.links[0]
            assert isinstance(link, ZmqLink)
            link.worker_exited(peer.pid, -9)
            results = await asyncio.wait_for(asyncio.gather(*futures), 5)
            assert results[:2] == [(Status.OK, b"J0"), (Status.OK, b"J1")]
            assert [s for s, _ in results[2:]] == [Status.WORKER_LOST] * 4
            assert disp.outstanding == 0

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_a_timeout_in_a_batch_requeues_the_jobs_behind_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with dispatcher(tmp_path, workers=2, timeout=0.3) as (disp, peers, killed):
            # Keep the first worker busy with one job while the second gets a batch.
            (busy,) = submit(disp, [b"hold"])
            kind, ((held, _),) = await peers[0].receive()
            futures, batch = await warm_batch(disp, peers[1], 9, expect=7)
            # The batch's first job hangs: past the timeout it fails, its worker
            # is killed, and the six it held go back to the queue, for the other;
            # one was left there for the other worker (when it becomes free).
            await peers[0].answer(held, b"hold")
            await serve_quickly(peers[0], 7, [], [])
            results = await asyncio.wait_for(asyncio.gather(*futures), 5)
            assert killed == [peers[1].pid]
            assert results[0] == (Status.OK, b"J0") and results[1][0] is Status.TIMEOUT
            assert results[2:] == [(Status.OK, b"J%d" % i) for i in range(2, 9)]
            assert busy.result() == (Status.OK, b"HOLD") and disp.outstanding == 0

    asyncio.run(main())


async def burst(address: tuple[str, int], payloads: list[bytes]) -> list[bytes | BaseException]:
    async with AsyncClient(address, timeout=30) as client:
        return await asyncio.gather(*(client.request(p) for p in payloads), return_exceptions=True)


@pytest.mark.timeout(60)
def test_a_burst_of_tiny_requests_is_batched_end_to_end(serve) -> None:
    producer = serve(handlers.behave, processes=2)
    payloads = [b"echo:%d" % i for i in range(3000)]
    assert asyncio.run(burst(producer.address, payloads)) == [b"%d" % i for i in range(3000)]
    assert producer.stats()["batches"] > 0


@pytest.mark.timeout(60)
def test_requests_of_a_few_milliseconds_are_not_batched(serve) -> None:
    producer = serve(handlers.behave, processes=2)
    replies = asyncio.run(burst(producer.address, [b"sleep:0.003"] * 200))
    assert replies == [b"slept:0.003"] * 200
    assert producer.stats()["batches"] == 0


@pytest.mark.timeout(60)
def test_a_worker_dying_in_a_burst_fails_a_bounded_few_and_the_rest_answer(serve) -> None:
    producer = serve(handlers.behave, processes=2)
    payloads = [b"echo:%d" % i for i in range(3000)]
    payloads[2000] = b"exit"
    results = asyncio.run(burst(producer.address, payloads))
    lost = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert 2000 in lost and len(lost) <= BATCH_MAX
    assert all(isinstance(results[i], gaspar.WorkerLost) for i in lost)
    assert all(results[i] == b"%d" % i for i in range(3000) if i not in lost)
    assert producer.stats()["batches"] > 0

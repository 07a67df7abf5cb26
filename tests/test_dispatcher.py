"""The dispatcher's own failure paths, driven over real ZeroMQ with the test as the workers."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import zmq.asyncio

from gaspar import workerproto as wp
from gaspar.dispatcher import Dispatcher, WorkerSlot
from gaspar.protocol import Status
from tests.test_batches import Worker, dispatcher, submit


@pytest.mark.timeout(20)
def test_only_what_breaks_workerproto_is_malformed(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="gaspar.dispatcher")

    async def main() -> None:
        async with dispatcher(tmp_path, workers=1) as (disp, (peer,), _):
            await peer.sock.send(b"Z" + bytes(12))  # an unknown kind
            await peer.sock.send(wp.READY + bytes(12) + b"{not json")
            await peer.sock.send(wp.READY + bytes(12) + b'{"pid": "1"}')
            await peer.sock.send(b"short")
            await peer.sock.send_multipart([wp.DONE + bytes(12) + b"inline", b"and a frame"])
            # The same worker still serves: its messages are read in order, so
            # by the time this job is answered, the five above were handled.
            (future,) = submit(disp, [b"job"])
            _, [(jid, payload)] = await peer.receive()
            await peer.answer(jid, payload)
            assert await asyncio.wait_for(future, 5) == (Status.OK, b"JOB")

    asyncio.run(main())
    dropped = [r for r in caplog.records if "malformed message from a worker" in r.getMessage()]
    assert len(dropped) == 5
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in dropped)
    assert not any("bug" in r.getMessage() for r in caplog.records)


class Faulty(Dispatcher):
    """A dispatcher with one bug injected into its own handling of a reply."""

    armed = False

    def _became_idle(self, slot: WorkerSlot) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("injected dispatcher bug")
        super()._became_idle(slot)


@pytest.mark.timeout(20)
def test_a_dispatcher_bug_is_logged_as_one_and_the_job_still_ends(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="gaspar.dispatcher")

    async def main() -> None:
        async with dispatcher(tmp_path, workers=1, cls=Faulty) as (disp, (peer,), _):
            assert isinstance(disp, Faulty)
            (future,) = submit(disp, [b"job"])
            _, [(jid, payload)] = await peer.receive()
            disp.armed = True  # the bug strikes as this reply is handled
            await peer.answer(jid, payload)
            assert await asyncio.wait_for(future, 5) == (Status.OK, b"JOB")
            assert disp.stats()["in_flight"] == 0 and disp.outstanding == 0

    asyncio.run(main())
    (bug,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "dispatcher bug" in bug.getMessage() and bug.exc_info is not None
    assert "injected dispatcher bug" in str(bug.exc_info[1])
    assert not any("malformed" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(20)
def test_a_worker_unreachable_at_send_gets_its_job_requeued(tmp_path: Path, caplog) -> None:
    """A worker gone before the supervisor says so: the send fails, the job goes to another."""
    caplog.set_level(logging.WARNING, logger="gaspar.dispatcher")

    async def main() -> None:
        async with dispatcher(tmp_path, workers=1) as (disp, (gone,), _):
            gone.sock.close(linger=0)  # its process died; no "exited" has come yet
            actx = zmq.asyncio.Context()
            other = Worker(actx, f"ipc://{tmp_path}/d", 2000)
            try:
                await other.ready()
                assert await disp.wait_for(lambda: disp.ready_workers == 2, 5)
                # `gone` is first in line among the idle workers.
                (future,) = submit(disp, [b"job"])
                _, [(jid, payload)] = await other.receive()
                await other.answer(jid, payload)
                assert await asyncio.wait_for(future, 5) == (Status.OK, b"JOB")
                assert disp.worker_pids() == [2000] and disp.stats()["workers"] == 1
            finally:
                other.sock.close()
                actx.term()

    asyncio.run(main())
    assert any(
        "worker 1000 unreachable" in r.getMessage() and "requeueing" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.timeout(20)
def test_a_worker_that_says_goodbye_gets_nothing_more_and_its_job_still_ends(
    tmp_path: Path,
) -> None:
    """GOODBYE before the last reply: that reply is taken, and the next job waits for another."""

    async def main() -> None:
        async with dispatcher(tmp_path, workers=2) as (disp, (first, second), _):
            (running,) = submit(disp, [b"held"])
            _, [(jid, payload)] = await first.receive()
            await first.sock.send(wp.GOODBYE + wp.job_id(0) + bytes(4))
            await first.answer(jid, payload)
            assert await asyncio.wait_for(running, 5) == (Status.OK, b"HELD")
            assert await disp.wait_for(lambda: disp.ready_workers == 1, 5)
            # Two jobs: the leaving worker is not idle, so both go to the second
            # worker (one now, one when it is free), never to the first.
            futures = submit(disp, [b"a", b"b"])
            for _ in futures:
                _, [(jid, payload)] = await second.receive()
                await second.answer(jid, payload)
            assert [await asyncio.wait_for(f, 5) for f in futures] == [
                (Status.OK, b"A"),
                (Status.OK, b"B"),
            ]
            assert not await first.sock.poll(200)
            # An idle worker's GOODBYE takes it out of the pool at once.
            await second.sock.send(wp.GOODBYE + wp.job_id(0) + bytes(4))
            assert await disp.wait_for(lambda: disp.ready_workers == 0, 5)
            assert disp.stats()["workers"] == 0

    asyncio.run(main())

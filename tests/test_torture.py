"""The adversarial suite (issue 12, item 7): chaos, soak, slow clients, reload under load.

Sizes come from tests/torture.py (``GASPAR_TORTURE=full`` for `make torture`); the
figures each check prints go to docs/reliability.md.  The fuzzers are tests/test_fuzz.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

import gaspar
from gaspar import aio
from tests import handlers
from tests.conftest import alive, child_pids, wait_until
from tests.torture import SIZES, printer

pytestmark = [pytest.mark.torture, pytest.mark.timeout(SIZES.timeout)]


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[..., None]:
    return printer(capsys)


Serve = Callable[..., gaspar.Producer]
Report = Callable[..., None]

# What a request killed with its worker may end with: v2 says why, v1 only resets.
CLEAR_FAILURES = {"WorkerLost", "RequestFailed", "ConnectionFailed"}
CALL_TIMEOUT = 30.0  # every client call is bounded by this; reaching it counts as hung


# -- chaos -------------------------------------------------------------------------------


class Killer(threading.Thread):
    """SIGKILL a random worker every `every` seconds until stopped."""

    def __init__(self, pids: Callable[[], list[int]], every: float, seed: int) -> None:
        super().__init__(name="killer", daemon=True)
        self.pids, self.every, self.rng = pids, every, random.Random(seed)
        self.stopped = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            pids = self.pids()
            if pids:
                try:
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass


async def chaos_load(address: tuple[str, int], total: int, clients: int, seed: int) -> Counter[str]:
    """`total` unique requests, half v1 and half v2, from `clients` at once; how each ended."""
    outcomes: Counter[str] = Counter()
    serials = iter(range(total))
    rng = random.Random(seed)

    async def one(send: Callable[[bytes], object], serial: int) -> None:
        payload = b"%d:" % serial + rng.randbytes(rng.randrange(0, 512))
        try:
            reply = await asyncio.wait_for(send(payload), CALL_TIMEOUT + 5)  # type: ignore[arg-type]
        except (asyncio.TimeoutError, gaspar.RequestTimeout):
            outcomes["hung"] += 1
        except gaspar.RequestFailed as exc:
            outcomes[type(exc).__name__] += 1
        else:
            outcomes["ok" if reply == payload else "crossed"] += 1

    async def v1_client() -> None:
        for serial in serials:
            await one(lambda p: aio.request(address, p, timeout=CALL_TIMEOUT), serial)

    async def v2_client(client: aio.AsyncClient) -> None:
        for serial in serials:
            await one(client.request, serial)

    async with aio.AsyncClient(address, connections=4, timeout=CALL_TIMEOUT) as client:
        tasks = [v1_client() for _ in range(clients // 2)]
        tasks += [v2_client(client) for _ in range(clients - clients // 2)]
        await asyncio.gather(*tasks)
    return outcomes


def test_chaos_sigkill_a_random_worker_every_100ms(serve: Serve, report: Report) -> None:
    """Every request ends with its own reply or a clear failure; none hangs, none crosses."""
    workers = 4
    producer = serve(handlers.echo, processes=workers)
    assert producer.address is not None
    killer = Killer(producer.worker_pids, SIZES.kill_every, seed=12)
    started = time.monotonic()
    killer.start()
    try:
        outcomes = asyncio.run(
            chaos_load(producer.address, SIZES.chaos_requests, SIZES.clients, seed=7)
        )
    finally:
        killer.stopped.set()
        killer.join(10)
    seconds = time.monotonic() - started
    stats = producer.stats()
    report(
        "chaos",
        requests=sum(outcomes.values()),
        clients=SIZES.clients,
        kills=killer.kills,
        seconds=seconds,
        **dict(sorted(outcomes.items())),
        worker_lost=stats["requests"]["worker_lost"],
    )
    assert sum(outcomes.values()) == SIZES.chaos_requests
    assert outcomes["crossed"] == 0 and outcomes["hung"] == 0, outcomes
    assert set(outcomes) <= CLEAR_FAILURES | {"ok", "crossed", "hung"}, outcomes
    assert outcomes["ok"] > SIZES.chaos_requests // 2, outcomes
    assert killer.kills >= 3 and stats["requests"]["worker_lost"] >= 1, (killer.kills, stats)
    # The pool returns to its target: four live workers, the supervisor's only children.
    supervisor = producer.supervisor_pid
    assert supervisor is not None

    def settled() -> bool:
        pids = producer.worker_pids()
        return len(pids) == workers and set(pids) == child_pids(supervisor)

    assert wait_until(settled, timeout=20), (producer.worker_pids(), child_pids(supervisor))
    assert all(alive(pid) for pid in producer.worker_pids())
    assert wait_until(lambda: producer.stats()["queued"] + producer.stats()["in_flight"] == 0)
    assert gaspar.client.request(producer.address, b"after", timeout=10) == b"after"

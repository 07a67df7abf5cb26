"""benchmarks/remote.py and hosts.py: their section of docs/benchmarks.md survives the suite,
and the simulated hosts are real worker slots of a producer (so their figures are about that)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import gaspar
from benchmarks import remote, suite
from benchmarks.handlers import echo
from gaspar.client import Client
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]


def test_a_part_replaces_its_own_and_the_suite_keeps_the_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nthe suite's report\n")
    monkeypatch.setattr(remote, "DOCS", page)
    intro = ["## Remote workers", ""]
    remote.write_section({"### A": ["### A", "", "a 1", ""], "### B": ["### B", "", "b 1"]}, intro)
    remote.write_section({"### A": ["### A", "", "a 2", ""]}, intro)
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nthe suite's report\n")
    assert "a 2" in text and "a 1" not in text and "b 1" in text
    assert text.index("### A") < text.index("### B")
    kept = suite.kept_section(page)
    assert kept[:2] == ["", suite.KEPT_BEGIN] and kept[-1] == suite.KEPT_END
    assert "a 2" in kept and "b 1" in kept
    # What the suite writes, then remote.py again: still one section, the suite's text before it.
    page.write_text("# Benchmarks\n\nanother report\n" + "\n".join(kept) + "\n")
    remote.write_section({"### B": ["### B", "", "b 2"]}, intro)
    text = page.read_text()
    assert text.count(suite.KEPT_BEGIN) == 1 and "another report" in text
    assert "a 2" in text and "b 2" in text and "b 1" not in text


def test_simulated_hosts_are_slots_of_the_pool(
    serve: Callable[..., gaspar.Producer], tmp_path: Path
) -> None:
    keys = remote.Keys.make(tmp_path)
    endpoint = f"tcp://127.0.0.1:{remote.free_port()}"
    producer = serve(
        echo,
        processes=0,
        worker_bind=endpoint,
        key=str(keys.producer_secret),
        allow=str(keys.allow),
    )
    argv = [sys.executable, str(ROOT / "benchmarks" / "hosts.py"), endpoint, "--hosts", "20"]
    argv += ["--key", str(keys.host_secret), "--server-key", str(keys.producer_public), "--echo"]
    sim = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        assert sim.stdout.readline() == "joined 20\n"
        assert wait_until(lambda: producer.stats()["workers"] == 20, 10), producer.stats()
        assert producer.address is not None
        with Client(producer.address, timeout=10) as client:
            assert [client.request(b"%d" % n) for n in range(50)] == [b"%d" % n for n in range(50)]
    finally:
        sim.terminate()
        sim.wait(10)

"""`gaspar keygen DIR --name NAME`: a CURVE key pair in zmq.auth's certificate format."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.auth

from gaspar.keys import create_keypair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def keygen(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess[bytes]:
    """Run the command in a subprocess with the given umask."""

    def set_umask() -> None:
        os.umask(umask)

    return subprocess.run(
        [sys.executable, "-m", "gaspar", "keygen", *args],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        preexec_fn=set_umask,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_writes_a_pair_that_zmq_auth_loads(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    result = keygen(str(keys), "--name", "producer", umask=0)  # the loosest umask there is
    assert result.returncode == 0, result.stderr
    public, secret = keys / "producer.key", keys / "producer.key_secret"
    assert sorted(p.name for p in keys.iterdir()) == ["producer.key", "producer.key_secret"]
    assert mode(secret) == 0o600
    assert mode(public) == 0o644
    assert mode(keys) == 0o700  # a directory the command made
    assert str(public).encode() in result.stdout and str(secret).encode() in result.stdout

    public_key, no_secret = zmq.auth.load_certificate(public)
    same_public_key, secret_key = zmq.auth.load_certificate(secret)
    assert no_secret is None and secret_key is not None
    assert public_key == same_public_key and len(public_key) == 40  # Z85 of 32 bytes
    assert zmq.curve_public(secret_key) == public_key  # the two halves of one pair
    assert b"secret-key" not in public.read_bytes()
    # The public file is what a directory of accepted keys (zmq.auth's *.key glob) holds.
    assert zmq.auth.load_certificates(keys) == {public_key: True}


def test_secret_is_0600_even_where_zmq_auth_alone_would_not_be(tmp_path: Path) -> None:
    """Under umask 0 create_certificates alone leaves the secret readable by all; ours is not."""
    saved = os.umask(0)
    try:
        _, plain_secret = zmq.auth.create_certificates(tmp_path, "plain")
        public, secret = create_keypair(tmp_path / "ours", "ours")
    finally:
        os.umask(saved)
    assert mode(Path(plain_secret)) & 0o077  # why create_keypair sets the mode itself
    assert mode(secret) == 0o600 and mode(public) == 0o644


def test_existing_pair_is_refused_unless_forced(tmp_path: Path) -> None:
    assert keygen(str(tmp_path), "--name", "w1").returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    result = keygen(str(tmp_path), "--name", "w1")
    assert result.returncode == 2
    assert result.stderr.count(b"\n") == 1 and b"--force" in result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched

    result = keygen(str(tmp_path), "--name", "w1", "--force")
    assert result.returncode == 0, result.stderr
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(after) == sorted(before)  # no staging directory left behind
    new_public, _ = zmq.auth.load_certificate(tmp_path / "w1.key")
    assert after["w1.key"] != before["w1.key"]
    assert zmq.auth.load_certificate(tmp_path / "w1.key_secret")[0] == new_public
    assert mode(tmp_path / "w1.key_secret") == 0o600


@pytest.mark.parametrize("present", ["half.key", "half.key_secret"])
def test_half_a_pair_is_refused_too(tmp_path: Path, present: str) -> None:
    (tmp_path / present).write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        create_keypair(tmp_path, "half")
    assert [p.name for p in tmp_path.iterdir()] == [present]
    assert (tmp_path / present).read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "args",
    [
        ["DIR"],  # no --name
        ["DIR", "--name", ""],
        ["DIR", "--name", "a/b"],
        ["DIR", "--name", ".hidden"],  # zmq.auth's *.key glob would not see it
        ["FILE", "--name", "x"],  # not a directory
        [],
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    target = tmp_path / "dir"
    argv = [str(target) if a == "DIR" else str(a_file) if a == "FILE" else a for a in args]
    result = keygen(*argv)
    assert result.returncode == 2
    assert result.stderr.count(b"\n") == 1, result.stderr
    assert result.stderr.startswith(b"gaspar")
    assert not target.exists()

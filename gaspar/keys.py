"""CURVE key pairs on disk, in ``zmq.auth``'s certificate format (what ``gaspar keygen`` writes).

A pair named NAME is two files: ``NAME.key``, the public certificate (safe to copy to the peers
that must accept it), and ``NAME.key_secret``, the secret certificate (the public key and the
secret key; mode 0600). ``zmq.auth.load_certificate`` reads either, and
``zmq.auth.load_certificates`` reads a directory of ``*.key`` files as a set of accepted keys.

The files are written in a private temporary directory inside the target (mode 0700, so the
secret is never readable by others, whatever the umask), set to their modes there, then linked
into place: a pair already present is never overwritten unless asked, and a failure leaves no
half-written file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import zmq.auth

__all__ = ["PUBLIC_SUFFIX", "SECRET_SUFFIX", "create_keypair", "keypair_paths"]

# zmq.auth's names for the two files (create_certificates writes them, load_certificates globs
# the first).
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
PUBLIC_MODE = 0o644
SECRET_MODE = 0o600
# A directory the command creates for keys: the owner's only.
DIRECTORY_MODE = 0o700


def keypair_paths(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """The public and secret certificate files of the pair ``name`` in ``directory``.

    Raises ValueError for a name that is not a plain file name.
    """
    # A leading dot would hide NAME.key from zmq.auth.load_certificates' "*.key".
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise ValueError(
            f"a key name must be a plain file name not starting with '.', got {name!r}"
        )
    base = Path(directory)
    return base / (name + PUBLIC_SUFFIX), base / (name + SECRET_SUFFIX)


def create_keypair(
    directory: str | os.PathLike[str], name: str, *, force: bool = False
) -> tuple[Path, Path]:
    """Write a new CURVE key pair as ``directory/name.key`` and ``directory/name.key_secret``.

    Returns (public file, secret file). The secret file has mode 0600 and the public one 0644.
    ``directory`` is created (mode 0700) when missing. Raises ValueError for a bad name or a
    ``directory`` that is not one, FileExistsError when either file exists and ``force`` is
    false, OSError for what the file system refuses.
    """
    public, secret = keypair_paths(directory, name)
    base = Path(directory)
    if base.exists() and not base.is_dir():
        raise ValueError(f"{base} is not a directory")
    base.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    if not force:
        _refuse_existing(public, secret)
    staging = Path(tempfile.mkdtemp(prefix=".keygen-", dir=base))  # mode 0700
    try:
        made_public, made_secret = map(Path, zmq.auth.create_certificates(staging, name))
        made_secret.chmod(SECRET_MODE)
        made_public.chmod(PUBLIC_MODE)
        if force:
            os.replace(made_secret, secret)
            os.replace(made_public, public)
        else:
            _link_pair((made_public, public), (made_secret, secret))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return public, secret


def _refuse_existing(*paths: Path) -> None:
    present = [str(p) for p in paths if os.path.lexists(p)]
    if present:
        verb = "exists" if len(present) == 1 else "exist"
        raise FileExistsError(f"{' and '.join(present)} {verb} already (--force replaces the pair)")


def _link_pair(*moves: tuple[Path, Path]) -> None:
    """Link each staged file to its place, never replacing a file; all or none stay."""
    done: list[Path] = []
    try:
        for source, target in moves:
            try:
                os.link(source, target)
            except FileExistsError:
                _refuse_existing(target)
                raise  # pragma: no cover  (_refuse_existing raised)
            done.append(target)
    except BaseException:
        for target in done:
            target.unlink(missing_ok=True)
        raise

"""CURVE on the worker wire: who may bind or join without keys, and the keys on each socket.

Every tcp:// worker endpoint uses CURVE (ZeroMQ's own encryption and
authentication): the producer holds a secret certificate and a directory of
the public certificates of the worker hosts it accepts; a worker host holds
its own secret certificate and the producer's public one, so it never
completes a handshake with a producer whose key differs.  Keys are
``zmq.auth`` certificates, as ``gaspar keygen`` writes them (gaspar/keys.py).

The one exception is an explicit "insecure workers" switch, accepted only on a
loopback endpoint (a warning is logged).  ipc:// and inproc:// endpoints never
leave the machine and may go without keys.

The producer's side checks each connecting worker's key through ZAP, with
pyzmq's asyncio authenticator (no thread), and logs one line per refused
attempt; a socket monitor logs handshakes that fail before ZAP is asked (a
peer with no key, or one that expects another server key).  Only this module
and gaspar/link_zmq.py and gaspar/remote.py import ZeroMQ.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, NamedTuple

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from .address import is_loopback_host

__all__ = [
    "INSECURE_WARNING",
    "ClientKeys",
    "ServerKeys",
    "WorkerAuthenticator",
    "check_endpoint",
    "is_loopback_endpoint",
    "load_client_keys",
    "load_server_keys",
]

log = logging.getLogger("gaspar.security")

# Monitor events that mean a peer's handshake failed (the three families libzmq reports).
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


# Logged (with the endpoint) by a producer or a worker host that runs without CURVE.
INSECURE_WARNING = (
    "worker endpoint %s without CURVE (insecure workers): its traffic is neither"
    " authenticated nor encrypted; any local process may join"
)


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for tcp://127.x.y.z:PORT, tcp://[::1]:PORT and tcp://localhost:PORT."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rpartition(":")[0]
    return bool(host) and is_loopback_host(host)


def check_endpoint(
    endpoint: str,
    keys: tuple[str | None, str | None],
    insecure: bool,
    names: tuple[str, str, str, str],
) -> bool:
    """Whether `endpoint` may be used as asked: True for CURVE, False for none.

    `keys` are the two key options given (either may be None), `names` the
    words for the endpoint option, the two key options and the insecure
    switch, as the caller's user knows them (flags or keywords).  Raises
    ValueError with one line when refused.  Whoever then uses plain TCP logs
    INSECURE_WARNING.
    """
    where, first, second, switch = names
    given = [k is not None for k in keys]
    if any(given) and not all(given):
        raise ValueError(f"{first} and {second} go together: give both or neither")
    tcp = endpoint.startswith("tcp://")
    if insecure:
        if all(given):
            raise ValueError(f"{switch} excludes {first} and {second}: choose one")
        if not tcp or not is_loopback_endpoint(endpoint):
            raise ValueError(
                f"{switch} is accepted only for a loopback tcp:// endpoint"
                f" (127.0.0.1, [::1], localhost), not {endpoint}"
            )
        return False
    if tcp and not all(given):
        raise ValueError(
            f"{where} {endpoint} needs {first} and {second} (CURVE): every tcp:// worker"
            f" endpoint is authenticated and encrypted ({switch} only on loopback)"
        )
    return all(given)


class ServerKeys(NamedTuple):
    """The producer's CURVE keys: its own pair, and where the accepted public keys are."""

    public: bytes
    secret: bytes
    allow: str


class ClientKeys(NamedTuple):
    """A worker host's CURVE keys: its own pair and the producer's public key."""

    public: bytes
    secret: bytes
    server: bytes


def _secret_pair(path: str, what: str) -> tuple[bytes, bytes]:
    public, secret = _load(path, what)
    if not secret:
        raise ValueError(f"{what} {path} holds no secret key (give the .key_secret file)")
    return public, secret


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc
    if not public:
        raise ValueError(f"{what} {path} is not a zmq.auth certificate")
    return public, secret


def load_server_keys(key: str, allow: str) -> ServerKeys:
    """Read the producer's secret certificate and check the allow directory; ValueError."""
    public, secret = _secret_pair(key, "key")
    if not os.path.isdir(allow):
        raise ValueError(f"allow {allow} is not a directory of public certificates")
    if not zmq.auth.load_certificates(allow):
        log.warning("allow %s holds no public certificate (*.key): no worker host can join", allow)
    return ServerKeys(public, secret, allow)


def load_client_keys(key: str, server_key: str) -> ClientKeys:
    """Read a worker host's secret certificate and the producer's public one; ValueError."""
    public, secret = _secret_pair(key, "key")
    server, _ = _load(server_key, "server key")
    return ClientKeys(public, secret, server)


def apply_client(sock: zmq.Socket[Any], keys: ClientKeys) -> None:
    """Make `sock` a CURVE client of the producer whose public key is `keys.server`."""
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.curve_serverkey = keys.server


class WorkerAuthenticator:
    """ZAP for the producer's worker socket: accept the keys in the allow directory.

    The directory is read again at each attempt, so a key added or removed
    takes effect at the next connection.  One warning line per refused
    attempt: from ZAP (an unknown key, with the peer's address) or from the
    socket's monitor (a handshake that failed before ZAP was asked).
    """

    def __init__(self, ctx: zmq.Context[Any], keys: ServerKeys) -> None:
        self.keys = keys
        self._auth = _Authenticator(ctx, keys.allow)
        self._auth.start()
        self._monitor: zmq.Socket[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.refused = 0  # attempts refused so far

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make `sock` (not yet bound) a CURVE server with the producer's keys, and watch it."""
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True
        self._auth.on_refused = self._count
        self._monitor = sock.get_monitor_socket(HANDSHAKE_FAILED)
        self._monitor_fd: int = self._monitor.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._monitor_fd, self._on_monitor)
        # The descriptor signals only after ZMQ_EVENTS was read once: read it now.
        self._loop.call_soon(self._on_monitor)

    def _count(self) -> None:
        self.refused += 1

    def _on_monitor(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        while monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator,arg-type]
            event: dict[str, Any] = dict(parse_monitor_message(monitor.recv_multipart()))
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                continue  # ZAP refused it, and said so
            self.refused += 1
            log.warning(
                "worker connection refused: CURVE handshake failed (%s): a peer with no key"
                " or expecting another producer key",
                _describe(event),
            )

    def close(self) -> None:
        """Stop the authenticator and the monitor (before the socket closes)."""
        if self._monitor is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._monitor_fd)
            self._monitor.close(linger=0)
            self._monitor = None
        self._auth.stop()


def _describe(event: dict[str, Any]) -> str:
    value = event.get("value")
    try:
        name = zmq.Event(event["event"]).name
    except ValueError:
        name = str(event["event"])
    return f"{name}, code {value}"


class _Authenticator(AsyncioAuthenticator):
    """pyzmq's asyncio ZAP handler, checking keys itself so that it can say who was refused."""

    def __init__(self, ctx: zmq.Context[Any], allow: str) -> None:
        super().__init__(ctx, log=logging.getLogger("gaspar.security.zap"))
        self.allow_dir = allow
        self._address = ""
        self.on_refused: Any = lambda: None
        self.configure_curve_callback("*", self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # The peer's address is in the request (frame 4), not given to the callback.
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's credentials provider: is `key` (Z85) among the allowed ones?"""
        try:
            allowed = zmq.auth.load_certificates(self.allow_dir)  # Z85 public keys
        except (OSError, ValueError) as exc:
            log.error("cannot read the allowed worker keys in %s: %s", self.allow_dir, exc)
            allowed = {}
        if key in allowed:
            return True
        self.on_refused()
        log.warning(
            "worker connection refused: key %s from %s is not in %s",
            key.decode("ascii", "replace"),
            self._address or "?",
            self.allow_dir,
        )
        return False

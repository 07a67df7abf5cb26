"""Network addresses as people write them: ``host:port``, ``[ipv6]:port``.

One place for both directions, so that every message, log line and command
prints an address in the form ``gaspar request`` accepts.
"""

from __future__ import annotations

__all__ = ["format_address", "parse_address"]


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """Split "host:port" or "[ipv6]:port" into (host, port)."""
    if isinstance(address, tuple):
        return address[0], int(address[1])
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port}")
    return host or "127.0.0.1", int(port)


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`: IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

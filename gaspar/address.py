"""Network addresses as people write them: ``host:port``, ``[ipv6]:port``.

One place for both directions, so that every message, log line and command
prints an address in the form ``gaspar request`` accepts.
"""

from __future__ import annotations

__all__ = ["format_address", "is_loopback_host", "parse_address"]


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


def is_loopback_host(host: str) -> bool:
    """True for an address only this machine reaches: 127.0.0.0/8, ::1 or ``localhost``.

    Names other than ``localhost`` are not resolved: they count as reachable from elsewhere,
    and so do the wildcard addresses (``0.0.0.0``, ``::``, the empty string).
    """
    import ipaddress  # only here: the clients import this module

    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback

"""systemd's two service protocols, with no dependency: readiness, and sockets it holds.

- :func:`notify` is sd_notify(3): one datagram of ``KEY=VALUE`` lines
  (``READY=1``, ``STOPPING=1``, ``STATUS=...``, ``MAINPID=...``) to the
  socket named by ``$NOTIFY_SOCKET``, a file system path or, after an ``@``,
  a name in Linux's abstract namespace.  Without the variable it does nothing.
- :func:`listen_fds` is sd_listen_fds(3), socket activation: the listening
  sockets systemd opened for this process, descriptors 3, 4, ... as
  ``$LISTEN_FDS`` counts them, when ``$LISTEN_PID`` is this process (the
  variables are inherited by children that are not meant to take them).
  The variables are removed, so that no child sees them again, and each
  descriptor is made close-on-exec, as systemd's own library does.

Both work the same under anything that speaks these protocols (systemd,
``systemd-socket-activate``, s6, a test).
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["SD_LISTEN_FDS_START", "listen_fds", "listen_fds_with_names", "notify"]

log = logging.getLogger("gaspar.systemd")

# The first descriptor that systemd passes (sd-daemon.h).
SD_LISTEN_FDS_START = 3
# The variables of socket activation; all three go once read.
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# The name of a descriptor when LISTEN_FDNAMES does not give one (sd_listen_fds_with_names).
UNKNOWN_NAME = "unknown"
# A notification blocks at most this long (systemd reads its socket at once;
# a full queue must not stall the event loop for longer).
NOTIFY_TIMEOUT = 2.0


def notify(state: str) -> bool:
    """Send `state` (newline-separated ``KEY=VALUE`` lines) to ``$NOTIFY_SOCKET``.

    True if the datagram was sent; False if the variable is unset (not run
    by systemd, or by a unit that is not ``Type=notify``), names an address
    this does not speak, or the send failed (logged as a warning).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]  # the abstract namespace: no file, a leading NUL
    elif address.startswith("/"):
        target = address
    else:  # e.g. systemd's vsock: addresses, for virtual machines
        log.warning("NOTIFY_SOCKET=%s: not a Unix socket address; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_TIMEOUT)
            sock.sendto(state.encode("utf-8"), target)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
        return False
    return True


def listen_fds_with_names() -> list[tuple[str, socket.socket]]:
    """The sockets passed to this process, each with its name (``FileDescriptorName=``).

    Empty if ``$LISTEN_PID`` is unset or names another process.  A socket
    unit's descriptors are named after the unit (``gaspar.socket``:
    ``gaspar``) unless it says otherwise; ``unknown`` if no name was passed.
    A descriptor that is not a socket (``ListenFIFO=``) is left alone.
    """
    values = {name: os.environ.pop(name, "") for name in LISTEN_VARIABLES}
    if not values["LISTEN_PID"] or not values["LISTEN_FDS"]:
        return []
    try:
        pid, count = int(values["LISTEN_PID"]), int(values["LISTEN_FDS"])
    except ValueError:
        log.warning(
            "LISTEN_PID=%s LISTEN_FDS=%s: not numbers; ignored",
            values["LISTEN_PID"],
            values["LISTEN_FDS"],
        )
        return []
    if pid != os.getpid():
        log.debug("LISTEN_FDS is for process %d, not this one: ignored", pid)
        return []
    names = values["LISTEN_FDNAMES"].split(":") if values["LISTEN_FDNAMES"] else []
    if len(names) != count:
        names = [UNKNOWN_NAME] * count
    found = []
    for fd, name in enumerate(names, SD_LISTEN_FDS_START):
        try:
            os.set_inheritable(fd, False)  # what an exec'd child must not keep
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("descriptor %d (%s) from LISTEN_FDS is not a socket: %s", fd, name, exc)
            continue
        found.append((name, sock))
    return found


def listen_fds() -> list[socket.socket]:
    """The sockets passed to this process by socket activation, in the unit's order."""
    return [sock for _, sock in listen_fds_with_names()]

"""The one event-loop factory: uvloop when installed (or asked for), asyncio's otherwise."""

from __future__ import annotations

import asyncio

__all__ = ["new_event_loop"]


def new_event_loop(use_uvloop: bool | None = None) -> asyncio.AbstractEventLoop:
    """A new loop; `use_uvloop` None means uvloop if importable, True requires it."""
    if use_uvloop is not False:
        try:
            import uvloop
        except ImportError:
            if use_uvloop:
                raise
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()

"""The consumer: the code that runs in each worker process."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Consumer", "Handler", "Reply", "as_consumer"]

Reply = bytes | bytearray | memoryview | str
Handler = Callable[[bytes], Reply]


class Consumer:
    """Handles requests inside a worker process.

    Pass ``handler=`` (any callable taking ``bytes``), or subclass and override
    :meth:`handle`.  :meth:`setup` runs once in each worker after it is forked,
    before the worker reports ready: load models or open files there, not in
    ``__init__``, so that nothing heavy or fork-unsafe is built in the producer.
    """

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler

    def setup(self) -> None:
        """Prepare this worker process; runs once, after fork, before ready."""

    def handle(self, message: bytes) -> Reply:
        """Return the reply to one request: bytes-like, or str sent as UTF-8."""
        if self.handler is None:
            raise NotImplementedError("pass handler= or override Consumer.handle()")
        return self.handler(message)


def as_consumer(target: Consumer | type[Consumer] | Handler) -> Consumer:
    """Accept a Consumer, a Consumer subclass or a plain handler callable."""
    if isinstance(target, Consumer):
        return target
    if isinstance(target, type) and issubclass(target, Consumer):
        return target()
    if callable(target):
        return Consumer(handler=target)  # type: ignore[arg-type]
    raise TypeError(f"expected a Consumer, a Consumer subclass or a callable, got {target!r}")

"""gaspar: small TCP daemons that farm CPU-heavy work out to worker processes.

import gaspar
def echo(message): return message
consumer = gaspar.Consumer(handler=echo)
producer = gaspar.Producer(consumer, 10123)
producer.start()   # blocks, serving on 127.0.0.1:10123
"""

from typing import TYPE_CHECKING, Any

from .consumer import Consumer
from .errors import (
    BadArguments,
    BadRequest,
    ConnectionFailed,
    GasparError,
    HandlerError,
    MessageTooLarge,
    Overloaded,
    RequestFailed,
    RequestTimeout,
    ShuttingDown,
    StartupError,
    UnknownTask,
    WorkerLost,
)

if TYPE_CHECKING:
    from . import aio, client
    from .aio import AsyncClient
    from .app import App
    from .client import Client
    from .producer import Producer

# Loaded on first use: a blocking client need not load asyncio or ZeroMQ, and
# the supervisor and workers, forked from the producer, carry only what they use.
_LAZY = {
    "aio": ("gaspar.aio", None),
    "client": ("gaspar.client", None),
    "AsyncClient": ("gaspar.aio", "AsyncClient"),
    "App": ("gaspar.app", "App"),
    "Client": ("gaspar.client", "Client"),
    "Producer": ("gaspar.producer", "Producer"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gaspar' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


__all__ = [
    "App",
    "AsyncClient",
    "BadArguments",
    "BadRequest",
    "Client",
    "ConnectionFailed",
    "Consumer",
    "GasparError",
    "HandlerError",
    "MessageTooLarge",
    "Overloaded",
    "Producer",
    "RequestFailed",
    "RequestTimeout",
    "ShuttingDown",
    "StartupError",
    "UnknownTask",
    "WorkerLost",
    "aio",
    "client",
]

# The one place the version is written: pyproject.toml reads it from here (setuptools attr).
__version__ = "2.0.0.dev0"

"""gaspar: small TCP daemons that farm CPU-heavy work out to worker processes.

import gaspar
def echo(message): return message
consumer = gaspar.Consumer(handler=echo)
producer = gaspar.Producer(consumer, 10123)
producer.start()   # blocks, serving on 127.0.0.1:10123
"""

from . import aio, client
from .aio import AsyncClient
from .app import App
from .client import Client
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
from .producer import Producer

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

__version__ = "2.0.0.dev0"

"""gaspar: small TCP daemons that farm CPU-heavy work out to worker processes.

import gaspar
def echo(message): return message
consumer = gaspar.Consumer(handler=echo)
producer = gaspar.Producer(consumer, 10123)
producer.start()   # blocks, serving on 127.0.0.1:10123
"""

from . import client
from .consumer import Consumer
from .errors import ConnectionFailed, GasparError, RequestFailed, RequestTimeout, StartupError
from .producer import Producer

__all__ = [
    "ConnectionFailed",
    "Consumer",
    "GasparError",
    "Producer",
    "RequestFailed",
    "RequestTimeout",
    "StartupError",
    "client",
]

__version__ = "2.0.0.dev0"

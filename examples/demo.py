"""A demo handler: `make serve` runs it on 127.0.0.1:10123.

Try it with `gaspar request 127.0.0.1:10123 hello`: the reply is the message
reversed, with the SHA-256 of it after many rounds, a small CPU-bound job.
"""

import hashlib


def handler(message: bytes) -> bytes:
    digest = message
    for _ in range(10_000):
        digest = hashlib.sha256(digest).digest()
    return message[::-1] + b" " + digest.hex().encode() + b"\n"

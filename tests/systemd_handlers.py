"""What tests/test_systemd.py serves: workers slow to be ready, and workers that show their env."""

from __future__ import annotations

import os
import time

import gaspar
from tests import handlers

# Seconds each worker's setup() takes (a model being loaded): long enough that a
# READY=1 sent before the workers are ready would be seen before their marks.
SETUP_SECONDS = 0.5


class SlowSetup(gaspar.Consumer):
    """Echoes; its setup() ends by creating a file named after its pid in $GASPAR_TEST_MARKS."""

    def setup(self) -> None:
        time.sleep(SETUP_SECONDS)  # setup: simulated work of a known length
        marks = os.environ.get("GASPAR_TEST_MARKS")
        if marks:
            with open(os.path.join(marks, str(os.getpid())), "w"):
                pass

    def handle(self, message: bytes) -> bytes:
        return message


slow_setup = SlowSetup()


def steered(message: bytes) -> bytes | str:
    """`env`: the LISTEN_ variables this worker has (none, a space each); else as behave."""
    if message == b"env":
        return " ".join(sorted(k for k in os.environ if k.startswith("LISTEN_")))
    return handlers.behave(message)

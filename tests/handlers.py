"""Handlers the tests serve, importable by `gaspar serve tests.handlers:...`."""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import os
import signal
import time

import gaspar


def echo(message: bytes) -> bytes:
    return message


def behave(message: bytes) -> bytes | str:
    """A handler steered by its message: `verb` or `verb:argument`."""
    verb, _, arg = message.partition(b":")
    if verb == b"echo":
        return arg
    if verb == b"pid":
        return str(os.getpid())
    if verb == b"sleep":
        time.sleep(float(arg))  # handler: simulated work of a known length
        return b"slept:" + arg
    if verb == b"mark":
        with open(arg, "w"):
            pass
        time.sleep(60)  # handler: a long job that tells the test it has started
        return b"marked"
    if verb == b"spin":
        while True:
            pass
    if verb == b"raise":
        raise ValueError(arg.decode())
    if verb == b"exit":
        os._exit(7)
    if verb == b"kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if verb == b"segv":
        faulthandler.disable()  # inherited from pytest; keep the crash quiet
        ctypes.string_at(0)
    if verb == b"badtype":
        return 42  # type: ignore[return-value]
    if verb == b"str":
        return arg.decode() + "\u00e9"
    if verb == b"frozen":
        return str(gc.get_freeze_count())
    if verb == b"threads":
        return str(len(os.listdir("/proc/self/task")))
    return message


class Prefixed(gaspar.Consumer):
    """A Consumer subclass whose setup() runs in the worker, after fork."""

    def setup(self) -> None:
        self.prefix = b"%d:" % os.getpid()

    def handle(self, message: bytes) -> bytes:
        return self.prefix + message


class BrokenSetup(gaspar.Consumer):
    def setup(self) -> None:
        raise RuntimeError("cannot load the model")

    def handle(self, message: bytes) -> bytes:
        return message


prefixed = Prefixed()

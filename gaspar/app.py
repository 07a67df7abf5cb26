"""Structured calls: several named functions in one daemon, over msgpack.

An :class:`App` is a :class:`~gaspar.consumer.Consumer` whose ``handle()``
decodes a call (a task name, positional and keyword arguments), runs the task
and encodes its outcome.  It is a thin codec over the raw bytes protocol, not a
second server: serve it like any consumer (``gaspar serve mymodule:app`` or
``gaspar.Producer(app, port)``).  Raw bytes handlers stay the default and the
fastest path.

The wire format and its codec, :func:`encode_call` and :func:`decode_result`
(re-exported here), are in :mod:`gaspar.callcodec`, which the clients share.

msgpack is an optional dependency (``pip install '.[msgpack]'`` from a checkout), imported
only when a call is encoded or decoded or an App is built.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from .callcodec import (
    BAD_ARGUMENTS,
    BAD_CALL,
    CALL_VERSION,
    ERROR,
    FAILED,
    OK,
    UNENCODABLE,
    UNKNOWN_TASK,
    _msgpack,
    _text,
    decode_result,
    encode_call,
)
from .client import request
from .consumer import Consumer

__all__ = ["App", "call", "decode_result", "encode_call"]

log = logging.getLogger("gaspar.app")

F = TypeVar("F", bound=Callable[..., Any])


def _failure(kind: str, type_name: str, message: str) -> bytes:
    data: bytes = _msgpack().packb(
        [FAILED, kind, _text(type_name), _text(message)], use_bin_type=True
    )
    return data


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    """fn's signature, or None when Python cannot tell it (some builtins)."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


class App(Consumer):
    """A consumer that serves several named tasks with msgpack-encoded calls.

    Register tasks with ``@app.task`` or ``@app.task(name="other")``; the
    decorator returns the function unchanged, so it stays callable locally.
    ``App(setup=fn)`` runs ``fn()`` once in each worker after fork (load
    models there, into module globals the tasks read).  A subclass that
    overrides :meth:`setup` should call ``super().setup()``.
    """

    def __init__(self, setup: Callable[[], object] | None = None) -> None:
        super().__init__()
        _msgpack()  # fail at start-up, not on the first request, if msgpack is missing
        self.setup_hook = setup
        #: Task names to functions.
        self.tasks: dict[str, Callable[..., Any]] = {}
        self._signatures: dict[str, tuple[Callable[..., Any], inspect.Signature | None]] = {}

    def setup(self) -> None:
        """Run the ``setup=`` hook, if any; runs once per worker, after fork."""
        if self.setup_hook is not None:
            self.setup_hook()

    @overload
    def task(self, fn: F, /, *, name: str | None = None) -> F: ...

    @overload
    def task(self, /, *, name: str | None = None) -> Callable[[F], F]: ...

    def task(
        self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None
    ) -> Callable[..., Any]:
        """Register `fn` under `name` (default: its ``__name__``); return it unchanged."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            if not callable(fn):
                raise TypeError(f"a task must be callable, got {fn!r}")
            task_name = fn.__name__ if name is None else name
            if not isinstance(task_name, str) or not task_name:
                raise ValueError(f"a task name must be a non-empty str, got {task_name!r}")
            if self.tasks.get(task_name, fn) is not fn:
                raise ValueError(f"a different task is already registered as {task_name!r}")
            self.tasks[task_name] = fn
            self._signatures[task_name] = (fn, _signature(fn))
            return fn

        return register if fn is None else register(fn)

    def handle(self, message: bytes) -> bytes:
        """Decode a call, run the task, and encode its result or its failure.

        Never raises for a failure of the call: the reply says what went wrong,
        and the worker carries on.
        """
        msgpack = _msgpack()
        try:
            # strict_map_key (the default): maps from clients have str or bytes
            # keys only, which keeps hash-collision floods out.
            decoded = msgpack.unpackb(message, raw=False)
        except Exception as exc:
            log.warning("bad call: cannot decode %d bytes: %s", len(message), _text(exc))
            return _failure(BAD_CALL, type(exc).__name__, f"cannot decode the call: {exc}")
        problem = _check_call(decoded)
        if problem:
            log.warning("bad call: %s", problem)
            return _failure(BAD_CALL, "", problem)
        _, name, args, kwargs = decoded
        fn = self.tasks.get(name)
        if fn is None:
            log.warning("call of unknown task %r", name)
            return _failure(UNKNOWN_TASK, "", f"no task named {name!r}{_listing(self.tasks)}")
        entry = self._signatures.get(name)
        if entry is None or entry[0] is not fn:  # someone assigned to app.tasks directly
            entry = self._signatures[name] = (fn, _signature(fn))
        signature = entry[1]
        if signature is not None:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as exc:
                log.warning("task %r: bad arguments: %s", name, _text(exc))
                return _failure(BAD_ARGUMENTS, type(exc).__name__, _text(exc))
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            log.error("task %r raised: %s", name, traceback.format_exc().rstrip())
            return _failure(ERROR, type(exc).__name__, _text(exc))
        try:
            data: bytes = msgpack.packb([OK, result], use_bin_type=True)
        except Exception as exc:
            log.error("task %r returned a result msgpack cannot encode: %s", name, _text(exc))
            return _failure(UNENCODABLE, type(exc).__name__, f"{type(result).__name__}: {exc}")
        return data


def _check_call(decoded: object) -> str:
    """What is wrong with a decoded call, or "" if it has the right shape."""
    if not isinstance(decoded, list) or len(decoded) != 4:
        return f"expected [version, name, args, kwargs], got {_text(decoded)[:200]}"
    version, name, args, kwargs = decoded
    if type(version) is not int or version != CALL_VERSION:
        return f"unsupported call version {_text(version)[:50]}; this server speaks {CALL_VERSION}"
    if not isinstance(name, str):
        return f"the task name must be a str, got {type(name).__name__}"
    if not isinstance(args, list):
        return f"args must be an array, got {type(args).__name__}"
    if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        return "kwargs must be a map with str keys"
    return ""


def _listing(tasks: Mapping[str, object], limit: int = 20) -> str:
    names = sorted(tasks)
    if not names:
        return "; the app has no tasks"
    more = f", and {len(names) - limit} more" if len(names) > limit else ""
    return "; tasks: " + ", ".join(names[:limit]) + more


def call(
    address: str | tuple[str, int],
    name: str,
    /,
    *args: Any,
    timeout: float | None = None,
    **kwargs: Any,
) -> Any:
    """Call task `name` on the App at `address` with the blocking v1 client.

    `timeout` (seconds, for the whole call) belongs to call() itself: to pass
    a keyword argument named ``timeout`` to the task, use
    ``decode_result(request(address, encode_call(name, args, {"timeout": t})))``.
    Raises TypeError for an argument msgpack cannot encode, and
    :class:`gaspar.RequestFailed` or a subclass for every failure of the call.
    """
    message = encode_call(name, args, kwargs)
    return decode_result(request(address, message, timeout=timeout), name)

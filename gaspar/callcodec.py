"""The msgpack codec of structured calls, shared by :mod:`gaspar.app` and the clients.

A module of its own so that neither the server side (:class:`gaspar.App`)
nor the clients import the other.  Wire format (msgpack, bin and str kept
apart):

- call: ``[1, name, args, kwargs]``, where 1 is the format version;
- reply: ``[0, result]`` on success, ``[1, kind, type_name, message]`` on
  failure, where kind is ``"unknown_task"``, ``"bad_arguments"``, ``"error"``
  (the task raised), ``"bad_call"`` or ``"unencodable"`` (the result).

msgpack is imported only when a call is encoded or decoded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from .errors import BadArguments, BadRequest, HandlerError, RequestFailed, UnknownTask

__all__ = ["CALL_VERSION", "decode_result", "encode_call"]

#: The version number that starts every call; a server rejects other versions.
CALL_VERSION = 1

OK = 0
FAILED = 1

UNKNOWN_TASK = "unknown_task"
BAD_ARGUMENTS = "bad_arguments"
ERROR = "error"
BAD_CALL = "bad_call"
UNENCODABLE = "unencodable"

_msgpack_module: ModuleType | None = None


def _msgpack() -> ModuleType:
    """Import msgpack on first use, so that gaspar itself does not need it."""
    global _msgpack_module
    if _msgpack_module is None:
        try:
            import msgpack  # type: ignore[import-untyped,unused-ignore]
        except ImportError as exc:
            raise ImportError(
                "gaspar.app needs msgpack: pip install '.[msgpack]' (from a gaspar checkout)",
                name="msgpack",
            ) from exc
        _msgpack_module = msgpack
    return _msgpack_module


def _text(value: object) -> str:
    """str(value), made safe to encode: never raises, never has lone surrogates."""
    try:
        text = str(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def encode_call(
    name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> bytes:
    """Encode a call of task `name` as request bytes for an App.

    Raises TypeError when an argument cannot be encoded by msgpack (an object
    of another type, an int beyond 64 bits), so that a bad argument fails
    before anything is sent.  Tuples arrive as lists.
    """
    if not isinstance(name, str):
        raise TypeError(f"the task name must be a str, got {type(name).__name__}")
    if isinstance(args, str | bytes | bytearray | memoryview):
        raise TypeError("args must be a sequence of arguments: write (value,), not value")
    if kwargs is None:
        kwargs = {}
    for key in kwargs:
        if not isinstance(key, str):
            raise TypeError(f"keyword argument names must be str, got {key!r}")
    try:
        data: bytes = _msgpack().packb(
            [CALL_VERSION, name, list(args), dict(kwargs)], use_bin_type=True
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"cannot encode the arguments of {name!r}: {exc}") from exc
    return data


def decode_result(data: bytes | bytearray | memoryview, name: str | None = None) -> Any:
    """Return the result in an App's reply, or raise the failure it reports.

    `name`, the task called, only makes error messages clearer.  Raises
    UnknownTask, BadArguments, HandlerError (the task raised; see its
    ``remote_type`` and ``remote_message``), or BadRequest (a malformed call,
    an unencodable result, or a reply that is not an App's).
    """
    unpackb = _msgpack().unpackb
    try:
        # Results come from the server the caller chose, so int map keys are fine.
        reply = unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise BadRequest(f"cannot decode the reply as an App's: {exc}") from exc
    if isinstance(reply, list) and len(reply) == 2 and type(reply[0]) is int and reply[0] == OK:
        return reply[1]
    if not (
        isinstance(reply, list)
        and len(reply) >= 4
        and type(reply[0]) is int
        and reply[0] == FAILED
        and all(isinstance(field, str) for field in reply[1:4])
    ):
        raise BadRequest(f"the reply is not an App's: {_text(reply)[:200]}")
    kind, type_name, message = reply[1:4]
    task = "task" if name is None else f"task {name!r}"
    if kind == ERROR:
        detail = f"{type_name}: {message}" if message else type_name
        raise HandlerError(f"{task} raised {detail}", type_name, message)
    if kind == UNKNOWN_TASK:
        raise UnknownTask(message)
    if kind == BAD_ARGUMENTS:
        raise BadArguments(f"bad arguments for {task}: {message}")
    if kind == BAD_CALL:
        raise BadRequest(f"the server rejected the call: {message}")
    if kind == UNENCODABLE:
        raise BadRequest(f"{task} returned a result msgpack cannot encode: {message}")
    raise RequestFailed(f"{task} failed ({kind}): {message}")

"""The sans-I/O v1 framing, on its own: no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gaspar.client import pack as client_pack
from gaspar.protocol import (
    LimitExceeded,
    ProtocolError,
    ReplyReader,
    RequestReader,
    pack,
    to_bytes,
)


def feed_chunks(reader: RequestReader, data: bytes, cuts: list[int]) -> list[bytes]:
    """Feed `data` split at `cuts`; return every payload the reader produced."""
    out = []
    points = sorted({c for c in cuts if 0 < c < len(data)})
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        result = reader.feed(data[start:end])
        if result is not None:
            out.append(result)
    return out


def test_pack_is_the_original_format() -> None:
    assert pack(b"hello") == struct.pack("!I", 5) + b"hello"
    assert pack(b"") == b"\x00\x00\x00\x00"
    assert pack("é") == b"\x00\x00\x00\x02\xc3\xa9"
    assert client_pack is pack


def test_to_bytes_accepts_bytes_like_and_str() -> None:
    assert to_bytes(bytearray(b"ab")) == b"ab"
    assert to_bytes(memoryview(b"ab")) == b"ab"
    with pytest.raises(TypeError):
        to_bytes(42)  # type: ignore[arg-type]


def test_whole_request_in_one_chunk() -> None:
    reader = RequestReader()
    assert reader.feed(pack(b"abc")) == b"abc"
    assert reader.done


def test_empty_payload_is_a_request() -> None:
    assert RequestReader().feed(pack(b"")) == b""


def test_byte_at_a_time() -> None:
    reader = RequestReader()
    data = pack(b"xyz" * 10)
    results = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[:-1] == [None] * (len(data) - 1)
    assert results[-1] == b"xyz" * 10


def test_declared_length_over_limit_is_refused_from_the_header_alone() -> None:
    reader = RequestReader(max_message_size=100)
    with pytest.raises(LimitExceeded) as info:
        reader.feed(struct.pack("!I", 101))
    assert info.value.size == 101 and info.value.limit == 100
    # A split header is refused as soon as its fourth byte arrives.
    reader = RequestReader(max_message_size=100)
    assert reader.feed(b"\xff\xff") is None
    with pytest.raises(LimitExceeded):
        reader.feed(b"\xff\xff")


def test_length_at_limit_is_accepted() -> None:
    assert RequestReader(max_message_size=3).feed(pack(b"abc")) == b"abc"


def test_bytes_after_the_request_are_an_error() -> None:
    with pytest.raises(ProtocolError):
        RequestReader().feed(pack(b"abc") + b"x")
    reader = RequestReader()
    reader.feed(pack(b"abc"))
    with pytest.raises(ProtocolError):
        reader.feed(b"x")


def test_started_tracks_first_byte() -> None:
    reader = RequestReader()
    assert not reader.started
    reader.feed(b"\x00")
    assert reader.started


def test_reply_reader_limit() -> None:
    reader = ReplyReader(max_reply_size=4)
    reader.feed(b"ab")
    reader.feed(b"cd")
    assert reader.finish() == b"abcd"
    with pytest.raises(LimitExceeded):
        reader.feed(b"e")
    assert ReplyReader(None).finish() == b""


@given(payload=st.binary(max_size=2048), cuts=st.lists(st.integers(0, 2100), max_size=20))
def test_any_split_gives_back_the_payload(payload: bytes, cuts: list[int]) -> None:
    assert feed_chunks(RequestReader(), pack(payload), cuts) == [payload]


@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=10))
def test_arbitrary_bytes_never_crash_or_exceed_limit(data: bytes, cuts: list[int]) -> None:
    """Fuzz: any input ends in a payload within the limit, NEED_DATA, or ProtocolError."""
    reader = RequestReader(max_message_size=256)
    try:
        results = feed_chunks(reader, data, cuts)
    except ProtocolError:
        return
    assert len(results) <= 1
    if results:
        (length,) = struct.unpack("!I", data[:4])
        assert results[0] == data[4 : 4 + length] and length <= 256
        assert len(data) == 4 + length

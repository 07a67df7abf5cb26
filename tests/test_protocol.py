"""The sans-I/O framing, on its own: no sockets (the v2 server session: test_session.py)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaspar.client import pack as client_pack
from gaspar.protocol import (
    DIRECT_READ_MIN,
    DIRECT_READ_RATIO,
    MAGIC_V2,
    MAX_MESSAGE_SIZE_LIMIT,
    LimitExceeded,
    ProtocolError,
    ReplyReader,
    ReplyReaderV2,
    RequestReader,
    Status,
    pack,
    pack_reply_v2,
    to_bytes,
)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` split at `cuts`, as a peer's reads might deliver it."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def feed_chunks(reader: RequestReader, data: bytes, cuts: list[int]) -> list[bytes]:
    """Feed a v1 reader `data` in pieces; return every payload it produced."""
    return [p for p in (reader.feed(piece) for piece in pieces(data, cuts)) if p is not None]


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


def read_direct(reader: RequestReader, rest: bytes, step: int) -> bytes | bytearray | None:
    """Write `rest` into the reader's buffer `step` bytes at a time, as recv_into would."""
    payload = None
    while rest:
        buf = reader.buffer()
        assert buf is not None
        n = min(step, len(rest), len(buf))
        buf[:n] = rest[:n]
        rest = rest[n:]
        payload = reader.advance(n)
    return payload


def test_large_payload_gets_a_buffer_only_after_a_sixteenth_has_arrived() -> None:
    body = bytes(range(256)) * (DIRECT_READ_MIN // 256)
    data = pack(body)
    share = len(body) // DIRECT_READ_RATIO
    reader = RequestReader()
    assert reader.feed(data[: 4 + share - 1]) is None
    assert reader.buffer() is None  # not yet: memory follows what the client has sent
    assert reader.feed(data[4 + share - 1 : 4 + share]) is None
    view = reader.buffer()
    assert view is not None and len(view) == len(body) - share
    assert read_direct(reader, data[4 + share :], 50_000) == body
    assert reader.done and reader.buffer() is None


def test_small_payloads_never_get_a_buffer() -> None:
    reader = RequestReader()
    data = pack(b"x" * (DIRECT_READ_MIN - 1))
    assert reader.feed(data[:-1]) is None
    assert reader.buffer() is None
    assert reader.feed(data[-1:]) == b"x" * (DIRECT_READ_MIN - 1)


@settings(max_examples=50, deadline=None)
@given(
    cut=st.integers(min_value=1000, max_value=DIRECT_READ_MIN),
    step=st.integers(min_value=1000, max_value=DIRECT_READ_MIN),
    fed_after=st.integers(min_value=0, max_value=1000),
)
def test_direct_reads_and_fed_chunks_give_the_same_payload(
    cut: int, step: int, fed_after: int
) -> None:
    body = bytes(range(251)) * (DIRECT_READ_MIN // 251 + 1)
    data = pack(body)
    reader = RequestReader()
    pos, payload = 0, None
    while reader.buffer() is None and payload is None:
        payload = reader.feed(data[pos : pos + cut])
        pos += cut
    if payload is None:
        # Some bytes may still come through feed() after the buffer exists.
        payload = reader.feed(data[pos : pos + fed_after])
        pos += fed_after
    if payload is None:
        payload = read_direct(reader, data[pos:], step)
    assert payload == body


def test_advance_past_the_buffer_is_refused() -> None:
    body = b"y" * DIRECT_READ_MIN
    reader = RequestReader()
    reader.feed(pack(body)[: 4 + len(body) // 2])
    view = reader.buffer()
    assert view is not None
    with pytest.raises(ValueError):
        reader.advance(len(view) + 1)
    view[:] = body[len(body) - len(view) :]
    assert reader.advance(len(view)) == body
    with pytest.raises(ValueError):
        reader.advance(0)


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


# -- v2 ------------------------------------------------------------------------------


def feed_all(reader, data: bytes, cuts: list[int]) -> list:
    """Feed a reader that returns lists `data` in pieces; return everything it produced."""
    return [event for piece in pieces(data, cuts) for event in reader.feed(piece)]


def test_preamble_is_no_valid_v1_length() -> None:
    assert int.from_bytes(MAGIC_V2, "big") > MAX_MESSAGE_SIZE_LIMIT


@given(
    replies=st.lists(
        st.tuples(
            st.integers(0, 2**32 - 1), st.sampled_from(list(Status)), st.binary(max_size=300)
        ),
        max_size=8,
    ),
    cuts=st.lists(st.integers(0, 3000), max_size=20),
)
def test_v2_replies_survive_any_split(
    replies: list[tuple[int, Status, bytes]], cuts: list[int]
) -> None:
    data = MAGIC_V2 + b"".join(pack_reply_v2(i, s, b) for i, s, b in replies)
    got = feed_all(ReplyReaderV2(), data, cuts)
    assert [(r.id, r.status, r.body) for r in got] == replies


def test_reply_reader_rejects_a_non_v2_server_and_large_replies() -> None:
    with pytest.raises(ProtocolError):
        ReplyReaderV2().feed(b"\x00\x00")
    with pytest.raises(ProtocolError):
        ReplyReaderV2().feed(b"hello")
    with pytest.raises(LimitExceeded):
        ReplyReaderV2(max_reply_size=3).feed(MAGIC_V2 + pack_reply_v2(1, Status.OK, b"four"))
    with pytest.raises(ProtocolError):
        ReplyReaderV2().feed(MAGIC_V2 + b"\x00\x00\x00\x01\x63\x00\x00\x00\x00")

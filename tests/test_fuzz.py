"""Fuzz (issue 12, item 7): the sans-I/O parsers under hypothesis, and a live server under attack.

The properties here are about hostile input and bounds: only the documented
exception escapes, and what a parser holds stays within its limits whatever it
is fed (its internal sizes are asserted against them after every piece).  The
round trips of well-formed input are tests/test_protocol.py, test_session.py and
test_links.py.  Sizes come from tests/torture.py.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import gaspar
from gaspar import workerproto as wp
from gaspar.protocol import (
    DIRECT_READ_MIN,
    DIRECT_READ_RATIO,
    HEADER_SIZE,
    MAGIC_V2,
    MAGIC_V2_CONTROL,
    MAX_UNSENT,
    PIPELINE_FULL_MESSAGE,
    REPLY_V2,
    SHUTTING_DOWN_MESSAGE,
    TIMED_V2,
    Cancel,
    LimitExceeded,
    ProtocolError,
    Refused,
    ReplyReaderV2,
    Request,
    RequestReader,
    SessionV2,
    Status,
    Timed,
    pack,
    pack_cancel_v2,
    pack_reply_v2,
    pack_request_v2,
    pack_timed_request_v2,
)
from tests import handlers
from tests.conftest import wait_until
from tests.torture import FULL, SIZES, fd_count, printer, rss_kib

pytestmark = [pytest.mark.torture, pytest.mark.timeout(SIZES.timeout)]


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[..., None]:
    return printer(capsys)


Report = Callable[..., None]
fuzz = settings(
    max_examples=SIZES.fuzz_examples,
    deadline=None,
    database=None,  # no example store left in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # Shrinking inputs of hundreds of KiB takes minutes: CI reports the input as found.
    phases=list(Phase) if FULL else [p for p in Phase if p is not Phase.shrink],
)
seen: Counter[str] = Counter()  # what the generated inputs reached, per property


def pieces(data: bytes, cuts: list[int], step: int = 0) -> list[bytes]:
    """`data` split at `cuts`, or every `step` bytes, as a peer's reads might deliver it."""
    if step:
        return [data[i : i + step] for i in range(0, len(data), step)]
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# Reads of a fixed size (0: at the cuts drawn instead), small enough to split large frames.
steps = st.sampled_from([0, 0, 1, 7, 1000, 20_000, 65_536])


def mutate(draw: st.DrawFn, data: bytearray) -> bytes:
    """Now and then (one time in three) flip, insert or drop a few bytes of `data`."""
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
        pos = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "insert", "drop"]))
        if how == "insert" or not data:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif how == "flip":
            data[min(pos, len(data) - 1)] ^= draw(st.integers(1, 255))
        else:
            del data[pos : pos + draw(st.integers(1, 6))]
    return bytes(data)


# -- v1: RequestReader ---------------------------------------------------------------

V1_LIMIT = DIRECT_READ_MIN * 2


@st.composite
def v1_streams(draw: st.DrawFn) -> bytes:
    """A header declaring any length (about the limit, or anything), then some bytes."""
    length = draw(
        st.one_of(
            st.integers(0, 300),
            st.sampled_from([DIRECT_READ_MIN - 1, DIRECT_READ_MIN, V1_LIMIT, V1_LIMIT + 1]),
            st.integers(DIRECT_READ_MIN, 2 * V1_LIMIT),  # either side of the limit
            st.integers(0, 2**32 - 1),
        )
    )
    sent = draw(st.sampled_from([length, length - 1, length + 1, 0, 3]))
    data = bytearray(struct.pack("!I", length) + b"v" * max(0, min(sent, 2 * V1_LIMIT + 10)))
    return mutate(draw, data)


def v1_held(reader: RequestReader) -> int:
    """Bytes a v1 reader holds, and has allocated, for its request: the payload's buffer
    once it has one, else the chunks received (`_have` of them)."""
    body = len(reader._body) if reader._body is not None else reader._have
    return len(reader._header) + body


@fuzz
@given(
    data=st.one_of(v1_streams(), v1_streams(), st.binary(max_size=64)),
    cuts=st.lists(st.integers(0, V1_LIMIT), max_size=12),
    step=steps,
    direct=st.booleans(),
)
@example(  # every path at least once, whatever the draw: a large payload read directly
    data=pack(b"v" * DIRECT_READ_MIN), cuts=[DIRECT_READ_MIN // 8], step=0, direct=True
)
@example(data=struct.pack("!I", V1_LIMIT + 1), cuts=[], step=0, direct=False)
@example(data=pack(b"ok") + b"!", cuts=[], step=0, direct=False)
def fuzz_v1_reader(data: bytes, cuts: list[int], step: int, direct: bool) -> None:
    reader = RequestReader(max_message_size=V1_LIMIT)
    received = 0
    seen["v1"] += 1
    if 0 < step < 100:
        data = data[:20_000]  # a few bytes at a time: the header and the first bytes say enough
    try:
        for piece in pieces(data, cuts, step):
            view = reader.buffer()
            if direct and view is not None:  # as the server's recv_into would
                n = min(len(view), len(piece))
                view[:n] = piece[:n]
                reader.advance(n)
                if piece[n:]:
                    reader.feed(piece[n:])
            else:
                reader.feed(piece)
            received += len(piece)
            held = v1_held(reader)
            assert reader._length <= V1_LIMIT  # rule 1: a length is checked as it is read
            assert held <= HEADER_SIZE + V1_LIMIT
            # Rule: memory follows what the client has sent (a sixteenth, then the rest).
            assert held <= max(received, DIRECT_READ_RATIO * received), (held, received)
            if reader._body is not None:
                seen["v1-direct"] += 1
    except ProtocolError as exc:
        seen["v1-limit" if isinstance(exc, LimitExceeded) else "v1-error"] += 1


def test_v1_reader_holds_no_more_than_the_limit_and_sixteen_times_what_came() -> None:
    before = Counter(seen)
    fuzz_v1_reader()
    got = seen - before
    assert got["v1"] >= SIZES.fuzz_examples // 2
    assert got["v1-direct"] and got["v1-limit"] and got["v1-error"], got


# -- v2: SessionV2, control frames included -----------------------------------------

V2_LIMIT = 200
PIPELINE = 4
# The longest reply a session makes on its own: a refusal's header and message.
LONGEST_REFUSAL = REPLY_V2.size + max(
    len(SHUTTING_DOWN_MESSAGE), len(PIPELINE_FULL_MESSAGE), len(f"request of {2**32} bytes") + 40
)


# Frames that keep the stream in step, and frames after which nothing is in step any more
# (an unknown control kind, a length with no payload behind it, garbage): those come last.
FRAME_KINDS = ["request"] * 4 + ["timed"] * 3 + ["cancel"] * 3
LAST_KINDS = ["control", "large", "junk"]
# Runs of frames refused (OVERLOADED once the pipeline is full; TOO_LARGE) that fill the
# replies not yet sent: 8 bytes in make 36 out, 209 make 61.
FULL_PIPELINE = b"".join(pack_request_v2(100 + i, b"") for i in range(PIPELINE))
REFUSED = {pack_request_v2(99, b""): 36, struct.pack("!II", 99, V2_LIMIT + 1) + b"x" * 201: 61}


@st.composite
def v2_frame(draw: st.DrawFn, sent: list[int], kinds: list[str] = FRAME_KINDS) -> bytes:
    """One frame of one of `kinds`: request, timed, cancel, unknown control, oversized,
    garbage.  A cancel is mostly of an id `sent` before, which may be in flight."""
    rid = draw(st.integers(0, 30))
    kind = draw(st.sampled_from(kinds))
    body = b"b" * draw(st.sampled_from([0, 1, 50, V2_LIMIT, V2_LIMIT + 1]))
    if kind == "cancel":
        return pack_cancel_v2(draw(st.sampled_from([sent[-1]] * 3 + sent)) if sent else rid)
    if kind in ("request", "timed"):
        sent.append(rid)
    if kind == "request":
        return pack_request_v2(rid, body)
    if kind == "timed":
        return pack_timed_request_v2(rid, draw(st.integers(0, 0xFFFFFF)), body)
    if kind == "control":
        return struct.pack("!II", rid, 0x80000000 | draw(st.integers(0, 0x7FFFFFFF)))
    if kind == "large":
        return struct.pack("!II", rid, draw(st.integers(V2_LIMIT + 1, 2**32 - 1))) + body
    return draw(st.binary(max_size=20))


@st.composite
def v2_sessions(draw: st.DrawFn) -> bytes:
    """A preamble (now and then a broken one), frames, and maybe a run of refused frames:
    a client that does not read its replies makes the session hold them (rule 5)."""
    preamble = draw(st.sampled_from([MAGIC_V2] * 4 + [MAGIC_V2_CONTROL] * 6 + [b"\xffGS"]))
    data = bytearray(preamble)
    sent: list[int] = []
    if draw(st.integers(0, 3)) == 0:
        frame, out = draw(st.sampled_from(sorted(REFUSED.items())))
        data += FULL_PIPELINE + frame * draw(st.integers(MAX_UNSENT // out, 2 * MAX_UNSENT // out))
    for _ in range(draw(st.integers(0, 12))):
        data += draw(v2_frame(sent))
    if draw(st.booleans()):
        data += draw(v2_frame(sent, LAST_KINDS))
    return mutate(draw, data)


@fuzz
@given(
    data=st.one_of(v2_sessions(), v2_sessions(), v2_sessions(), st.binary(max_size=40)),
    cuts=st.lists(st.integers(0, 200_000), max_size=12),
    reads=st.lists(st.booleans(), max_size=12),
    answer=st.lists(st.booleans(), max_size=40),
    stop_at=st.sampled_from([None, None, None, 0, 1, 3]),
)
@example(
    data=MAGIC_V2_CONTROL
    + pack_request_v2(1, b"x")
    + pack_timed_request_v2(2, 5, b"y")
    + pack_cancel_v2(1)
    + pack_request_v2(3, b"z" * (V2_LIMIT + 1))
    + FULL_PIPELINE
    + pack_request_v2(99, b"") * (MAX_UNSENT // 36 + 1)
    + pack_cancel_v2(1) * 2,
    cuts=[],
    reads=[],
    answer=[],
    stop_at=None,
)
def fuzz_v2_session(
    data: bytes, cuts: list[int], reads: list[bool], answer: list[bool], stop_at: int | None
) -> None:
    """Rules 1-7 of SessionV2 under hostile bytes: only ProtocolError escapes, and every
    buffer is bounded by a limit, whether the client reads its replies or not."""
    session = SessionV2(max_message_size=V2_LIMIT, max_pipeline=PIPELINE)
    reads_iter, answer_iter = iter(reads), iter(answer)
    seen["v2"] += 1
    try:
        for n, piece in enumerate(pieces(data, cuts)):
            if n == stop_at:
                session.stop()
            # The server reads no more while backlogged: it first writes what is queued.
            while session.backlogged:
                seen["v2-backlogged"] += 1
                session.data_to_send()
                check_events(session, session.receive_data(b""), answer_iter)
            check_events(session, session.receive_data(piece), answer_iter)
            in_frame = len(session._buf)
            if session.held:
                assert in_frame <= TIMED_V2.size + V2_LIMIT + len(piece)
            else:
                assert in_frame < TIMED_V2.size + V2_LIMIT, in_frame
            assert session.unsent <= MAX_UNSENT + max(LONGEST_REFUSAL, REPLY_V2.size + 4)
            assert len(session.in_flight) <= PIPELINE
            assert 0 <= session._skip < 2**32
            if next(reads_iter, False):  # a client that stops reading
                session.data_to_send()
        while session.held:  # the frames held behind a backlog are parsed in the end
            seen["v2-backlogged"] += 1
            session.data_to_send()
            check_events(session, session.receive_data(b""), answer_iter)
    except ProtocolError:
        seen["v2-error"] += 1


def check_events(session: SessionV2, events: list[object], answer: object) -> None:
    """Every event is one of the documented kinds, within the limits; answer some."""
    for event in events:
        if isinstance(event, Request | Timed):
            assert len(event.payload) <= V2_LIMIT and event.id in session.in_flight
            assert isinstance(event, Request) or session.control
            seen["v2-timed" if isinstance(event, Timed) else "v2-request"] += 1
        elif isinstance(event, Cancel):
            assert session.control
            seen["v2-cancel"] += 1
        else:
            assert isinstance(event, Refused), event
            seen[f"v2-{event.status.name.lower()}"] += 1
    for rid in sorted(session.in_flight):
        if rid < 100 and next(answer, False):  # FULL_PIPELINE's ids stay in flight  # type: ignore[call-overload]
            session.reply(rid, Status.OK, b"done")


def test_v2_session_stays_within_its_bounds() -> None:
    before = Counter(seen)
    fuzz_v2_session()
    got = seen - before
    assert got["v2"] >= SIZES.fuzz_examples // 2
    for path in ("request", "timed", "cancel", "error", "too_large", "overloaded", "backlogged"):
        assert got[f"v2-{path}"], (path, got)


# -- v2: ReplyReaderV2 (the client's side) ------------------------------------------

REPLY_LIMIT = 300


@st.composite
def reply_streams(draw: st.DrawFn) -> bytes:
    """Replies of any status, length or id (the test puts a preamble before them)."""
    data = bytearray()
    for _ in range(draw(st.integers(0, 8))):
        status = draw(st.integers(0, 12))
        length = draw(st.sampled_from([0, 5, REPLY_LIMIT, REPLY_LIMIT + 1, 2**32 - 1]))
        data += struct.pack("!IBI", draw(st.integers(0, 2**32 - 1)), status, length)
        data += b"r" * min(length, REPLY_LIMIT + 1)
    return mutate(draw, data)


@fuzz
@given(
    data=st.one_of(reply_streams(), reply_streams(), st.binary(max_size=40)),
    cuts=st.lists(st.integers(0, 3000), max_size=12),
    control=st.booleans(),
    preamble=st.sampled_from(["ours", "ours", "ours", MAGIC_V2, MAGIC_V2_CONTROL, b"\x00"]),
)
@example(
    data=pack_reply_v2(1, Status.OK, b"r") + pack_reply_v2(2, Status.OK, b"r" * (REPLY_LIMIT + 1)),
    cuts=[],
    control=False,
    preamble="ours",
)
@example(data=b"", cuts=[], control=True, preamble=MAGIC_V2)
def fuzz_v2_reply_reader(
    data: bytes, cuts: list[int], control: bool, preamble: str | bytes
) -> None:
    ours = MAGIC_V2_CONTROL if control else MAGIC_V2
    reader = ReplyReaderV2(REPLY_LIMIT, preamble=ours)
    data = (ours if preamble == "ours" else preamble) + data  # type: ignore[operator]
    seen["reply"] += 1
    try:
        for piece in pieces(data, cuts):
            for reply in reader.feed(piece):
                assert isinstance(reply.status, Status) and len(reply.body) <= REPLY_LIMIT
                seen["reply-ok"] += 1
            assert len(reader._buf) < REPLY_V2.size + REPLY_LIMIT
    except ProtocolError as exc:  # LimitExceeded is one
        seen["reply-limit" if isinstance(exc, LimitExceeded) else "reply-error"] += 1


def test_v2_reply_reader_stays_within_its_bound() -> None:
    before = Counter(seen)
    fuzz_v2_reply_reader()
    got = seen - before
    assert got["reply-ok"] and got["reply-limit"] and got["reply-error"], got


# -- worker frames: FrameReader, batches, READY ---------------------------------------

FRAME_LIMIT = 150_000
# Body sizes that reach every path: empty, small, about the split bound, at the limit.
frame_sizes = st.sampled_from(
    [0, 1, 100, wp.SPLIT_BODY - 1, wp.SPLIT_BODY, wp.SPLIT_BODY + 1, 100_000, FRAME_LIMIT]
)
valid_kind = st.sampled_from(sorted(wp.KINDS))
any_kind = st.one_of(*[valid_kind] * 7, st.binary(min_size=1, max_size=1))


@st.composite
def worker_streams(draw: st.DrawFn) -> bytes:
    """Frames of any kind and body size (some over the bound), now and then corrupted."""
    data = bytearray()
    for _ in range(draw(st.integers(0, 5))):
        size = draw(st.one_of(*[frame_sizes] * 7, st.just(FRAME_LIMIT + 1)))
        kind, number = draw(any_kind), draw(st.integers(0, wp.MAX_NUMBER))
        head = size.to_bytes(4, "big") + wp.head(kind, wp.job_id(draw(st.integers(0, 9))), number)
        data += head + b"w" * min(size, FRAME_LIMIT)
    return mutate(draw, data)


@fuzz
@given(
    data=st.one_of(worker_streams(), worker_streams(), st.binary(max_size=40)),
    cuts=st.lists(st.integers(0, 600_000), max_size=8),
    reuse=st.booleans(),
)
@example(
    data=b"".join(
        b"".join(bytes(b) for b in wp.frame(wp.DONE, wp.job_id(1), b"w" * n)) for n in (1, 70_000)
    )
    + (FRAME_LIMIT + 1).to_bytes(4, "big")
    + wp.head(wp.DONE, wp.job_id(2)),
    cuts=[],
    reuse=True,
)
def fuzz_frame_reader(data: bytes, cuts: list[int], reuse: bool) -> None:
    reader = wp.FrameReader(FRAME_LIMIT, reuse_large=reuse)
    at = 0
    seen["frames"] += 1
    try:
        for end in [*sorted(c for c in cuts if c < len(data)), len(data)]:
            while at < end:
                buffer = reader.get_buffer()
                assert len(buffer) > 0
                n = min(len(buffer), end - at)
                buffer[:n] = data[at : at + n]
                reader.feed(n)
                at += n
                while (message := reader.next()) is not None:
                    kind, _, number, body = message
                    assert kind in wp.KINDS and 0 <= number <= wp.MAX_NUMBER
                    assert len(body) <= FRAME_LIMIT
                    seen["frames-big" if len(body) >= wp.SPLIT_BODY else "frames-ok"] += 1
                assert len(reader._buf) == wp.READ_BUFFER  # never grows
                assert reader._big is None or len(reader._big) <= FRAME_LIMIT
                assert len(reader._spare) <= min(FRAME_LIMIT, wp.REUSE_MAX)
                assert reader.pending <= wp.FRAME_HEAD + FRAME_LIMIT
    except wp.FrameError:
        seen["frames-error"] += 1


def test_frame_reader_stays_within_its_bound() -> None:
    before = Counter(seen)
    fuzz_frame_reader()
    got = seen - before
    assert got["frames-ok"] and got["frames-big"] and got["frames-error"], got


@fuzz
@given(body=st.binary(max_size=200), count=st.integers(0, 20))
def test_batches_and_ready_info_raise_only_value_error(body: bytes, count: int) -> None:
    with contextlib.suppress(ValueError):
        for jid, payload in wp.unpack_batch(body, count):
            assert len(jid) == 8 and len(payload) <= len(body)
    with contextlib.suppress(ValueError):
        info = wp.parse_ready(body)
        assert info.pid > 0 and isinstance(info.host, str)


# -- a live server under hostile connections ----------------------------------------

LIVE_LIMIT = 4096
ENDINGS = ["half-close", "half-close", "close", "reset", "trickle"]


def v2_attack(rng: random.Random) -> bytes:
    """A valid preamble (either kind), then random frames of every kind."""
    data = bytearray(rng.choice([MAGIC_V2, MAGIC_V2_CONTROL]))
    for _ in range(rng.randrange(0, 12)):
        rid = rng.randrange(0, 8)
        kind = rng.choice(["request", "request", "timed", "cancel", "control", "large", "junk"])
        body = rng.randbytes(rng.choice([0, 5, 100, LIVE_LIMIT, LIVE_LIMIT + 1]))
        if kind == "request":
            data += pack_request_v2(rid, body)
        elif kind == "timed":
            data += pack_timed_request_v2(rid, rng.randrange(0, 3000), body)
        elif kind == "cancel":
            data += pack_cancel_v2(rid)
        elif kind == "control":
            data += struct.pack("!II", rid, 0x80000000 | rng.randrange(2**31))
        elif kind == "large":
            data += struct.pack("!II", rid, rng.randrange(LIVE_LIMIT + 1, 2**32)) + body
        else:
            data += rng.randbytes(rng.randrange(1, 20))
    if rng.random() < 0.3:  # cut the last frame short
        del data[len(data) - rng.randrange(0, min(len(data) - 4, 20) + 1) :]
    return bytes(data)


def attack_bytes(rng: random.Random) -> tuple[str, bytes]:
    """What one hostile connection sends."""
    kind = rng.choice(["bytes", "v1-length", "v1", "v2", "v2", "preamble", "nothing"])
    if kind == "bytes":
        return kind, rng.randbytes(rng.choice([1, 3, 4, 5, 64, 5000]))
    if kind == "v1-length":  # any declared length, then fewer or more bytes than it
        length = rng.choice(
            [0, 1, LIVE_LIMIT, LIVE_LIMIT + 1, 2**31, 2**32 - 1, rng.randrange(2**32)]
        )
        return kind, struct.pack("!I", length) + rng.randbytes(rng.randrange(0, 300))
    if kind == "v1":  # a valid request, perhaps with bytes after it
        return kind, pack(rng.randbytes(rng.randrange(0, 200))) + rng.randbytes(
            rng.choice([0, 0, 3])
        )
    if kind == "v2":
        return kind, v2_attack(rng)
    if kind == "preamble":
        return kind, rng.choice([MAGIC_V2, MAGIC_V2_CONTROL])[: rng.randrange(1, 4)]
    return kind, b""


def attack(address: tuple[str, int], seed: int) -> str:
    """One hostile connection, ended as the seed says; "hung" if the server never ends it."""
    rng = random.Random(seed)
    kind, data = attack_bytes(rng)
    ending = rng.choice(ENDINGS)
    with socket.create_connection(address, timeout=10) as sock:
        try:
            if ending == "trickle":  # in a few pieces, then a half-close
                cuts = sorted(rng.randrange(0, len(data) + 1) for _ in range(3))
                for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                    sock.sendall(data[a:b])
                ending = "half-close"
            else:
                sock.sendall(data)
            if ending == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return kind
            if ending == "close":
                return kind
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # the server must end the connection: EOF or a reset
                pass
        except TimeoutError:
            return "hung"
        except OSError:  # reset, or not connected any more: the server ended it
            pass
    return kind


def good_client(address: tuple[str, int], client: gaspar.Client, n: int) -> None:
    """A well-behaved client is answered, over v1 and v2, between attacks."""
    assert gaspar.client.request(address, b"good-%d" % n, timeout=10) == b"good-%d" % n
    assert client.request(b"good2-%d" % n, timeout=10) == b"good2-%d" % n


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_live_server_under_hostile_connections(
    serve: Callable[..., gaspar.Producer], caplog: pytest.LogCaptureFixture, report: Report
) -> None:
    """Random bytes, lengths, v2 frames after a valid preamble and disconnects: no exception
    escapes, the server keeps answering, and its descriptors come back to their count."""
    caplog.set_level(logging.WARNING)
    producer = serve(
        handlers.echo,
        processes=2,
        max_message_size=LIVE_LIMIT,
        max_pipeline=4,
        read_timeout=1.0,
        idle_timeout=2.0,
    )
    address = producer.address
    assert address is not None
    with gaspar.Client(address) as client:
        good_client(address, client, 0)
    wait_until(lambda: producer.stats()["connections"] == 0)
    fds, rss = fd_count(), rss_kib()
    kinds: Counter[str] = Counter()
    batch = 50
    with gaspar.Client(address) as client, ThreadPoolExecutor(8) as pool:
        for start in range(0, SIZES.live_attacks, batch):
            seeds = range(start, min(start + batch, SIZES.live_attacks))
            kinds.update(pool.map(lambda seed: attack(address, seed), seeds))
            good_client(address, client, start)
    assert wait_until(lambda: producer.stats()["connections"] == 0, timeout=15), producer.stats()
    assert wait_until(lambda: fd_count() <= fds, timeout=10), (fd_count(), fds)
    grown = rss_kib() - rss
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    stats = producer.stats()
    report(
        "live fuzz",
        attacks=SIZES.live_attacks,
        **dict(sorted(kinds.items())),
        fds_before=fds,
        fds_after=fd_count(),
        rss_growth_kib=grown,
        errors_logged=len(errors),
    )
    assert kinds["hung"] == 0, kinds
    assert not errors, [r.getMessage() for r in errors[:5]]
    assert len(producer.worker_pids()) == 2 and stats["queued"] + stats["in_flight"] == 0
    assert grown < 64 * 1024, f"the process grew by {grown} KiB"

"""Codec: every message round-trips; every bad frame gives a typed ProtocolError, nothing else."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerchain.errors import FrameError, LimitExceeded, ProtocolError, VersionMismatch
from layerchain.wire import codec
from layerchain.wire.codec import Limits, decode, encode, encode_bytes
from layerchain.wire.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    CloseSession,
    DialBack,
    DialBackProbe,
    DialBackResult,
    ErrorReply,
    Forward,
    Forwarded,
    Info,
    InfoReply,
    ManifestQuery,
    ManifestReply,
    OpenSession,
    PieceQuery,
    PieceReply,
    Ping,
    Pong,
    PushStep,
    RelayAccept,
    RelayChallenge,
    RelayConnect,
    RelayDial,
    RelayOffer,
    RelayOk,
    RelayQuery,
    RelayRegister,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
    TrainBackward,
    TrainBackwardResult,
    TrainForward,
    TrainForwardResult,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sample_messages(dtype: torch.dtype = torch.float32) -> list:
    """One instance of every message type, with non-default values everywhere."""
    hidden = torch.randn(2, 3, 8).to(dtype)
    return [
        OpenSession(1, "s-1", "model-abc", 3, 9, 512, b"\x01voucher", 7),
        SessionOpened(2, "s-1", 4096),
        Step(3, "s-1", 7, hidden, b"v"),
        StepResult(4, "s-1", 7, hidden * 2, b"\x00receipt\xff"),
        CloseSession(5, "s-1"),
        SessionClosed(6, "s-1"),
        Info(7),
        InfoReply(8, "peer", "model", 0, 30, 1.25, 3, 100, "0xabc", "0.1.0", {"a": 0.5, "b": 2}),
        Ping(9, 2**40),
        Pong(10, 2**40),
        ErrorReply(11, "busy", "no cache room"),
        DialBack(20, "tls://10.0.0.7:31337", "peer", 2**40),
        DialBackResult(21, "connection refused"),
        DialBackProbe(22, 2**40),
        RelayQuery(23),
        RelayOffer(24, 31338),
        RelayChallenge(25, b"\x07" * 32),
        RelayRegister(26, "peer", b"\x01" * 32, b"\x02" * 64),
        RelayConnect(27, "peer"),
        RelayAccept(28, b"\x03" * 16),
        RelayDial(29, b"\x04" * 16),
        RelayOk(30),
        TrainForward(40, "s-1", 8, hidden, b"v"),
        TrainForwardResult(41, "s-1", 8, hidden * 2, b"r"),
        TrainBackward(42, "s-1", 9, hidden, hidden * 3, b"v"),
        TrainBackwardResult(43, "s-1", 9, hidden * 4, b"r"),
        ManifestQuery(50, "a" * 64),
        ManifestReply(51, "a" * 64, b'{"num_blocks": 30}', 10, 20, 1),
        PieceQuery(52, "a" * 64, "block_012.safetensors", 1 << 20, 512 * 1024),
        PieceReply(53, "a" * 64, "block_012.safetensors", 1 << 20, 14_000_000, b"\x00\xff" * 1000),
        PushStep(60, "s-1", 7, b"v", b"\x05" * 32, "tls://10.0.0.8:1", "peer", "s-2", 3, b"\x06" * 16),
        Forward(61, "s-2", 3, hidden, b"\x06" * 16),
        Forwarded(62, "s-2", 3),
    ]


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, torch.Tensor):
            assert y.dtype == x.dtype and y.shape == x.shape
            assert torch.equal(x, y)
        else:
            assert x == y, name


def frame_from_header(header: list, payload: bytes = b"", *, pad_to_8: bool = True) -> bytes:
    """A hand-made frame: prefix, header_len, msgpack header, padding, payload."""
    packed = msgpack.packb(header, use_bin_type=True)
    head = 8 + len(packed)
    pad = (-head % 8) if (payload and pad_to_8) else 0
    body = struct.pack(">I", len(packed)) + packed + b"\0" * pad + payload
    return struct.pack(">I", len(body)) + body


def step_header(dtype: str = "float32", shape=(1, 1, 4), nbytes: int | None = None):
    """A Step header (rid 42) and a zero payload of the right size unless ``nbytes`` says."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * 4 if nbytes is None else nbytes
    header = [PROTOCOL_VERSION, Step.TYPE_ID, 42, "s", 0, [dtype, list(shape), nbytes], b""]
    return header, b"\0" * nbytes


def test_every_message_type_round_trips_in_every_dtype():
    assert len(sample_messages()) == len(MESSAGE_TYPES)
    for dtype in DTYPES:
        for msg in sample_messages(dtype):
            frame = encode_bytes(msg)
            assert_same(decode(bytearray(frame)), msg)
            assert_same(decode(frame), msg)  # read-only input works too


def test_frame_layout_prefix_and_alignment():
    msg = Step(1, "s", 0, torch.arange(6, dtype=torch.float32).view(1, 2, 3))
    parts = encode(msg)
    frame = b"".join(parts)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert len(parts[0]) % 8 == 0  # the tensor starts 8-aligned
    assert frame[len(parts[0]) :] == msg.hidden.numpy().tobytes()


def test_decode_is_zero_copy_for_writable_frames_and_copies_read_only_ones():
    msg = Step(1, "s", 0, torch.ones(1, 1, 16))
    frame = bytearray(encode_bytes(msg))
    out = decode(frame)
    out.hidden.mul_(3)  # writable, and shares the frame's memory
    assert decode(bytes(frame)).hidden.eq(3).all()
    readonly = decode(bytes(encode_bytes(msg)))
    readonly.hidden.add_(1)  # a copy: writable, no warning, no crash
    assert readonly.hidden.eq(2).all()


def test_encode_accepts_non_contiguous_tensors_by_value():
    base = torch.randn(1, 8, 4)
    msg = StepResult(1, "s", 0, base.transpose(1, 2))
    assert torch.equal(decode(bytearray(encode_bytes(msg))).hidden, base.transpose(1, 2))


@pytest.mark.parametrize(
    "msg, error",
    [
        (Step(1, "s", 0, torch.zeros(1, 4)), LimitExceeded),  # not 3-D
        (Step(1, "s", 0, torch.zeros(1, 1, 4, dtype=torch.float64)), LimitExceeded),
        (Step(1, "s", 0, torch.zeros(1, 0, 4)), LimitExceeded),  # empty axis
        (Step(1, "s", 0, "not a tensor"), FrameError),  # type: ignore[arg-type]
        (Ping(1, "7"), FrameError),  # type: ignore[arg-type]
        (Ping(1, 2**70), FrameError),  # msgpack cannot carry it
    ],
)
def test_encode_refuses_what_decode_would_refuse(msg, error):
    with pytest.raises(error):
        encode(msg)


def test_limits_apply_on_both_sides():
    small = Limits(max_frame_bytes=1024, max_dim_size=64, allowed_dtypes=("float16",))
    with pytest.raises(LimitExceeded):
        encode(Step(1, "s", 0, torch.zeros(1, 1, 16)), small)  # float32 not allowed
    with pytest.raises(LimitExceeded):
        encode(Step(1, "s", 0, torch.zeros(1, 1, 1000, dtype=torch.float16)), small)
    big = encode_bytes(Step(1, "s", 0, torch.zeros(1, 1, 60, dtype=torch.float16)))
    assert decode(bytearray(big), small).hidden.shape == (1, 1, 60)
    with pytest.raises(LimitExceeded):
        decode(bytearray(encode_bytes(Step(1, "s", 0, torch.zeros(1, 2, 100)))), small)


@pytest.mark.parametrize(
    "frame, error",
    [
        (b"", FrameError),
        (b"\x00\x00\x00", FrameError),
        (b"\xff\xff\xff\xff" + b"\0" * 8, LimitExceeded),  # 2**32-1 prefix
        (struct.pack(">II", 4, 0), FrameError),  # empty header
        (frame_from_header(["not", "a", "version"]), VersionMismatch),
        (frame_from_header([PROTOCOL_VERSION + 1, Ping.TYPE_ID, 1, 5]), VersionMismatch),
        (frame_from_header([True, Ping.TYPE_ID, 1, 5]), VersionMismatch),
        (frame_from_header({"a": 1}), FrameError),  # header not a list
        (frame_from_header([PROTOCOL_VERSION, 99, 1]), FrameError),  # unknown type
        (frame_from_header([PROTOCOL_VERSION, Ping.TYPE_ID, 1]), FrameError),  # missing field
        (frame_from_header([PROTOCOL_VERSION, Ping.TYPE_ID, 1, 5, 6]), FrameError),  # extra field
        (frame_from_header([PROTOCOL_VERSION, Ping.TYPE_ID, 1, "5"]), FrameError),  # wrong type
        (frame_from_header([PROTOCOL_VERSION, Ping.TYPE_ID, 1, True]), FrameError),  # bool
        (frame_from_header([PROTOCOL_VERSION, ErrorReply.TYPE_ID, 1, b"x", "m"]), FrameError),
        (frame_from_header([PROTOCOL_VERSION, Ping.TYPE_ID, 1, 5]) + b"x", FrameError),  # prefix
        (frame_from_header(*step_header("int64")), LimitExceeded),  # wrong dtype
        (frame_from_header(*step_header("float64")), LimitExceeded),
        (frame_from_header(*step_header(shape=(4,))), LimitExceeded),  # 1-D
        (frame_from_header(*step_header(shape=(1, 1, 1, 4))), LimitExceeded),  # 4-D
        (frame_from_header(*step_header(shape=(1, -1, 4))), LimitExceeded),
        (frame_from_header(*step_header(shape=(1, 2**31, 4), nbytes=16)), LimitExceeded),
        (frame_from_header(*step_header(nbytes=12)), FrameError),  # elements vs nbytes
        (frame_from_header(step_header()[0], b"\0" * 8), FrameError),  # truncated payload
        (frame_from_header(step_header()[0], b"\0" * 24), FrameError),  # trailing bytes
        (frame_from_header(*step_header(), pad_to_8=False), FrameError),  # misplaced payload
    ],
)
def test_bad_frames_raise_typed_errors(frame, error):
    with pytest.raises(error):
        decode(bytearray(frame))


def test_bad_utf8_and_garbage_msgpack_are_frame_errors():
    packed = b"\x94\x01\x09\x01\xa2\xff\xfe"  # [1, 9, 1, <invalid utf-8 str>]
    body = struct.pack(">I", len(packed)) + packed
    with pytest.raises(FrameError):
        decode(struct.pack(">I", len(body)) + body)
    body = struct.pack(">I", 3) + b"\xc1\xc1\xc1"  # 0xc1 is never used in msgpack
    with pytest.raises(FrameError):
        decode(struct.pack(">I", len(body)) + body)


def test_decode_errors_carry_the_rid_when_readable():
    with pytest.raises(LimitExceeded) as caught:
        decode(bytearray(frame_from_header(*step_header("int64"))))
    assert codec.error_rid(caught.value) == 42
    with pytest.raises(FrameError) as caught:
        decode(b"\0\0\0\0")
    assert codec.error_rid(caught.value) == 0


def test_read_length_rejects_huge_prefix_before_allocating():
    with pytest.raises(LimitExceeded):
        codec.read_length(b"\xff\xff\xff\xff")
    assert codec.read_length(b"\x00\x00\x01\x00") == 256


def _valid_frames() -> list[bytes]:
    return [encode_bytes(m) for d in DTYPES for m in sample_messages(d)]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_only_protocol_errors(data):
    for frame in (data, struct.pack(">I", len(data)) + data):
        try:
            decode(bytearray(frame))
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(_valid_frames()),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 64),
)
def test_fuzz_mutated_valid_frames_only_protocol_errors(frame, edits, cut):
    mutated = bytearray(frame)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    if cut:
        del mutated[-cut:]
    try:
        msg = decode(mutated)
    except ProtocolError:
        return
    assert type(msg) in MESSAGE_TYPES.values()  # a mutation may still be a valid message


def test_error_messages_stay_short_for_huge_hostile_values():
    header, payload = step_header("x" * 100_000)
    with pytest.raises(LimitExceeded) as caught:
        decode(bytearray(frame_from_header(header, payload)))
    assert len(str(caught.value)) < 200
    reply = ErrorReply.from_error(1, LimitExceeded("y" * 10_000))
    assert len(reply.message) == 500 and len(encode_bytes(reply)) < 600


def test_a_step_of_more_than_max_step_tokens_is_refused_from_its_header():
    """B x T above MAX_STEP_TOKENS: refused on encode, and on decode before the payload is
    looked at (the frame below carries no tensor bytes at all, yet the answer is the limit)."""
    from layerchain.wire.messages import MAX_STEP_TOKENS

    assert Limits().max_tensor_tokens == MAX_STEP_TOKENS
    fits = Step(1, "s", 0, torch.zeros(1, MAX_STEP_TOKENS, 4))
    assert decode(bytearray(encode_bytes(fits))).hidden.shape == (1, MAX_STEP_TOKENS, 4)
    for shape in [(1, MAX_STEP_TOKENS + 1, 4), (2, MAX_STEP_TOKENS // 2 + 1, 4)]:
        with pytest.raises(LimitExceeded, match="split it into several steps"):
            encode(Step(1, "s", 0, torch.zeros(shape)))
        header, _ = step_header(shape=shape)
        with pytest.raises(LimitExceeded, match="tokens"):
            decode(bytearray(frame_from_header(header, b"")))
    header, _ = step_header(shape=(1, 30_000, 4))  # a 30k-token step: no payload needed
    with pytest.raises(LimitExceeded) as caught:
        decode(bytearray(frame_from_header(header)))
    assert codec.error_rid(caught.value) == 42


def test_largest_step_frame_holds_a_full_step_and_nothing_much_more():
    H = 576
    limit = codec.largest_step_frame(H)
    full = encode_bytes(Step(1, "s" * 64, 0, torch.zeros(1, Limits().max_tensor_tokens, H), b"v" * 4096))
    assert len(full) - 4 <= limit < len(full) + 2 * codec.MiB
    node_limits = Limits(max_frame_bytes=limit)
    assert decode(bytearray(full), node_limits).hidden.shape[1] == Limits().max_tensor_tokens

"""Activation compression on the wire (``wire.compress``): the int8 form's error bounds and
idempotence, its frames under the codec's limits (fuzzed), commitments that agree with a
float32 recomputation, and in-process swarms whose sessions travel in a compressed form
with receipts and audits that stay consistent (an honest node is never flagged, a cheater
still is)."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memswarm import MemorySwarm

from layerchain.client import ClientConfig
from layerchain.client.config import WIRE_NAMES
from layerchain.errors import ConfigError, FrameError, LimitExceeded, ProtocolError
from layerchain.ledger.evidence import check_evidence
from layerchain.market.commitment import (
    AUDIT_TOLERANCE,
    TOP_K,
    check_commitment,
    commit,
    commitment_distance,
)
from layerchain.model import SamplingParams, load_span
from layerchain.wire import codec, compress
from layerchain.wire import messages as m
from layerchain.wire.codec import Limits, decode, encode, encode_bytes
from layerchain.wire.compress import (
    BLOCK,
    INT8_NAME,
    OUTLIERS,
    WIRE_FORMS,
    Blockwise8,
    dequantize,
    int8_nbytes,
    quantize,
    to_wire,
)

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=12)


def hidden_states(shape=(1, 5, 576), seed: int = 0, massive: float = 25_000.0) -> torch.Tensor:
    """Random hidden states with an LLM's outliers: one huge dimension and a few large ones
    (SmolLM2's residual stream holds values near 25,000 where most are below 10)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * 2
    size = shape[-1]
    if size > 8:
        x[..., 7] = massive
        x[..., size // 2] *= 40
        x[..., size - 3] = -300.0
    return x


# ---------------------------------------------------------------------------- the int8 form


@pytest.mark.parametrize("size", [1, 3, 4, 5, 63, 64, 70, 576])
def test_int8_error_is_within_half_a_step_of_its_block_and_outliers_are_exact(size):
    x = hidden_states((2, 3, size), seed=size)
    parts = quantize(x)
    nb = -(-size // BLOCK)
    k = min(OUTLIERS, size)
    assert parts.scales.shape == (2, 3, nb) and parts.scales.dtype == torch.float32
    assert parts.outliers.shape == parts.positions.shape == (2, 3, k)
    assert parts.codes.shape == x.shape and parts.codes.dtype == torch.int8
    assert int(parts.codes.abs().max()) <= 127
    decoded = dequantize(parts)
    positions = parts.positions.long()
    # the k largest magnitudes of each token travel exactly
    assert torch.equal(decoded.gather(-1, positions), x.gather(-1, positions))
    assert torch.equal(positions.sort(-1).values,
                       x.abs().topk(k, dim=-1).indices.sort(-1).values)
    # every other value within half its block's step
    step = parts.scales.repeat_interleave(BLOCK, dim=-1)[..., :size]
    error = (decoded - x).abs().scatter(-1, positions, 0.0)
    assert bool((error <= step / 2 * (1 + 1e-5)).all())
    # each product exact: float64 agrees bit for bit
    exact = (parts.codes.double() * step.double()).scatter(-1, positions, parts.outliers.double())
    assert torch.equal(decoded.double(), exact)


def test_a_massive_activation_does_not_flatten_its_block():
    x = hidden_states((1, 4, 128))
    decoded = to_wire(x, "int8")
    rest = [i for i in range(64) if i not in (7,)]  # block 0 holds the 25,000
    assert (decoded[..., rest] - x[..., rest]).abs().max() < 0.01 * x[..., rest].abs().max()
    assert torch.equal(decoded[..., 7], x[..., 7])


@pytest.mark.parametrize("seed", range(5))
def test_int8_is_idempotent(seed):
    x = hidden_states((1, 9, 576), seed=seed) * (10.0 ** (seed - 2))
    once = to_wire(x, "int8")
    again = quantize(once)  # a plain float tensor on the grid: parts come back bit for bit
    for name in ("scales", "outliers", "positions", "codes"):
        assert torch.equal(getattr(again, name), getattr(once.parts, name)), name
    assert torch.equal(to_wire(once.clone(), "int8"), once)
    assert to_wire(once, "int8") is once  # already in the form


def test_zeros_and_non_finite_values():
    assert torch.equal(to_wire(torch.zeros(1, 2, 100), "int8"), torch.zeros(1, 2, 100))
    x = hidden_states((1, 3, 128))
    x[0, 0, 5] = float("nan")
    x[0, 1, 70] = float("inf")
    for i in range(6):  # more non-finite values than outliers: their block goes non-finite
        x[0, 2, 100 + i] = float("nan")
    decoded = to_wire(x, "int8")
    assert decoded[0, 0, 5].isnan() and decoded[0, 1, 70].isinf()
    assert not decoded[0, 2, 64:].isfinite().all()
    assert decoded[0, :2].isfinite().sum() == 2 * 128 - 1 - 1  # the rest stays finite


def test_float_forms_are_casts_and_the_empty_form_is_the_tensor_itself():
    x = hidden_states((1, 2, 64))
    assert to_wire(x, "") is x
    assert to_wire(x, "fp16").dtype == torch.float16 and to_wire(x, "bf16").dtype == torch.bfloat16
    assert torch.equal(to_wire(x, "fp16"), x.half())
    assert type(to_wire(x, "int8")) is Blockwise8 and to_wire(x, "int8").dtype == torch.float32
    assert type(to_wire(x, "int8") * 2) is torch.Tensor  # ops give plain tensors


def test_wire_forms_and_names_agree_and_unknown_ones_are_refused():
    assert tuple("" if n == "fp32" else n for n in WIRE_NAMES) == WIRE_FORMS
    assert OUTLIERS == TOP_K  # the values a commitment pins down travel exactly
    for form in WIRE_FORMS:
        assert compress.check_form(form) == form
    with pytest.raises(LimitExceeded) as caught:
        compress.check_form("int4")
    assert caught.value.code == "limit_exceeded"
    with pytest.raises(LimitExceeded):
        to_wire(torch.zeros(1, 1, 4), "q" * 1000)
    assert ClientConfig().wire == "fp32" and ClientConfig().wire_form == ""
    assert ClientConfig(wire="int8").wire_form == "int8"
    with pytest.raises(ConfigError, match="wire"):
        ClientConfig(wire="int4")


def test_cli_flags_refuse_unknown_wire_forms_in_one_line():
    from typer.testing import CliRunner

    from layerchain.cli.main import app

    peer = "/ip4/127.0.0.1/tcp/9/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    result = CliRunner().invoke(app, ["generate", "--initial-peers", peer, "--prompt", "hi",
                                      "--wire", "int4"])
    assert result.exit_code == 1 and "unknown wire form 'int4'" in result.output
    result = CliRunner().invoke(app, ["bench", "compression", "--wires", "fp32,int4"])
    assert result.exit_code == 1 and "--wires among fp32,fp16,bf16,int8" in result.output


# ---------------------------------------------------------------------------- frames


def int8_messages(x: torch.Tensor) -> list:
    q = to_wire(x, "int8")
    return [m.Step(3, "s-1", 7, q, b"v"), m.StepResult(4, "s-1", 7, q, b"r", 1.5),
            m.TrainForward(40, "s-1", 8, q, b"v"), m.TrainBackward(42, "s-1", 9, q, q, b"v")]


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 3, 70), (1, 4, 3)])
def test_int8_tensors_round_trip_through_the_codec(shape):
    x = hidden_states(shape)
    for msg in int8_messages(x):
        frame = encode_bytes(msg)
        for got in (decode(bytearray(frame)), decode(frame)):  # writable and read-only
            assert type(got) is type(msg)
            for name in msg.__dataclass_fields__:
                sent = getattr(msg, name)
                if isinstance(sent, torch.Tensor):
                    tensor = getattr(got, name)
                    assert type(tensor) is torch.Tensor and tensor.dtype == torch.float32
                    assert torch.equal(tensor, sent)
                else:
                    assert getattr(got, name) == sent
    tokens = shape[0] * shape[1]
    step = m.Step(1, "s", 0, to_wire(x, "int8"))
    assert int8_nbytes(shape) == tokens * (4 * -(-shape[2] // 64) + 8 * min(4, shape[2]) + shape[2])
    assert len(encode_bytes(step)) - len(encode_bytes(m.Step(1, "s", 0, torch.zeros(1, 1, 1)))) \
        <= int8_nbytes(shape) + 8


def test_an_int8_step_frame_is_under_a_third_of_a_float32_one():
    x = hidden_states((1, 1, 576))
    sizes = {form: len(encode_bytes(m.Step(1, "s" * 32, 5, to_wire(x, form)))) for form in WIRE_FORMS}
    assert sizes["fp16"] == sizes["bf16"] < sizes[""]
    assert sizes["int8"] < 0.31 * sizes[""]  # 716 vs 2,376 bytes, header included
    assert compress.wire_bytes((1, 1, 576), "int8") == 576 + 4 * 9 + 8 * 4
    assert compress.wire_bytes((1, 1, 576), "") == 4 * 576


def int8_header(shape=(1, 1, 576), nbytes: int | None = None) -> list:
    nbytes = int8_nbytes(shape) if nbytes is None else nbytes
    return [m.PROTOCOL_VERSION, m.Step.TYPE_ID, 42, "s", 0, [INT8_NAME, list(shape), nbytes], b""]


def frame_from_header(header: list, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    pad = -(8 + len(packed)) % 8 if payload else 0
    body = struct.pack(">I", len(packed)) + packed + b"\0" * pad + payload
    return struct.pack(">I", len(body)) + body


def test_int8_limits_apply_from_the_header_on_both_sides():
    floats_only = Limits(allowed_dtypes=("float32", "float16", "bfloat16"))
    step = m.Step(1, "s", 0, to_wire(hidden_states((1, 2, 64)), "int8"))
    with pytest.raises(LimitExceeded, match=INT8_NAME):
        encode(step, floats_only)
    with pytest.raises(LimitExceeded, match=INT8_NAME):
        decode(bytearray(encode_bytes(step)), floats_only)
    # too many tokens, or more floats than a frame may hold: refused with no payload at all
    for shape in [(1, m.MAX_STEP_TOKENS + 1, 4), (1, 1, 1 << 20)]:
        with pytest.raises(LimitExceeded):
            decode(bytearray(frame_from_header(int8_header(shape))), Limits(max_frame_bytes=1 << 20))
    big = m.Step(1, "s", 0, to_wire(torch.randn(1, 8, 4096), "int8"))  # 128 KiB of floats
    with pytest.raises(LimitExceeded, match="decodes to"):
        encode(big, Limits(max_frame_bytes=100_000))  # its int8 frame (33 KiB) would fit
    with pytest.raises(LimitExceeded, match="decodes to"):
        decode(bytearray(encode_bytes(big)), Limits(max_frame_bytes=100_000))


def test_malformed_int8_tensors_are_frame_errors():
    shape = (1, 2, 70)
    good = encode_bytes(m.Step(1, "s", 0, to_wire(hidden_states(shape), "int8")))
    with pytest.raises(FrameError, match="needs"):  # nbytes disagrees with the shape
        decode(bytearray(frame_from_header(int8_header(shape, int8_nbytes(shape) - 1),
                                           b"\0" * (int8_nbytes(shape) - 1))))
    with pytest.raises(FrameError, match="truncated"):
        decode(bytearray(frame_from_header(int8_header(shape), b"\0" * 100)))
    for position in (70, -1, 2**31 - 1):
        payload = bytearray(int8_nbytes(shape))
        at = 4 * 2 * 2 + 4 * 2 * 4  # past the scales and the outliers: the first position
        payload[at : at + 4] = struct.pack("<i", position)
        with pytest.raises(FrameError, match="outlier position"):
            decode(bytearray(frame_from_header(int8_header(shape), bytes(payload))))
    q = to_wire(hidden_states(shape), "int8")
    bad = q.clone().as_subclass(Blockwise8)
    bad.parts = compress.Int8Parts(q.parts.scales[..., :1].contiguous(), q.parts.outliers,
                                   q.parts.positions, q.parts.codes)
    with pytest.raises(FrameError, match="parts"):
        encode(m.Step(1, "s", 0, bad))
    assert isinstance(decode(bytearray(good)), m.Step)


def _int8_frames() -> list[bytes]:
    frames = []
    for shape in [(1, 1, 576), (2, 3, 70), (1, 2, 3)]:
        frames += [encode_bytes(msg) for msg in int8_messages(hidden_states(shape))]
    return frames


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(_int8_frames()),
    st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 64),
)
def test_fuzz_mutated_int8_frames_only_protocol_errors(frame, edits, cut):
    mutated = bytearray(frame)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    if cut:
        del mutated[-cut:]
    try:
        msg = decode(mutated)
    except ProtocolError:
        return
    assert type(msg) in m.MESSAGE_TYPES.values()


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.one_of(st.integers(-5, 1 << 21), st.text(max_size=3), st.none()), max_size=4),
    st.one_of(st.integers(-10, 1 << 40), st.none(), st.text(max_size=3)),
    st.binary(max_size=2048),
)
def test_fuzz_int8_descriptors_only_protocol_errors(shape, nbytes, payload):
    header = [m.PROTOCOL_VERSION, m.Step.TYPE_ID, 1, "s", 0, [INT8_NAME, shape, nbytes], b""]
    try:
        decode(bytearray(frame_from_header(header, payload)))
    except ProtocolError:
        pass


# ---------------------------------------------------------------------------- commitments


@pytest.mark.parametrize("seed", range(4))
def test_an_int8_output_commits_like_its_float32_recomputation(seed):
    """The receipt commits to the decoded tensor (the client checks it exactly); an audit or
    slashing evidence recomputes in float32 and must find it as close as fp32's own
    rounding: the committed top-4 values travel exactly."""
    x = hidden_states((1, 16, 576), seed=seed)
    q = to_wire(x, "int8")
    check_commitment(commit(q), decode(bytearray(encode_bytes(m.StepResult(1, "s", 0, q)))).hidden)
    assert commitment_distance(commit(q), x) <= 5e-4  # fp16 rounding of committed values
    assert commitment_distance(commit(q), to_wire(x * 1.0001, "int8")) < AUDIT_TOLERANCE / 10
    assert commitment_distance(commit(q), x + 0.2 * x.pow(2).mean(-1, keepdim=True).sqrt()
                               * torch.randn_like(x)) > AUDIT_TOLERANCE  # noise still shows


# ---------------------------------------------------------------------------- in a swarm


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


@pytest.fixture
def sent_forms(monkeypatch):
    """The form of every Step / StepResult / Forward tensor sent over the memory transport."""
    from layerchain.wire import memory

    forms: list[tuple[str, str]] = []
    original = memory.encode

    def spy(msg, limits=codec.DEFAULT_LIMITS):
        if isinstance(msg, (m.Step, m.StepResult, m.Forward)):  # Forward: push mode's hops
            h = msg.hidden
            forms.append((type(msg).__name__,
                          "int8" if type(h) is Blockwise8 else str(h.dtype).removeprefix("torch.")))
        return original(msg, limits)

    monkeypatch.setattr(memory, "encode", spy)
    return forms


@pytest.mark.parametrize("wire, form", [("int8", "int8"), ("fp16", "float16")])
def test_an_audited_swarm_on_a_compressed_wire_raises_no_alarm(tiny_model, tmp_path, sent_forms,
                                                              wire, form):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for i in range(2):
                await swarm.add_node(0, 2, tmp_path / f"a{i}")
                await swarm.add_node(2, 4, tmp_path / f"b{i}")
            client = swarm.client(audit_rate=1.0, wire=wire)  # every step of every hop
            return await client.generate(PROMPT, PARAMS), client
        finally:
            await swarm.close()

    result, client = run(main())
    assert len(result.token_ids) == PARAMS.max_new_tokens
    assert result.disputes == () and result.recoveries == ()
    assert result.audited_steps >= 2 * PARAMS.max_new_tokens  # both hops, every step
    assert client.peers.banned() == set()
    assert {kind for kind, _ in sent_forms} >= {"Step", "StepResult"}
    assert {f for _, f in sent_forms} == {form}  # both ways, every hop, audits included


def test_a_cheater_on_an_int8_wire_is_still_caught_and_convicted(tiny_model, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            cheater = await swarm.add_node(0, 2, tmp_path / "cheater", misbehave="noise")
            await swarm.add_node(2, 4, tmp_path / "next")
            for i in range(2):
                for start, end in ((0, 2), (2, 4)):
                    await swarm.add_node(start, end, tmp_path / f"spare{start}{i}",
                                         emulate_latency_ms=5)
            client = swarm.client(audit_rate=0.25, wire="int8")
            return await client.generate(PROMPT, PARAMS), client, cheater
        finally:
            await swarm.close()

    result, client, cheater = run(main())
    assert [d.peer_id for d in result.disputes] == [cheater.peer_id]
    assert cheater.peer_id in client.peers.banned()
    assert cheater.peer_id not in {h.peer_id for h in result.route}
    evidence = result.disputes[0].evidence
    assert evidence is not None  # checked by a third party recomputing in float32
    verdict = check_evidence(evidence, load_span(client.spec, 0, 2))
    assert verdict.guilty and verdict.accused == cheater.wallet


def test_a_node_refuses_an_unknown_wire_form_with_limit_exceeded(tiny_model, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            node = await swarm.add_node(0, 4, tmp_path)
            with pytest.raises(LimitExceeded, match="wire form"):
                await node.handle(m.OpenSession(0, "s", node.spec.model_id, 0, 4, 8, wire="int4"))
            assert len(node.sessions) == 0  # refused before any cache was reserved
            opened = await node.handle(m.OpenSession(0, "t", node.spec.model_id, 0, 4, 8,
                                                     wire="int8"))
            assert isinstance(opened, m.SessionOpened)
            x = hidden_states((1, 3, 64))
            result = await node.handle(m.Step(0, "t", 0, to_wire(x, "int8")))
            assert type(result.hidden) is Blockwise8  # replied in the session's form
        finally:
            await swarm.close()

    run(main())


def test_push_mode_forwards_int8_and_answers_as_pull_does(tiny_model, tmp_path, sent_forms):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for start, end in ((0, 1), (1, 3), (3, 4)):
                await swarm.add_node(start, end, tmp_path / f"n{start}")
            results = []
            for push in (False, True):
                client = swarm.client(audit_rate=0.0, wire="int8", push=push)
                results.append(await client.generate(PROMPT, PARAMS))
            return results
        finally:
            await swarm.close()

    pulled, pushed = run(main())
    assert pushed.token_ids == pulled.token_ids and not pushed.recoveries
    assert "Forward" in {kind for kind, _ in sent_forms}  # hops forwarded to each other
    assert {f for _, f in sent_forms} == {"int8"}

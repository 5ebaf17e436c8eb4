"""Commitments: exact and deterministic bytes, a lying node caught on the spot, and the
honest distance distribution that sets AUDIT_TOLERANCE (with every cheating mode far above).

The distance tables in the report come from ``test_honest_distances_on_smollm2`` (run with
``-s`` to print them): one decode through three hops, replayed as an audit replays it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest
import torch

from layerchain.client.rules import KNOWN_NORMS, MIN_RMS_RATIO, NORM_MARGIN, check_output
from layerchain.errors import InvalidOutput
from layerchain.market import ReceiptSigner, ReceiptVerifier, Wallet
from layerchain.market.commitment import (
    AUDIT_TOLERANCE,
    COMMITMENT_BYTES_PER_TOKEN,
    TOP_K,
    check_commitment,
    commit,
    commitment_agrees,
    commitment_distance,
    decode,
    token_distances,
)
from layerchain.market.receipts import SignedReceipt
from layerchain.model import load_head, load_span, resolve_model
from layerchain.model.span import SpanModel
from layerchain.node.misbehave import MODES, Misbehavior, cheating_span
from layerchain.types import Span
from layerchain.wire.messages import MAX_STEP_TOKENS

H = 576


def _hidden(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, tokens, H, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the bytes


def test_commitment_is_16_bytes_per_token_top_k_largest_first():
    hidden = _hidden(7)
    hidden[0, 3, [10, 400, 99, 575]] = torch.tensor([-90.0, 80.0, 70.0, -60.0])
    data = commit(hidden)
    assert COMMITMENT_BYTES_PER_TOKEN <= 16 and len(data) == 7 * COMMITMENT_BYTES_PER_TOKEN
    positions, values = decode(data, 7)
    assert positions[3].tolist() == [10, 400, 99, 575]
    assert values[3].tolist() == [-90.0, 80.0, 70.0, -60.0]
    for t in range(7):  # every token: its own top-k, largest |value| first
        expected = hidden[0, t].abs().topk(TOP_K).indices.tolist()
        assert positions[t].tolist() == expected


def test_commitment_is_deterministic_across_layouts_dtypes_and_ties():
    hidden = _hidden(5)
    strided = torch.cat([hidden, hidden], dim=2)[:, :, ::2]  # same values, not contiguous
    strided.copy_(hidden)
    assert not strided.is_contiguous() and commit(strided) == commit(hidden)
    half = hidden.to(torch.bfloat16)
    assert commit(half) == commit(half.float())  # a dtype's values, not its bytes
    # ties (a zero tensor, saturated values): the lower index first, on every platform
    zeros = torch.zeros(1, 2, H)
    assert decode(commit(zeros), 2)[0].tolist() == [[0, 1, 2, 3]] * 2
    tied = torch.zeros(1, 1, H)
    tied[0, 0, [500, 7, 300, 42, 9]] = 3.0
    assert decode(commit(tied), 1)[0].tolist() == [[7, 9, 42, 300]]
    assert commit(torch.zeros(1, 0, H)) == b""


def _general_commit(hidden: torch.Tensor) -> bytes:
    """``commit`` without its one-token fast path: the torch ops that define the bytes."""
    return commit(torch.cat([hidden, hidden], dim=1))[:COMMITMENT_BYTES_PER_TOKEN]


def test_one_token_fast_path_gives_the_general_paths_bytes():
    # a decode step's commitment takes numpy's path (commitment._commit_token): the same
    # bytes as the torch ops of any other shape, over scales from fp16 subnormals to past
    # fp16's range, ties, zeros, infinities, NaN, every dtype and a strided layout
    gen = torch.Generator().manual_seed(7)
    cases = [torch.randn(1, 1, H, generator=gen) * 10.0 ** (i % 13 - 8) for i in range(400)]
    tied = torch.randn(1, 1, H, generator=gen)
    tied[0, 0, [3, 200, 9]] = 50.0  # a three-way tie at the top
    edge = torch.randn(1, 1, H, generator=gen)
    edge[0, 0, [5, 6, 7, 8, 9]] = torch.tensor([9.0, 8.0, 7.0, 6.0, 6.0])  # tie at K, K+1
    special = torch.randn(1, 1, H, generator=gen)
    special[0, 0, [1, 2]] = torch.tensor([float("inf"), float("-inf")])
    nan = torch.randn(1, 1, H, generator=gen)
    nan[0, 0, 17] = float("nan")
    one_inf = torch.randn(1, 1, H, generator=gen)
    one_inf[0, 0, 40] = float("-inf")
    cases += [tied, edge, special, nan, one_inf, torch.zeros(1, 1, H), -torch.zeros(1, 1, H),
              torch.randn(1, 1, 5, generator=gen), torch.randn(1, 1, 3, generator=gen)]
    cases += [c.to(dtype) for c in cases[:20] for dtype in (torch.float16, torch.bfloat16)]
    wide = torch.randn(1, 1, 2 * H, generator=gen)
    cases.append(wide[:, :, ::2])  # not contiguous
    for case in cases:
        assert commit(case) == _general_commit(case)
    assert decode(commit(tied), 1)[0].tolist()[0][:3] == [3, 9, 200]  # lower index first
    assert decode(commit(edge), 1)[0].tolist()[0] == [5, 6, 7, 8]


def test_struct_rounds_to_float16_as_numpy_does():
    # the fast path packs values with struct's "e": every finite float16, every midpoint
    # between two of them and the float32 values either side of it round as numpy's cast
    exact = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mid = ((exact[:-1] + exact[1:]) / 2).astype(np.float32)
    values = np.concatenate([exact.astype(np.float32), mid, np.nextafter(mid, np.float32(0)),
                             np.nextafter(mid, np.float32(np.inf))])
    values = np.concatenate([values, -values]).clip(-65504.0, 65504.0)
    packed = b"".join(struct.pack("<e", v) for v in values.tolist())
    assert packed == values.astype("<f2").tobytes()


def test_check_commitment_refuses_a_commitment_of_another_tensor():
    hidden = _hidden(3)
    check_commitment(commit(hidden), hidden)
    other = hidden.clone()
    top = int(other[0, 1].abs().argmax())
    other[0, 1, top] *= 1.01  # one committed value moved by 1%
    with pytest.raises(InvalidOutput, match="signed another output"):
        check_commitment(commit(other), hidden)
    with pytest.raises(InvalidOutput, match="signed another output"):
        check_commitment(b"", hidden)  # no commitment at all
    with pytest.raises(InvalidOutput):
        commitment_distance(commit(hidden)[:-1], hidden)  # truncated
    with pytest.raises(InvalidOutput, match=r"\[1, T, H\]"):
        commit(torch.zeros(2, 1, H))


def test_distance_is_zero_for_the_same_tensor_and_large_for_others():
    hidden = _hidden(4)
    assert commitment_distance(commit(hidden), hidden) < 5e-4  # fp16 rounding of the values
    assert commitment_agrees(commit(hidden), hidden)
    assert commitment_distance(commit(hidden), torch.zeros_like(hidden)) == 1.0
    assert commitment_distance(commit(hidden), _hidden(4, seed=1)) > 0.5
    # committed positions that are no longer the top-k: the rank error sees it
    moved = hidden.clone()
    moved[0, 2, int(hidden[0, 2].abs().argmin())] = 100.0
    per_token = token_distances(commit(hidden), moved)
    assert per_token[2] > 0.9 and per_token[[0, 1, 3]].max() < 5e-4


def test_a_node_lying_in_its_commitment_is_caught_on_the_spot():
    """The receipt is validly signed and names the right tensors' hashes, but commits to
    another output than the one returned: ReceiptVerifier.check raises InvalidOutput and
    does not advance the chain; the honest receipt then passes."""
    wallet, span = Wallet.generate(), Span(0, 4)
    signer = ReceiptSigner(wallet, "s", "m", span, 1)
    verifier = ReceiptVerifier(wallet.address, "s", "m", span, 1)
    x, out = _hidden(2), _hidden(2, seed=5)
    lying = signer.sign_step(0, 2, x, out, fingerprint=commit(out * 1.5))
    with pytest.raises(InvalidOutput, match="signed another output"):
        verifier.check(lying, x, out)
    assert verifier.next_step == 0
    honest = ReceiptSigner(wallet, "s", "m", span, 1).sign_step(0, 2, x, out)
    assert SignedReceipt.from_bytes(honest).receipt.fingerprint == commit(out)
    verifier.check(honest, x, out)
    assert verifier.next_step == 1


# ------------------------------------------------------------------ the distribution


def _decode_through_hops(
    span: SpanModel, head, hops: list[tuple[int, int]], prompt: int, steps: int,
    dtype: torch.dtype, chunk: int = MAX_STEP_TOKENS,
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """A greedy decode as a swarm runs it: ``prompt`` tokens in Steps of at most ``chunk``,
    then ``steps`` one-token Steps, through ``hops`` (each with its own cache), hidden
    states on the wire in ``dtype``. Returns each hop's Step inputs and outputs."""
    caches = [span.new_cache(a, b) for a, b in hops]
    inputs: list[list[torch.Tensor]] = [[] for _ in hops]
    outputs: list[list[torch.Tensor]] = [[] for _ in hops]
    ids = torch.randint(3, 200, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    with torch.inference_mode():
        hidden = head.embed(ids).to(dtype)
        for _ in range(steps):
            for h, cache in enumerate(caches):
                parts = []
                for part in torch.split(hidden, chunk, dim=1):
                    out = span.forward(part.float(), cache).to(dtype)  # as the node does
                    inputs[h].append(part)
                    outputs[h].append(out)
                    parts.append(out)
                hidden = torch.cat(parts, dim=1)
            token = head.logits(hidden[:, -1:].float())[0, -1].argmax()
            hidden = head.embed(token.view(1, 1)).to(dtype)
    return inputs, outputs


def _replay(span: SpanModel, hop: tuple[int, int], inputs: list[torch.Tensor], chunk: int) -> list[torch.Tensor]:
    """What an auditor computes: the hop's whole history from a fresh cache, in prefill
    chunks of ``chunk`` tokens, cut back into the original steps."""
    cache = span.new_cache(*hop)
    history = torch.cat(inputs, dim=1)
    with torch.inference_mode():
        out = torch.cat([span.forward(p.float(), cache) for p in torch.split(history, chunk, dim=1)], dim=1)
    return list(torch.split(out.to(inputs[0].dtype), [x.shape[1] for x in inputs], dim=1))


def _distances(
    span: SpanModel, hops: list[tuple[int, int]], inputs, committed: list[list[bytes]], chunk: int
) -> list[float]:
    return [
        commitment_distance(c, ref)
        for h, hop in enumerate(hops)
        for c, ref in zip(committed[h], _replay(span, hop, inputs[h], chunk), strict=True)
    ]


def _cheat_distances(
    cheat_span: SpanModel, hops: list[tuple[int, int]], inputs, honest: list[list[torch.Tensor]],
    mode: str,
) -> list[float]:
    """Distances between a cheater's commitments (hop by hop, on the honest inputs) and the
    honest outputs: what an audit of each of its steps would see. ``cheat_span``: the span
    the cheater computes with (``cheating_span(mode, span)``)."""
    found = []
    for h, (a, b) in enumerate(hops):
        cheat = Misbehavior(mode, seed=h)
        cache = cheat_span.new_cache(a, b)
        for step, (x, ref) in enumerate(zip(inputs[h], honest[h], strict=True)):
            with torch.inference_mode():
                out = cheat.output("s", cheat_span.forward(x.float(), cache).to(x.dtype))
            if mode == "stale" and step == 0:
                continue  # honest: nothing to replay yet
            found.append(commitment_distance(commit(out), ref))
    return found


def _table(name: str, distances: list[float]) -> str:
    d = torch.tensor(distances)
    over = float((d > AUDIT_TOLERANCE).float().mean())
    return (f"{name:38s} steps={len(d):4d} max={d.max():.2e} p50={d.median():.2e} "
            f"min={d.min():.2e} over_tolerance={over:.0%}")


# (decode threads, wire dtype, prefill chunk): the audit replays at the other thread count
ALL_CASES = [(1, torch.float32, MAX_STEP_TOKENS), (2, torch.float32, 5),
             (1, torch.bfloat16, MAX_STEP_TOKENS), (2, torch.bfloat16, 5)]
FEW_CASES = [ALL_CASES[0], ALL_CASES[3]]  # the fast test's share: each factor varies once


def _honest_and_cheating(
    span: SpanModel, head, hops, prompt: int, steps: int, cases=ALL_CASES
) -> tuple[dict, dict]:
    """{case: honest distances}, {mode: cheating distances} for one model: the decode runs
    at (threads, wire dtype, prefill chunk) of each case; the audit replays it at the other
    thread count, in one prefill or in chunks of 3; cheats run at 1 thread, whole prefills."""
    honest, cheating = {}, {}
    cheat_spans: dict[str, SpanModel] = {}
    torch_threads = torch.get_num_threads()
    try:
        for threads, dtype, chunk in cases:
            torch.set_num_threads(threads)
            inputs, outputs = _decode_through_hops(span, head, hops, prompt, steps, dtype, chunk)
            committed = [[commit(o) for o in hop] for hop in outputs]
            torch.set_num_threads(3 - threads)  # the auditor runs another thread count
            for replay_chunk in (MAX_STEP_TOKENS, 3):
                case = (f"{threads}->{3 - threads} threads {str(dtype)[6:]} "
                        f"chunk {chunk}->{replay_chunk}")
                honest[case] = _distances(span, hops, inputs, committed, replay_chunk)
            if threads == 1 and chunk == MAX_STEP_TOKENS:
                replayed = [_replay(span, hop, inputs[h], MAX_STEP_TOKENS) for h, hop in enumerate(hops)]
                for mode in MODES:
                    if mode not in cheat_spans:  # built once per model (``model``: a copy)
                        cheat_spans[mode] = cheating_span(mode, span)
                    cheating[f"{mode} {str(dtype)[6:]}"] = _cheat_distances(
                        cheat_spans[mode], hops, inputs, replayed, mode)
    finally:
        torch.set_num_threads(torch_threads)
    return honest, cheating


def _check_separation(honest: dict, cheating: dict, report: Callable[[str], None]) -> None:
    for case, found in honest.items():
        report(_table("honest " + case, found))
    for mode, found in cheating.items():
        report(_table(mode, found))
    worst_honest = max(max(found) for found in honest.values())
    assert worst_honest < AUDIT_TOLERANCE / 2, "an honest recomputation came near the tolerance"
    for mode, found in cheating.items():
        d = torch.tensor(found)
        if mode.startswith("sometimes"):  # ~20% of its steps are wrong; those are far off
            assert 0.05 < float((d > AUDIT_TOLERANCE).float().mean()) < 0.5, mode
        else:  # an always-cheating node: (nearly) every step of it is caught by an audit
            assert float((d > AUDIT_TOLERANCE).float().mean()) >= 0.9, mode


def test_honest_distances_stay_far_below_the_tolerance_and_cheats_far_above(tiny_model_dir):
    """Tiny llama (hidden 64, 4 blocks), two hops: every way an honest audit may recompute
    a step (1 vs 2 threads, decode vs prefill replay, chunk sizes, fp32 vs bf16 on the
    wire) stays below half the tolerance; each cheating mode is caught on >= 90% of steps."""
    spec = resolve_model(str(tiny_model_dir("llama")))
    span, head = load_span(spec, 0, 4), load_head(spec)
    honest, cheating = _honest_and_cheating(
        span, head, [(0, 2), (2, 4)], prompt=9, steps=12, cases=FEW_CASES
    )
    _check_separation(honest, cheating, print)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_honest_distances_on_smollm2(smollm2_spec):
    """The same on SmolLM2-135M, three hops over its 30 blocks: the numbers in the report."""
    span, head = load_span(smollm2_spec, 0, 30), load_head(smollm2_spec)
    honest, cheating = _honest_and_cheating(span, head, [(0, 7), (7, 19), (19, 30)], prompt=20, steps=16)
    _check_separation(honest, cheating, print)


# ------------------------------------------------------------------ cheap invariants


SMOLLM2_ID = "af9f6628276edc2bac4732d4a065228e579b6fe8b0ffb4bf2a28d2496b523c03"


def _with_rms(rms: float, tokens: int = 3) -> torch.Tensor:
    x = _hidden(tokens)
    return x / x.pow(2).mean(dim=-1, keepdim=True).sqrt() * rms


def test_check_output_refuses_collapsed_and_out_of_range_norms():
    sent = _with_rms(10.0)
    check_output("p", sent, _with_rms(12.0), model_id=SMOLLM2_ID, end=30, input_trusted=True)
    with pytest.raises(InvalidOutput, match="collapsed"):
        check_output("p", sent, torch.zeros_like(sent))  # any model, any input: never honest
    low, high = KNOWN_NORMS[SMOLLM2_ID][30]
    for rms in (low / NORM_MARGIN / 2, high * NORM_MARGIN * 2):
        with pytest.raises(InvalidOutput, match="outside this model's"):
            check_output("p", sent, _with_rms(rms), model_id=SMOLLM2_ID, end=30, input_trusted=True)
        # the input came from another peer (maybe a cheater): the range blames nobody
        check_output("p", sent, _with_rms(rms), model_id=SMOLLM2_ID, end=30)
    check_output("p", sent, _with_rms(high * NORM_MARGIN * 2), model_id="another model", end=30,
                 input_trusted=True)
    assert len(KNOWN_NORMS[SMOLLM2_ID]) == 31 and MIN_RMS_RATIO < 0.27  # SmolLM2's lowest ratio


def _verdict(sent: torch.Tensor, received: torch.Tensor, **options) -> str:
    try:
        check_output("p", sent, received, **options)
    except InvalidOutput as error:
        return str(error).split(" returned ")[1].split(" ")[0]  # "non-finite", "hidden", ...
    return "ok"


def test_check_output_of_one_token_decides_as_the_general_path():
    # a decode step's token [1, 1, H] float32 takes two dot products (rules._token_norms);
    # the same token twice ([1, 2, H]) takes the torch path: the same verdicts
    low, high = KNOWN_NORMS[SMOLLM2_ID][30]
    sent = _with_rms(10.0, tokens=1)
    cases = [_with_rms(rms, tokens=1) for rms in (0.0, 1.0, 2.6, 3.0, 12.0, low / NORM_MARGIN / 2,
                                                  high * NORM_MARGIN * 2)]
    for value in (float("nan"), float("inf"), float("-inf"), 3e38):
        bad = _with_rms(12.0, tokens=1)
        bad[0, 0, 100] = value
        cases.append(bad)
    cases.append(torch.full((1, 1, H), 1e20))  # squares past float32: still finite values
    for inputs in (sent, torch.full((1, 1, H), 1e20), sent * float("inf")):
        for received in cases:
            for options in ({}, {"model_id": SMOLLM2_ID, "end": 30, "input_trusted": True}):
                one = _verdict(inputs, received, **options)
                assert one == _verdict(torch.cat([inputs] * 2, 1), torch.cat([received] * 2, 1),
                                       **options)
    assert [_verdict(sent, c) for c in cases[-5:]] == ["non-finite"] * 3 + ["ok"] * 2
    assert _verdict(sent, cases[0]) == "hidden"  # collapsed


@pytest.mark.slow
def test_norm_ranges_of_the_default_model(smollm2_spec, smollm2_tokenizer):
    """Prompts unlike the ones measured for KNOWN_NORMS pass every boundary's check (with
    the first-position attention sink); a first hop returning the embeddings it was sent
    (every block skipped) and a zeroed output are refused."""
    from layerchain.model import encode_prompt

    assert smollm2_spec.model_id == SMOLLM2_ID
    span, head = load_span(smollm2_spec, 0, 30), load_head(smollm2_spec)
    prompts = ["Quelle est la hauteur de la tour Eiffel ?", "SELECT * FROM users WHERE id = 1;",
               "a" * 300, "Summarise: " + "the market opened higher and closed lower. " * 30]
    gen = torch.Generator().manual_seed(11)
    sequences = [torch.tensor([encode_prompt(smollm2_tokenizer, p)]) for p in prompts]
    sequences.append(torch.randint(0, smollm2_spec.config.vocab_size, (1, 100), generator=gen))
    with torch.inference_mode():
        for ids in sequences:
            sent = head.embed(ids)
            for start, end in ((0, 7), (7, 19), (19, 30)):
                out = span.forward(sent, span.new_cache(start, end))
                check_output("p", sent, out, model_id=SMOLLM2_ID, end=end, input_trusted=True)
                sent = out
        embeddings = head.embed(sequences[0])
        with pytest.raises(InvalidOutput, match="outside this model's"):
            check_output("p", embeddings, embeddings.clone(), model_id=SMOLLM2_ID, end=7,
                         input_trusted=True)


@pytest.mark.slow
def test_an_honest_hop_after_a_cheater_is_not_blamed_by_the_norm_ranges(smollm2_spec, smollm2_tokenizer):
    """A noise cheater on blocks 0:15 returns hidden states within range; the honest hop on
    15:30 fed them leaves the range itself (its sink position passes 1.18e3). The range
    check only judges a hop whose input the client computed, so the honest hop passes (an
    audit catches the cheater); judged as before, it would have been banned."""
    from layerchain.model import encode_prompt
    from layerchain.node.misbehave import add_noise

    span, head = load_span(smollm2_spec, 0, 30), load_head(smollm2_spec)
    ids = torch.tensor([encode_prompt(smollm2_tokenizer, "What is the capital of France?")])
    with torch.inference_mode():
        embeddings = head.embed(ids)
        honest = span.forward(embeddings, span.new_cache(0, 15))
        cheat = add_noise(honest, torch.Generator().manual_seed(0))
        check_output("p", embeddings, cheat, model_id=SMOLLM2_ID, end=15, input_trusted=True)
        downstream = span.forward(cheat, span.new_cache(15, 30))
    check_output("p", cheat, downstream, model_id=SMOLLM2_ID, end=30)
    with pytest.raises(InvalidOutput, match="outside this model's"):
        check_output("p", cheat, downstream, model_id=SMOLLM2_ID, end=30, input_trusted=True)

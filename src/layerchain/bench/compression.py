"""Benchmark: activation compression on the wire, its bytes and its effect on greedy tokens.

``layerchain bench compression --json`` prints ``{"rows": [{"wire", "bytes_per_token",
"ratio_vs_fp32", "agreement", "encode_us", "decode_us", "max_commitment_distance"}], ...}``,
one row per wire form (``wire.compress``), on one torch thread:

* ``bytes_per_token``: the frames of one decode step on one hop, both ways: a one-token
  ``Step`` and its ``StepResult``, encoded by the codec as a session in that form sends
  them (voucher and receipt left empty: they weigh the same in every form);
* ``agreement``: teacher-forced, as ``bench.compute`` scores weight forms. On each of
  ``bench.compute.PROMPTS``, fp32 (no compression) decodes ``tokens`` greedy tokens; each
  form then reads the prompt plus that continuation in one pass through a chain of
  ``hops`` spans **in one process**, each hop's input and output crossing the wire form
  exactly as a session's do (``to_wire`` on the client's side and on the node's, the same
  function the codec decodes with), and scores the fraction of positions where its greedy
  choice is fp32's token. One early difference does not count every later token as a miss;
  the real swarm path is the same transform (tests/test_swarm_e2e.py runs ``generate
  --wire int8`` through three node processes against the fp32 answer);
* ``encode_us`` / ``decode_us``: the CPU one transfer of a token costs the sender (the
  form's transform and the frame) and the receiver (``codec_us``), best of 300, one thread;
* ``max_commitment_distance``: the largest ``commitment_distance`` between a hop's output
  as its receipt commits to it (in the form) and as the hop computed it in float32 from the
  same input: what an audit, a referee or slashing evidence recomputes. Honest runs must
  stay far below ``market.commitment.AUDIT_TOLERANCE`` (0.02).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from layerchain.bench.compute import (
    AGREEMENT_TOKENS,
    PROMPTS,
    greedy_continuation,
    prompt_ids,
)
from layerchain.model.spec import DEFAULT_MODEL

WIRES = ("fp32", "fp16", "bf16", "int8")  # client.config.WIRE_NAMES, fp32 first (the reference)


def step_frame_bytes(hidden_size: int, wire: str) -> int:
    """Bytes of a one-token Step and its StepResult frames in ``wire`` (a ClientConfig name)."""
    from layerchain.wire import codec
    from layerchain.wire import messages as m
    from layerchain.wire.compress import to_wire

    form = "" if wire == "fp32" else wire
    x = to_wire(torch.randn(1, 1, hidden_size), form)
    step = m.Step(rid=1, session_id="0" * 32, step=1, hidden=x)
    result = m.StepResult(rid=1, session_id="0" * 32, step=1, hidden=x)
    return len(codec.encode_bytes(step)) + len(codec.encode_bytes(result))


def codec_us(hidden_size: int, wire: str, repeats: int = 300) -> tuple[float, float]:
    """(encode, decode) microseconds of a one-token Step in ``wire``, best of ``repeats``:
    encode = ``to_wire`` (the quantization, for int8) + the codec's frame; decode = the
    codec's (the dequantization, for int8). The CPU a transfer costs, on each side."""
    import time

    from layerchain.wire import codec
    from layerchain.wire import messages as m
    from layerchain.wire.compress import to_wire

    form = "" if wire == "fp32" else wire
    x = torch.randn(1, 1, hidden_size)
    encode = decode = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        frame = bytearray(codec.encode_bytes(m.Step(1, "0" * 32, 1, to_wire(x, form))))
        t1 = time.perf_counter()
        codec.decode(frame)
        t2 = time.perf_counter()
        encode, decode = min(encode, t1 - t0), min(decode, t2 - t1)
    return 1e6 * encode, 1e6 * decode


def hop_bounds(blocks: int, hops: int) -> list[tuple[int, int]]:
    """``hops`` consecutive spans covering ``blocks`` blocks, as even as they split."""
    cuts = [round(i * blocks / hops) for i in range(hops + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def chain_hidden(
    span: Any, head: Any, seq: Sequence[int], bounds: Sequence[tuple[int, int]], form: str
) -> tuple[torch.Tensor, float]:
    """The last hop's output [1, T, H] over token ids ``seq`` through ``bounds`` hops, each
    input and output in wire ``form``; and the largest commitment distance between a hop's
    output as committed (in the form) and as it computed it (what a recomputation from the
    same input gives)."""
    from layerchain.market.commitment import commit, commitment_distance
    from layerchain.wire.compress import to_wire

    x = head.embed(torch.tensor([list(seq)]))
    distance = 0.0
    for start, end in bounds:
        x = to_wire(x, form)  # what the hop decodes
        computed = span(x, None, start=start, end=end)
        x = to_wire(computed, form)  # what it returns, and commits to
        distance = max(distance, commitment_distance(commit(x), computed))
    return x, distance


def run_compression_bench(
    model: str = DEFAULT_MODEL,
    wires: Sequence[str] = WIRES,
    hops: int = 3,
    tokens: int = AGREEMENT_TOKENS,
    prompts: Sequence[str] = PROMPTS,
) -> dict[str, Any]:
    """The rows of the module docstring, and how they were measured."""
    from layerchain.model import LocalModel, resolve_model

    torch.set_num_threads(1)  # one thread per process (docs/BENCHMARKS.md, the OpenMP fix)
    spec = resolve_model(model)
    reference_model = LocalModel(spec)
    span, head = reference_model.span, reference_model.head
    bounds = hop_bounds(spec.num_blocks, hops)
    encoded = prompt_ids(spec, prompts)
    references = [greedy_continuation(reference_model, ids, tokens) for ids in encoded]
    rows = []
    fp32_bytes = step_frame_bytes(spec.hidden_size, "fp32")
    with torch.inference_mode():
        for wire in wires:
            form = "" if wire == "fp32" else wire
            agreed = distance = 0.0
            for ids, ref in zip(encoded, references, strict=True):
                hidden, far = chain_hidden(span, head, [*ids, *ref[:-1]], bounds, form)
                picks = head.logits(hidden[:, len(ids) - 1 :])[0].argmax(dim=-1)
                agreed += float((picks == torch.tensor(ref)).float().mean())
                distance = max(distance, far)
            frame_bytes = step_frame_bytes(spec.hidden_size, wire)
            encode_us, decode_us = codec_us(spec.hidden_size, wire)
            rows.append({
                "wire": wire,
                "bytes_per_token": frame_bytes,
                "ratio_vs_fp32": round(frame_bytes / fp32_bytes, 4),
                "agreement": round(agreed / len(encoded), 4),
                "max_commitment_distance": round(distance, 6),
                "encode_us": round(encode_us, 1),
                "decode_us": round(decode_us, 1),
            })
    return {
        "model": spec.name,
        "hidden_size": spec.hidden_size,
        "hops": [list(b) for b in bounds],
        "prompts": len(encoded),
        "tokens_per_prompt": tokens,
        "agreement_method": "teacher-forced, span chain in one process, wire transform "
                            "between hops",
        "bytes_method": "one-token Step + StepResult frames per hop (no voucher, no receipt)",
        "rows": rows,
    }

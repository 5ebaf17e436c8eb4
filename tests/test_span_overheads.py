"""The per-step shortcuts of a span give the bits the plain path gives.

``LeanDecode`` (one-token steps of llama-shaped blocks without the decoder layer's dispatch)
and the per-step rotary tables shared by the blocks of a stepwise forward must not move a
single bit: the swarm matches the single-process reference token for token, and an audit
recomputes what a node returned. Checked over a prefill and decode steps, across the growth
of an unbounded cache and a sliding window, after the truncation an audit's replay relies on,
for every family (those without a lean path must keep the plain one).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from layerchain.errors import SpanError
from layerchain.model import load_span, resolve_model
from layerchain.model.span import LEAN_FAMILIES, LeanDecode

FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gemma")
PROMPT, DECODE = 5, 70  # tokens: the decode steps cross the tiny models' window (8) and an
# unbounded cache's first capacity (64), so it grows while decoding


def inputs(hidden: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A prompt [1, PROMPT, H] and DECODE one-token inputs [1, 1, H]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, PROMPT, hidden, generator=g), [
        torch.randn(1, 1, hidden, generator=g) for _ in range(DECODE)
    ]


def decode_run(
    span, prompt, tokens, *, fast: bool, max_length: int | None = None, native: bool = False
):
    """Outputs [1, PROMPT + DECODE, H] of a prefill then one-token steps, and lean calls
    (``native``: the native path where it applies, tests/test_native_step.py; else off)."""
    span.fast_decode = fast
    native_was, span.native_decode = span.native_decode, native and span.native_decode
    cache = span.new_cache(max_length=max_length)
    calls = []
    real = LeanDecode.__call__

    def counting(self, *args):
        calls.append(1)
        return real(self, *args)

    try:
        with mock.patch.object(LeanDecode, "__call__", counting):
            outs = [span.forward(prompt, cache)] + [span.forward(t, cache) for t in tokens]
    finally:
        span.fast_decode = span._lean is not None
        span.native_decode = native_was
    return torch.cat(outs, dim=1), len(calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lean_decode_path_gives_the_plain_paths_bits(family, tiny_model_dir):
    spec = resolve_model(tiny_model_dir(family))
    span = load_span(spec, 0, spec.num_blocks)
    prompt, tokens = inputs(spec.hidden_size)
    plain, plain_calls = decode_run(span, prompt, tokens, fast=False)
    lean, lean_calls = decode_run(span, prompt, tokens, fast=True)
    assert plain_calls == 0
    if family in LEAN_FAMILIES:
        # the lean path ran for every block of every step that needs no mask: all of them
        # for llama; only while within the window for the sliding layers of mistral, qwen2
        assert lean_calls > 0
        if family == "llama":
            assert lean_calls == DECODE * spec.num_blocks
        else:
            assert lean_calls < DECODE * spec.num_blocks
    else:
        assert span._lean is None and lean_calls == 0
    assert torch.equal(lean, plain)
    # and a preallocated cache (no growth) gives the same bits as the growing one
    bounded, _ = decode_run(span, prompt, tokens, fast=True, max_length=PROMPT + DECODE)
    assert torch.equal(bounded, plain)
    # and the default path (native where built and it applies) too
    default, _ = decode_run(span, prompt, tokens, fast=True, native=True)
    assert torch.equal(default, plain)


def test_the_default_model_decodes_the_same_bits_either_way(smollm2_spec):
    span = load_span(smollm2_spec, 0, 3)
    prompt, tokens = inputs(smollm2_spec.hidden_size)
    plain, _ = decode_run(span, prompt, tokens[:6], fast=False)
    lean, calls = decode_run(span, prompt, tokens[:6], fast=True)
    assert calls == 6 * 3 and torch.equal(lean, plain)


def test_the_stepwise_forward_gives_forwards_bits(tiny_model_dir):
    """``forward_stepwise`` computes the step's rotary tables once for all its blocks."""
    for family in ("llama", "qwen2"):
        spec = resolve_model(tiny_model_dir(family))
        span = load_span(spec, 0, spec.num_blocks)
        prompt, tokens = inputs(spec.hidden_size, seed=3)
        whole, stepwise = span.new_cache(), span.new_cache()
        for x in [prompt, *tokens[:12]]:
            expected = span.forward(x, whole)
            *_, got = span.forward_stepwise(x, stepwise)
            assert torch.equal(got, expected)
        assert stepwise.length == whole.length == PROMPT + 12
        with mock.patch.object(span.rotary_emb, "forward", wraps=span.rotary_emb.forward) as rope:
            list(span.forward_stepwise(tokens[12], stepwise))
        assert rope.call_count == 1  # not once per block


def test_truncation_replays_the_same_bits_as_the_first_time(tiny_model_dir):
    """An audit rolls a cache back and replays steps: the replay must give the same bits,
    on the lean path as on the plain one, and overwrite what the rolled-back steps left."""
    spec = resolve_model(tiny_model_dir("llama"))
    span = load_span(spec, 0, spec.num_blocks)
    prompt, tokens = inputs(spec.hidden_size, seed=5)
    for fast in (True, False):
        span.fast_decode = fast
        cache = span.new_cache(max_length=PROMPT + 20)
        span.forward(prompt, cache)
        first = [span.forward(t, cache) for t in tokens[:10]]
        cache.truncate(PROMPT + 4)
        other = [span.forward(t, cache) for t in tokens[10:13]]  # a different continuation
        cache.truncate(PROMPT + 4)
        again = [span.forward(t, cache) for t in tokens[4:10]]
        assert all(torch.equal(a, b) for a, b in zip(again, first[4:], strict=True))
        assert not torch.equal(other[0], first[4])  # the continuation did differ
        with pytest.raises(SpanError):
            cache.truncate(cache.length + 1)
    span.fast_decode = True


def test_a_full_cache_refuses_a_lean_step_and_keeps_its_length(tiny_model_dir):
    spec = resolve_model(tiny_model_dir("llama"))
    span = load_span(spec, 0, spec.num_blocks)
    prompt, tokens = inputs(spec.hidden_size)
    cache = span.new_cache(max_length=PROMPT + 1)
    span.forward(prompt, cache)
    span.forward(tokens[0], cache)
    with pytest.raises(SpanError, match="cache is full"):
        span.forward(tokens[1], cache)
    assert cache.length == PROMPT + 1


def test_a_cheats_stand_in_blocks_keep_the_plain_path(tiny_model_dir):
    """A span whose layers are not all the family's own blocks (node.misbehave's skip mode)
    never takes the lean path, which assumes their structure."""
    from layerchain.node.misbehave import cheating_span

    spec = resolve_model(tiny_model_dir("llama"))
    span = load_span(spec, 0, spec.num_blocks)
    skipping = cheating_span("skip", span)
    assert span.fast_decode and skipping._lean is None and not skipping.fast_decode
    prompt, tokens = inputs(spec.hidden_size)
    out, calls = decode_run(skipping, prompt, tokens[:3], fast=True)
    assert calls == 0 and out.shape == (1, PROMPT + 3, spec.hidden_size)


def test_bench_step_reports_both_paths_side_by_side(tiny_model_dir):
    from layerchain.bench.step import run_step_bench

    path = tiny_model_dir("llama")
    result = run_step_bench(str(path), blocks=4, context=16, steps=3, rounds=2, threads=0)
    assert result["blocks"] == 4 and result["lean_path"] is True and result["identical"] is True
    for key in ("ms_per_step_p50", "before_ms", "after_ms", "before_cpu_ms", "after_cpu_ms"):
        assert result[key] > 0, key
    shares = (result["matmul_share"], result["attention_share"], result["other_share"])
    assert all(0.0 <= s <= 1.0 for s in shares) and abs(sum(shares) - 1.0) < 0.01
    # the lean path makes fewer calls (counts, unlike times, are the same on a busy machine)
    assert 10 < result["aten_calls_per_block"] <= result["aten_calls_per_block_before"]
    assert result["python_calls_per_block"] < result["python_calls_per_block_before"]
    assert set(result["node_extras_ms"]) == {"commit", "receipt", "codec"}
    assert result["compile"] is None


def test_bench_step_times_a_compact_span_and_counts_its_kernels(tiny_model_dir):
    """``bench step --dtype int4``: the span holds int4 weights, both paths still give the
    same bits, and the int4 kernel's time counts among the matrix products."""
    from layerchain.bench.step import run_step_bench

    path = tiny_model_dir("llama")
    result = run_step_bench(str(path), blocks=2, context=8, steps=2, rounds=1, dtype="int4")
    assert result["dtype"] == "int4" and result["identical"] is True
    assert 0.0 < result["matmul_share"] <= 1.0


def test_a_lean_path_that_drifts_from_the_layers_is_not_used(tiny_model_dir):
    """A transformers release whose blocks compute something the lean path does not mirror
    (here: a stand-in off by one ulp) fails the span's check at load: plain path only."""
    spec = resolve_model(tiny_model_dir("llama"))
    real = LeanDecode.__call__

    def drifting(self, *args):
        out = real(self, *args)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    with mock.patch.object(LeanDecode, "__call__", drifting):
        span = load_span(spec, 0, spec.num_blocks)
    assert span._lean is None and not span.fast_decode
    assert load_span(spec, 0, spec.num_blocks).fast_decode  # the real one passes the check

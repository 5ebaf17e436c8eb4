"""``model.batched.decode_batch``: one-token steps of several sessions as one forward.

Each session keeps its own cache, positions and rotary tables; the linears run over the
stacked rows. A batched row equals the session's solo row up to the last bits (the linears'
blocking) and greedy decoding gives the same tokens, whoever joins or leaves the batch when.
Tiny random models: milliseconds.
"""

from __future__ import annotations

import pytest
import torch

from layerchain.errors import SpanError
from layerchain.model import load_head, load_span, resolve_model
from layerchain.model.batched import batchable, decode_batch

ATOL = 1e-5  # a batched row vs its solo row: float32 rounding of differently blocked matmuls


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    spec = resolve_model(tiny_model_dir("llama"))
    return spec, load_span(spec, 0, spec.num_blocks), load_head(spec)


def greedy(head, hidden: torch.Tensor) -> int:
    return int(head.logits(hidden[:, -1:])[0, -1].argmax())


def test_greedy_sessions_of_different_lengths_and_start_times_match_their_solo_runs(llama):
    """Six sessions with prompts of 1..11 tokens join the batch at different rounds and leave
    at different rounds; every token and every row agrees with the session run alone."""
    spec, span, head = llama
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (1, n), generator=g) for n in (1, 3, 5, 7, 9, 11)]
    joins, leaves = [0, 0, 2, 3, 5, 6], [14, 9, 14, 12, 14, 10]

    def solo(ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
        cache = span.new_cache()
        tokens = [greedy(head, span.forward(head.embed(ids), cache))]
        rows = []
        for _ in range(steps):
            rows.append(span.forward(head.embed(torch.tensor([[tokens[-1]]])), cache))
            tokens.append(greedy(head, rows[-1]))
        return tokens, rows

    expected = [solo(p, leave - join) for p, join, leave in zip(prompts, joins, leaves)]
    caches = [span.new_cache() for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    batch_sizes = []
    for round_ in range(max(leaves) + 1):
        for i, p in enumerate(prompts):
            if joins[i] == round_:  # its prefill, alone (as a node runs it)
                tokens[i].append(greedy(head, span.forward(head.embed(p), caches[i])))
        active = [i for i in range(len(prompts)) if joins[i] < round_ <= leaves[i]]
        if not active:
            continue
        x = head.embed(torch.tensor([[tokens[i][-1]] for i in active]))  # [B, 1, H]
        out = decode_batch(span, x, [caches[i] for i in active])
        batch_sizes.append(len(active))
        for row, i in enumerate(active):
            rows[i].append(out[row : row + 1])
            tokens[i].append(greedy(head, out[row : row + 1]))
    assert max(batch_sizes) >= 5 and min(batch_sizes) <= 2, batch_sizes
    for i, (want_tokens, want_rows) in enumerate(expected):
        assert tokens[i] == want_tokens, i
        assert len(rows[i]) == len(want_rows)
        for got, want in zip(rows[i], want_rows, strict=True):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert caches[i].length == prompts[i].shape[1] + len(want_rows)


def test_a_batch_on_a_sub_range_of_the_span_and_a_batch_of_one(llama):
    spec, span, _ = llama
    g = torch.Generator().manual_seed(2)
    prompt = torch.randn(1, 4, spec.hidden_size, generator=g)
    x = torch.randn(3, 1, spec.hidden_size, generator=g)
    solo = [span.new_cache(1, 3) for _ in range(3)]
    batched = [span.new_cache(1, 3) for _ in range(3)]
    for cache in (*solo, *batched):
        span.forward(prompt, cache)
    out = decode_batch(span, x, batched)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], span.forward(x[i : i + 1], solo[i]),
                                   atol=ATOL, rtol=0)
    one = decode_batch(span, x[:1], batched[:1])  # B = 1 is allowed too
    assert one.shape == (1, 1, spec.hidden_size) and batched[0].length == 6


def test_a_full_cache_fails_the_batch_and_leaves_every_cache_as_it_was(llama):
    """Like a failed forward: no cache advances, so each session can be stepped again alone,
    with the bits it would have had."""
    spec, span, _ = llama
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, 2, spec.hidden_size, generator=g)
    x = torch.randn(2, 1, spec.hidden_size, generator=g)
    caches = [span.new_cache(), span.new_cache(max_length=2)]
    reference = span.new_cache()
    for cache in (*caches, reference):
        span.forward(prompt, cache)
    with pytest.raises(SpanError, match="cache is full"):
        decode_batch(span, x, caches)
    assert [c.length for c in caches] == [2, 2]
    assert torch.equal(span.forward(x[:1], caches[0]), span.forward(x[:1], reference))


def test_what_cannot_be_batched_is_refused(llama, tiny_model_dir):
    spec, span, _ = llama
    H = spec.hidden_size
    with pytest.raises(SpanError, match="same blocks"):
        decode_batch(span, torch.zeros(2, 1, H), [span.new_cache(0, 2), span.new_cache(0, 3)])
    with pytest.raises(SpanError, match="rows"):
        decode_batch(span, torch.zeros(3, 1, H), [span.new_cache(), span.new_cache()])
    with pytest.raises(SpanError, match="decode batch is"):
        decode_batch(span, torch.zeros(2, 2, H), [span.new_cache(), span.new_cache()])
    # blocks without a lean path (phi3, gemma) never batch
    for family in ("phi3", "gemma"):
        other = load_span(resolve_model(tiny_model_dir(family)), 0, 2)
        assert not batchable(other, other.new_cache())
    # a sliding window: batchable while within it, not once a step would need a mask
    mistral = resolve_model(tiny_model_dir("mistral"))  # window 8
    sliding = load_span(mistral, 0, mistral.num_blocks)
    cache = sliding.new_cache()
    sliding.forward(torch.zeros(1, 7, mistral.hidden_size), cache)
    assert batchable(sliding, cache)
    sliding.forward(torch.zeros(1, 1, mistral.hidden_size), cache)
    assert not batchable(sliding, cache)
    with pytest.raises(SpanError, match="cannot be batched"):
        decode_batch(sliding, torch.zeros(1, 1, mistral.hidden_size), [cache])


def test_sliding_window_families_batch_within_their_window(tiny_model_dir):
    """qwen2 (two sliding layers of four) and mistral: rows agree while every layer is
    within its window."""
    for family in ("qwen2", "mistral"):
        spec = resolve_model(tiny_model_dir(family))
        span = load_span(spec, 0, spec.num_blocks)
        g = torch.Generator().manual_seed(4)
        prompts = [torch.randn(1, n, spec.hidden_size, generator=g) for n in (2, 5)]
        solo, batched = [span.new_cache() for _ in prompts], [span.new_cache() for _ in prompts]
        for p, a, b in zip(prompts, solo, batched, strict=True):
            span.forward(p, a)
            span.forward(p, b)
        for _ in range(3):  # lengths 2..4 and 5..7: within a window of 8
            x = torch.randn(2, 1, spec.hidden_size, generator=g)
            out = decode_batch(span, x, batched)
            for i in range(2):
                torch.testing.assert_close(out[i : i + 1], span.forward(x[i : i + 1], solo[i]),
                                           atol=ATOL, rtol=0)


def test_bench_step_times_each_batch_size(tiny_model_dir):
    from layerchain.bench.step import run_step_bench

    path = tiny_model_dir("llama")
    result = run_step_bench(str(path), blocks=4, context=8, steps=2, rounds=1, threads=0,
                            batch=(1, 2, 4))
    rows = result["batch"]
    assert [r["batch"] for r in rows] == [1, 2, 4] and rows[0]["speedup"] == 1.0
    for row in rows:
        assert row["ms_per_step"] > 0 and row["ms_per_token"] * row["batch"] == pytest.approx(
            row["ms_per_step"], abs=0.01)
    assert run_step_bench(str(path), blocks=2, context=4, steps=1, rounds=1)["batch"] is None


def test_the_cli_passes_batch_sizes_and_refuses_bad_ones(monkeypatch):
    from typer.testing import CliRunner

    from layerchain.bench import step
    from layerchain.cli.main import app

    calls = []
    monkeypatch.setattr(step, "run_step_bench", lambda model, **kw: calls.append(kw) or {})
    out = CliRunner().invoke(app, ["bench", "step", "--batch", "1,2,8", "--json"])
    assert out.exit_code == 0, out.output
    assert calls[0]["batch"] == (1, 2, 8)
    for bad in ("1,x", "0,2"):
        out = CliRunner().invoke(app, ["bench", "step", "--batch", bad])
        assert out.exit_code != 0 and "--batch" in out.output

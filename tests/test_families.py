"""Current model families, each exact against transformers' whole model on the same weights.

For Gemma 3 (text), Qwen3, Llama 3.x rope scaling and the mixture-of-experts families
(Qwen3-MoE, Mixtral, OLMoE): a tiny random model (hidden 64) saved as a Hugging Face directory
is resolved, cut into four spans (three split points, one inside a run of gemma 3's
sliding-window layers, the others between experts' blocks) and decoded greedily with KV
caches past the sliding window; every step's logits are within 1e-4 of
``AutoModelForCausalLM`` on the same directory, and the tokens are the same.
"""

from __future__ import annotations

import pytest
import torch

from layerchain.model import load_head, load_span, resolve_model
from layerchain.model.families import FAMILIES

PROMPT_TOKENS, DECODE_STEPS, TOLERANCE = 12, 10, 1e-4
SPLITS = {  # 3 split points each: spans chained in this order
    "gemma3_text": ((0, 1), (1, 3), (3, 4), (4, 6)),  # 1, 4: inside sliding runs (S S F S S F)
}
DEFAULT_SPLITS = ((0, 1), (1, 2), (2, 3), (3, 4))  # MoE: every split between experts' blocks

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# written as the Hub's config.json files write them (old-style rope keys included)
EXTRA: dict[str, dict[str, object]] = {
    "qwen3": dict(head_dim=16, tie_word_embeddings=False),
    "llama3": dict(
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,  # tiny: scaling reaches most dimensions
        ),
        tie_word_embeddings=True,
    ),
    "gemma3_text": dict(
        num_hidden_layers=6,
        head_dim=16,
        sliding_window=4,  # shorter than the prompt: decoding runs past the window
        sliding_window_pattern=3,  # layers S S F S S F
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling=dict(rope_type="linear", factor=8.0),  # global layers only (Gemma 3 4B)
        query_pre_attn_scalar=16,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    ),
    "qwen3_moe": dict(
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
}
MODEL_TYPE = {"llama3": "llama"}  # test name -> transformers model_type
NEW_FAMILIES = tuple(EXTRA)


def family_config(name: str, **overrides: object):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[MODEL_TYPE.get(name, name)](**{**COMMON, **EXTRA[name], **overrides})


def save_random_model(config, path, seed: int = 0):
    """Save a random-weight model of ``config`` into ``path`` (norms moved off their init)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """Factory: ``family_dir(name) -> Path`` of a tiny random model (built once per module)."""
    made = {}

    def make(name: str):
        if name not in made:
            made[name] = save_random_model(family_config(name), tmp_path_factory.mktemp(name))
        return made[name]

    return make


def decode(step, prompt_ids, steps=DECODE_STEPS):
    """Greedy decode: ``step(ids [1, T]) -> logits [1, T, V]``; (logits per step, tokens)."""
    x, logits, tokens = torch.tensor([prompt_ids]), [], []
    with torch.inference_mode():
        for _ in range(steps + 1):
            logits.append(step(x).float())
            tokens.append(int(logits[-1][0, -1].argmax()))
            x = torch.tensor([[tokens[-1]]])
    return logits, tokens


def chain_step(spans, head):
    caches = [s.new_cache() for s in spans]

    def step(x):
        hidden = head.embed(x)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span.forward(hidden, cache)
        return head.logits(hidden)

    return step


def reference_step(model):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    return lambda x: model(input_ids=x, use_cache=True, cache=cache).logits


def assert_same(ours, theirs):
    for step, (a, b) in enumerate(zip(ours[0], theirs[0], strict=True)):
        assert a.shape == b.shape, step
        diff = (a - b).abs().max().item()
        assert diff <= TOLERANCE, f"step {step}: logits differ by {diff}"
    assert ours[1] == theirs[1]


def reference_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def random_prompt(vocab: int, seed: int = 1) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (PROMPT_TOKENS,), generator=gen).tolist()


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_family_spans_match_transformers(name, family_dir):
    path = family_dir(name)
    spec = resolve_model(path)
    config = family_config(name)
    assert (spec.family, spec.kind) == (MODEL_TYPE.get(name, name), "hf")
    assert spec.num_blocks == config.num_hidden_layers
    reference = reference_model(path)
    prompt = random_prompt(spec.vocab_size)
    spans = [load_span(spec, a, b) for a, b in SPLITS.get(name, DEFAULT_SPLITS)]
    ours = decode(chain_step(spans, load_head(spec)), prompt)
    assert_same(ours, decode(reference_step(reference), prompt))
    # not degenerate: the prompt's positions predict different tokens
    assert len(set(ours[0][0][0].argmax(-1).tolist())) > 1


def test_llama3_rope_scaling_is_applied(family_dir):
    """The llama3 rope type rescales the long wavelengths: the span's rotary frequencies are
    transformers' llama3 ones, not the plain ones (which would decode differently)."""
    spec = resolve_model(family_dir("llama3"))
    span = load_span(spec, 0, 1)
    inv_freq = span.rotary_emb.inv_freq
    head_dim = COMMON["hidden_size"] // COMMON["num_attention_heads"]
    plain = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    assert spec.config.rope_parameters["rope_type"] == "llama3"
    assert torch.equal(inv_freq[:1], plain[:1])  # the shortest wavelength is kept
    assert torch.allclose(inv_freq[-1:], plain[-1:] / 8.0)  # the longest divided by factor


def test_gemma3_layers_slide_and_rotate_by_their_type(family_dir):
    spec = resolve_model(family_dir("gemma3_text"))
    span = load_span(spec, 0, spec.num_blocks)
    kinds = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    assert span.rope_keys == kinds
    assert span.windows == [4, 4, None, 4, 4, None]
    # the two tables differ (local base 10k vs global 1M, linear-scaled)
    _, tables = span._positions(torch.zeros(1, 3, spec.hidden_size), 5)
    assert not torch.allclose(tables["sliding_attention"][0], tables["full_attention"][0])
    assert spec.shape.final_logit_softcapping == 30.0


def test_gemma3_cached_decode_past_the_window_equals_one_forward(family_dir):
    """Token-by-token steps with the KV cache, well past the sliding window, give the hidden
    states of one stateless forward over the whole sequence (split inside a sliding run)."""
    spec = resolve_model(family_dir("gemma3_text"))
    first, second = load_span(spec, 0, 1), load_span(spec, 1, 6)
    ids = torch.tensor([random_prompt(spec.vocab_size, seed=3)])  # 12 tokens, window 4
    x = load_head(spec).embed(ids)
    whole = second.forward(first.forward(x))
    caches = (first.new_cache(), second.new_cache())
    steps = [
        second.forward(first.forward(x[:, i : i + 1], caches[0]), caches[1])
        for i in range(ids.shape[1])
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "olmoe"])
def test_a_moe_span_holds_its_blocks_experts_only(name, family_dir):
    """A span of blocks 1:3 holds those blocks' fused experts, equal to transformers' own
    (fused from the checkpoint's one-matrix-per-expert tensors), and no other block's."""
    path = family_dir(name)
    spec = resolve_model(path)
    reference = reference_model(path)
    span = load_span(spec, 1, 3)
    experts = int(getattr(spec.config, FAMILIES[spec.family].experts.count))
    for layer, theirs in zip(span.layers, reference.model.layers[1:3], strict=True):
        ours = layer.mlp.experts
        assert ours.gate_up_proj.shape[0] == ours.down_proj.shape[0] == experts
        assert torch.equal(ours.gate_up_proj, theirs.mlp.experts.gate_up_proj)
        assert torch.equal(ours.down_proj, theirs.mlp.experts.down_proj)
        assert torch.equal(layer.mlp.gate.weight, theirs.mlp.gate.weight)
    own = sum(p.numel() for layer in reference.model.layers[1:3] for p in layer.parameters())
    assert sum(p.numel() for p in span.parameters()) == own


def test_every_registered_family_builds_its_classes():
    for family in FAMILIES.values():
        assert family.decoder_layer.__name__.endswith("DecoderLayer")
        assert family.rms_norm.__name__.endswith("RMSNorm")
        assert family.rotary_embedding.__name__.endswith("RotaryEmbedding")

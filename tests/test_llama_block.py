"""``model.llama_block``: our own llama blocks give transformers' ``LlamaDecoderLayer``'s
bits (prefill with masks, decode, replays on a filled cache, batches, GQA, every rope type
mirrored), read their config from a GGUF file as transformers would, and spare a node's
span load the transformers import (a fresh interpreter checks it)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from layerchain.model import llama_block
from layerchain.model.gguf_file import gguf_config
from layerchain.model.llama_block import (
    LlamaBlockConfig,
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
    block_config_of,
    gguf_block_config,
)
from layerchain.model.span import KVCache, block_config, causal_mask, load_span, span_config

COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)  # tiny: the scaling reaches most dimensions
VARIANTS = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "mqa-head-dim": dict(num_key_value_heads=1, head_dim=24),  # D != H / heads
    "biases": dict(attention_bias=True, mlp_bias=True),
    "linear-rope": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
    "llama3-rope": dict(rope_theta=500000.0, rope_scaling=LLAMA3),
}


def llama_config(**overrides):
    from transformers import LlamaConfig

    config = LlamaConfig(**{**COMMON, **overrides})
    config._attn_implementation = "sdpa"  # what span_config sets
    return config


def pair(config, layer_idx: int = 1, seed: int = 0):
    """(transformers' layer and rotary, ours) with the same random weights."""
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer as TheirLayer,
    )
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding as TheirRotary,
    )

    torch.manual_seed(seed)
    theirs = TheirLayer(config, layer_idx).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.1) + (1 if p.dim() == 1 else 0))
    own = block_config_of(config)
    assert own is not None
    ours = LlamaDecoderLayer(own, layer_idx).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return (theirs, TheirRotary(config=config)), (ours, LlamaRotaryEmbedding(own))


def run(layer, rotary, steps, layer_idx: int = 1):
    """Outputs of ``layer`` over ``steps`` (hidden [B, T, H] each) on one KV cache, each at
    the positions after the previous ones, with the span's masks."""
    cache, outs = KVCache(layer_idx, layer_idx + 1), []
    with torch.inference_mode():
        for x in steps:
            past, tokens = cache.length, x.shape[1]
            ids = torch.arange(past, past + tokens).unsqueeze(0)
            cos_sin = rotary(x, ids)
            out = layer(x, attention_mask=causal_mask(past, tokens, None), position_ids=ids,
                        cache=cache, use_cache=True, position_embeddings=cos_sin)
            outs.append(out[0] if isinstance(out, tuple) else out)
            cache.length += tokens
    return outs


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 2])
def test_our_block_gives_transformers_bits(variant, batch):
    """Prefill (7 tokens, masked), three one-token decode steps (no mask), then a 3-token
    step on the filled cache (a replay after a failover): every output the same bits."""
    config = llama_config(**VARIANTS[variant])
    (theirs, their_rope), (ours, our_rope) = pair(config)
    assert torch.equal(their_rope.inv_freq, our_rope.inv_freq)
    gen = torch.Generator().manual_seed(3)
    steps = [torch.randn(batch, t, COMMON["hidden_size"], generator=gen) for t in (7, 1, 1, 1, 3)]
    expected, got = run(theirs, their_rope, steps), run(ours, our_rope, steps)
    for step, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(a, b), f"step {step} differs by {(a - b).abs().max().item()}"


def test_our_block_without_a_cache_gives_transformers_bits_and_gradients_flow():
    """The stateless pass (training, audits): masked, no cache; gradients reach the input."""
    config = llama_config()
    (theirs, rope), (ours, _) = pair(config)
    x = torch.randn(2, 5, COMMON["hidden_size"], requires_grad=True)
    ids = torch.arange(5).unsqueeze(0)
    kwargs = dict(attention_mask=causal_mask(0, 5, None), position_ids=ids,
                  position_embeddings=rope(x, ids))
    a, b = theirs(x, **kwargs), ours(x, **kwargs)
    assert torch.equal(a, b)
    b.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_an_unmirrored_config_gets_no_own_block():
    """Anything the module does not mirror is left to transformers' classes."""
    assert block_config_of(llama_config(hidden_act="gelu")) is None
    assert block_config_of(llama_config(attention_dropout=0.1)) is None
    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    assert block_config_of(llama_config(rope_scaling=yarn)) is None
    from transformers import MistralConfig

    assert block_config_of(MistralConfig(**COMMON)) is None


def test_the_default_models_gguf_block_config_is_what_transformers_reads(smollm2_spec):
    file = smollm2_spec.source.file
    own = gguf_block_config(file)
    assert own == block_config_of(gguf_config(file))
    assert own == LlamaBlockConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, rms_norm_eps=own.rms_norm_eps, max_position_embeddings=8192,
        rope_theta=100000.0,
    )
    assert own.rms_norm_eps == pytest.approx(1e-5)


def test_a_llama3_gguf_reads_its_rope_scaling_without_transformers(tmp_path):
    """A Llama 3.1-style GGUF (its rope scaling only as the rope_freqs tensor), written as
    llama.cpp does: our reading of its metadata equals transformers' config of it."""
    from test_families import GGUF_VARIANTS, family_config, save_random_model, write_llama_cpp_gguf

    from layerchain.model import resolve_model

    hf_dir = save_random_model(family_config("llama3", **GGUF_VARIANTS["llama3"]), tmp_path / "hf")
    path = tmp_path / "tiny-llama3.gguf"
    write_llama_cpp_gguf(resolve_model(hf_dir), path)
    spec = resolve_model(path)
    own = gguf_block_config(spec.source.file)
    assert own is not None and own.rope_type == "llama3" and own.head_dim == 16
    assert own == block_config_of(gguf_config(spec.source.file))


def test_a_smollm2_span_of_our_blocks_equals_one_of_transformers_blocks(smollm2_spec, monkeypatch):
    """Two real blocks: a prompt then decode steps, our span and a span of transformers'
    classes (``block_config`` forced to transformers' config) give the same bits, through
    the lean decode path on both."""
    ours = load_span(smollm2_spec, 4, 6)
    assert type(ours.layers[0]) is LlamaDecoderLayer and isinstance(ours.config, LlamaBlockConfig)
    monkeypatch.setattr("layerchain.model.span.block_config", span_config)
    theirs = load_span(smollm2_spec, 4, 6)
    assert type(theirs.layers[0]).__module__.startswith("transformers.")
    assert ours.fast_decode and theirs.fast_decode
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(1, t, smollm2_spec.hidden_size, generator=gen) for t in (6, 1, 1, 2)]
    caches = ours.new_cache(), theirs.new_cache()
    for x in steps:
        assert torch.equal(ours(x, caches[0]), theirs(x, caches[1]))


def test_a_llama_directory_gets_our_blocks_other_families_transformers(tiny_model_dir):
    from layerchain.model import resolve_model

    llama, mistral = resolve_model(tiny_model_dir("llama")), resolve_model(tiny_model_dir("mistral"))
    assert type(load_span(llama, 0, 1).layers[0]) is LlamaDecoderLayer
    assert not isinstance(block_config(mistral), LlamaBlockConfig)
    assert type(load_span(mistral, 0, 1).layers[0]).__module__.startswith("transformers.")


def test_a_nodes_span_load_imports_no_transformers(smollm2_spec):
    """In a fresh interpreter (the manifest cache warm, as on any node after its first
    start): resolving the default model, loading a span and running a step import nothing
    of transformers (nor what it pulls in: sympy, torch._dynamo)."""
    code = (
        "import sys, torch\n"
        "from layerchain.model import resolve_model, load_span\n"
        "span = load_span(resolve_model('smollm2'), 0, 2)\n"
        "span(torch.zeros(1, 3, span.config.hidden_size), span.new_cache())\n"
        "heavy = sorted(m for m in ('transformers', 'sympy', 'torch._dynamo', 'accelerate')\n"
        "               if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_module_mirrors_transformers_sdpa_gqa_choices():
    """One query with GQA and no mask: SDPA's own GQA (as transformers on CPU); with a mask,
    keys and values repeated: both the bits of plain multi-head attention."""
    attn = llama_block.LlamaAttention(llama_block.block_config_of(llama_config()), 0)
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    out, _ = llama_block.sdpa_attention(attn, q, k, v, mask, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, llama_block.repeat_kv(k, 2), llama_block.repeat_kv(v, 2), attn_mask=mask, scale=0.25)
    assert torch.equal(out, ref.transpose(1, 2))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3", "gemma"])
def test_a_shard_directorys_shape_needs_no_transformers_config(family, tiny_model_dir, tmp_path):
    """A shard directory (what a node started by model id serves) gives the shape its
    transformers config gives, read off the manifest's config as written; for llama, our
    blocks' config too."""
    from layerchain.model import resolve_model
    from layerchain.model.shape import shape_of
    from layerchain.model.shards import convert_to_shards

    convert_to_shards(resolve_model(tiny_model_dir(family)), tmp_path / "shards")
    spec = resolve_model(tmp_path / "shards")
    assert spec.kind == "shards" and spec.shape == shape_of(spec.source.config())
    if family == "llama":
        assert block_config(spec) == block_config_of(spec.config)
        assert isinstance(block_config(spec), LlamaBlockConfig)


def test_a_llama3_shard_directory_runs_our_blocks_without_transformers(tmp_path):
    """llama3 rope read back from a shard directory's config as transformers reads it; in a
    fresh interpreter its resolve, span load and step import no transformers."""
    from test_families import family_config, save_random_model

    from layerchain.model import resolve_model
    from layerchain.model.shards import convert_to_shards

    hf = resolve_model(save_random_model(family_config("llama3"), tmp_path / "hf"))
    convert_to_shards(hf, tmp_path / "shards")
    spec = resolve_model(tmp_path / "shards")
    own = block_config(spec)
    assert isinstance(own, LlamaBlockConfig) and own.rope_type == "llama3"
    assert own == block_config_of(spec.config) == block_config_of(hf.config)
    code = (
        "import sys, torch\n"
        "from layerchain.model import resolve_model, load_span\n"
        f"span = load_span(resolve_model({str(tmp_path / 'shards')!r}), 1, 3)\n"
        "span(torch.zeros(1, 3, span.config.hidden_size), span.new_cache())\n"
        "assert 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

"""Current model families, each exact against transformers' whole model on the same weights.

For Gemma 3 (text), Qwen3, Llama 3.x rope scaling and the mixture-of-experts families
(Qwen3-MoE, Mixtral, OLMoE): a tiny random model (hidden 64) saved as a Hugging Face directory
is resolved, cut into four spans (three split points, one inside a run of gemma 3's
sliding-window layers, the others between experts' blocks) and decoded greedily with KV
caches past the sliding window; every step's logits are within 1e-4 of
``AutoModelForCausalLM`` on the same directory, and the tokens are the same.
"""

from __future__ import annotations

import copy

import pytest
import torch

from layerchain.model import load_head, load_span, resolve_model
from layerchain.model.families import FAMILIES

PROMPT_TOKENS, DECODE_STEPS, TOLERANCE = 12, 6, 1e-4
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

    fields = copy.deepcopy({**COMMON, **EXTRA[name], **overrides})  # configs edit rope dicts
    return CONFIG_MAPPING[MODEL_TYPE.get(name, name)](**fields)


def save_random_model(config, path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Save a random-weight model of ``config`` into ``path`` (norms moved off their init),
    its tensors in ``dtype``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    model.to(dtype).save_pretrained(str(path))
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


# ---------------------------------------------------------------------------- GGUF
# tiny configs as llama.cpp's GGUF files can state them: gemma3's pattern is llama.cpp's fixed 6
# (S S S S S F) and its attention scale 1/sqrt(head_dim); qwen3's head_dim differs from
# hidden / heads (as in Qwen3-0.6B), which a loader must read from attention.key_length
# (a Llama 3.1 file holds its rope scaling only as the rope_freqs tensor)
LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
GGUF_VARIANTS = {
    "gemma3_text": dict(sliding_window_pattern=6, final_logit_softcapping=None),
    "qwen3": dict(head_dim=32),
    "qwen3_moe": dict(),
    "llama3": dict(rope_scaling=LLAMA31_ROPE, head_dim=16),
    "mixtral": dict(rope_theta=1e6),  # llama.cpp writes it as "llama" with experts
}
GGUF_ARCH = {"gemma3_text": "gemma3", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "llama": "llama",
             "mixtral": "llama"}


def llama_cpp_permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for the llama architecture (convert_hf_to_gguf ``permute``)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama_cpp_rope_freqs(config) -> torch.Tensor:
    """The ``rope_freqs`` tensor convert_hf_to_gguf writes for a "llama3" rope, as it does."""
    import math

    rope = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    context, low, high = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                          rope["high_freq_factor"])
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(rope["factor"])
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return torch.tensor(out, dtype=torch.float32)


def write_llama_cpp_gguf(spec, path) -> None:
    """Write ``spec``'s float32 weights and config as llama.cpp's ``convert_hf_to_gguf`` does:
    its tensor names, gemma norms stored as (1 + w), experts stacked per kind ([E, I, H]),
    llama's q/k rows permuted and its llama3 rope as ``rope_freqs``."""
    import gguf
    import numpy as np

    from layerchain.model.family_experts import FUSED_DOWN, FUSED_GATE_UP
    from layerchain.model.shards import block_tensor_names

    arch, cfg = GGUF_ARCH[spec.family], spec.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    names = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), spec.num_blocks
    )
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(spec.num_blocks)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gemma3":
        writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_parameters["full_attention"]["factor"])
    else:
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if cfg.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(cfg).numpy())
    if spec.family == "mixtral":
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "qwen3moe":
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)

    def add(name, tensor):
        data = tensor.numpy().astype(np.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1  # llama.cpp runs gemma norms as x * w
        writer.add_tensor(name, data)

    def add_hf(hf_name, tensor):
        base, _, suffix = hf_name.rpartition(".")
        add(names.get_name(base) + "." + suffix, tensor)

    for i in range(spec.num_blocks):
        for name, tensor in spec.source.block_state(i, block_tensor_names(spec, i)).items():
            if name == FUSED_GATE_UP:  # [E, 2I, H] -> gate, up [E, I, H]
                gate, up = tensor.chunk(2, dim=1)
                add(f"blk.{i}.ffn_gate_exps.weight", gate)
                add(f"blk.{i}.ffn_up_exps.weight", up)
            elif name == FUSED_DOWN:
                add(f"blk.{i}.ffn_down_exps.weight", tensor)
            elif arch == "llama" and name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
                add_hf(f"model.layers.{i}.{name}", llama_cpp_permute(tensor, heads))
            else:
                add_hf(f"model.layers.{i}.{name}", tensor)
    head = spec.source.head_state()
    add_hf("model.embed_tokens.weight", head["embed_tokens.weight"])
    add_hf("model.norm.weight", head["norm.weight"])
    if "lm_head.weight" in head:
        add_hf("lm_head.weight", head["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", list(GGUF_VARIANTS))
def test_a_gguf_file_of_the_family_runs_like_transformers(name, tmp_path):
    """A GGUF file written from a tiny model's weights, llama.cpp-style, resolves to the same
    config fields and tensors, and its spans decode exactly what transformers' model of the
    Hugging Face directory decodes."""
    hf_dir = save_random_model(family_config(name, **GGUF_VARIANTS[name]), tmp_path / "hf")
    hf = resolve_model(hf_dir)
    path = tmp_path / f"tiny-{name}.gguf"
    write_llama_cpp_gguf(hf, path)
    spec = resolve_model(path)
    assert (spec.kind, spec.family, spec.num_blocks) == ("gguf", hf.family, hf.num_blocks)
    keys = ["hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"]
    keys += [] if name == "mixtral" else ["head_dim"]  # mixtral's is None: hidden / heads
    keys += {
        "gemma3_text": ["sliding_window", "layer_types", "query_pre_attn_scalar", "rope_parameters"],
        "qwen3": ["rope_parameters"],
        "qwen3_moe": ["num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"],
        "llama3": ["rope_parameters"],
        "mixtral": ["num_local_experts", "num_experts_per_tok", "rope_parameters"],
    }[name]
    for key in keys:
        assert getattr(spec.config, key) == getattr(hf.config, key), key
    reference = reference_model(hf_dir)
    prompt = random_prompt(spec.vocab_size)
    spans = [load_span(spec, a, b) for a, b in ((0, 1), (1, 3), (3, spec.num_blocks))]
    ours = decode(chain_step(spans, load_head(spec)), prompt, steps=4)
    assert_same(ours, decode(reference_step(reference), prompt, steps=4))


# ---------------------------------------------------------------------------- Phi-3 real shape
# microsoft/Phi-3-mini-4k-instruct's config.json (the seeds' reference model)
PHI3_MINI = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=2047,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=32000,
    pad_token_id=32000,
)


def test_phi3_mini_has_32_blocks_of_fused_qkv_and_gate_up():
    """The real config: 32 blocks (what a spec of it reports), each a fused qkv_proj
    [3 * 3072, 3072] and gate_up_proj [2 * 8192, 3072], as a span builds them (on meta: the
    whole model on meta takes transformers over 10 s to build here)."""
    from transformers import Phi3Config

    from layerchain.model.families import family_for
    from layerchain.model.shape import shape_of

    config = Phi3Config(**PHI3_MINI)
    assert shape_of(config).num_hidden_layers == 32
    with torch.device("meta"):
        last = family_for("phi3").decoder_layer(config, 31)
    shapes = {n: tuple(t.shape) for n, t in last.state_dict().items()}
    assert shapes == {
        "self_attn.qkv_proj.weight": (3 * 3072, 3072),  # q, k, v of 32 heads of 96
        "self_attn.o_proj.weight": (3072, 3072),
        "mlp.gate_up_proj.weight": (2 * 8192, 3072),
        "mlp.down_proj.weight": (3072, 8192),
        "input_layernorm.weight": (3072,),
        "post_attention_layernorm.weight": (3072,),
    }
    assert last.self_attn.layer_idx == 31


class MemorySource:
    """A weight source over tensors in memory (``spec.WeightSource``): a real-size model
    without writing, hashing and re-reading gigabytes in a test."""

    def __init__(self, config, state: dict[str, torch.Tensor]) -> None:
        from pathlib import Path

        from layerchain.model.shape import shape_of

        self.path, self._config, self._state = Path("memory"), config, state
        self._shape = shape_of(config)

    def config(self):
        return self._config

    def shape(self):
        return self._shape

    def model_id(self) -> str:
        return "0" * 64

    def block_state(self, index, names):
        return {n: self._state[f"model.layers.{index}.{n}"] for n in names}

    def head_state(self):
        names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "lm_head.weight": "lm_head.weight"}
        return {ours: self._state[theirs] for ours, theirs in names.items()}

    def tokenizer(self):
        raise NotImplementedError


@pytest.mark.slow
def test_phi3_real_size_blocks_match_transformers():
    """Three blocks at Phi-3-mini's real width (random float32 weights in memory; a small
    vocabulary keeps the head cheap), chained over two split points: transformers' logits."""
    from transformers import AutoModelForCausalLM, Phi3Config

    from layerchain.model.spec import ModelSpec

    small_vocab = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = Phi3Config(**{**PHI3_MINI, "num_hidden_layers": 3, **small_vocab})
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, meta in reference.state_dict().items():
        scale = 0.2 if meta.dim() == 1 else 0.02
        offset = 1.0 if meta.dim() == 1 else 0.0  # norms about 1
        state[name] = torch.randn(meta.shape, generator=gen).mul_(scale).add_(offset)
    reference.load_state_dict(state, assign=True)
    reference.model.rotary_emb = type(reference.model.rotary_emb)(config=config)  # off meta
    reference.eval()
    source = MemorySource(config, state)
    spec = ModelSpec("phi3-mini-width", "hf", source.path, source.model_id(), source.shape(), source)
    assert (spec.family, spec.num_blocks, spec.hidden_size) == ("phi3", 3, 3072)
    prompt = random_prompt(spec.vocab_size)[:8]
    spans = [load_span(spec, a, b) for a, b in ((0, 1), (1, 2), (2, 3))]
    assert spans[1].layers[0].mlp.gate_up_proj.weight.shape == (2 * 8192, 3072)
    ours = decode(chain_step(spans, load_head(spec)), prompt, steps=2)
    assert_same(ours, decode(reference_step(reference), prompt, steps=2))


# ---------------------------------------------------------------------------- nodes
def test_nodes_of_gemma3_serve_what_the_local_model_generates(smollm2_tokenizer, reference, tmp_path):
    """Three in-process nodes over mem:// serve spans of gemma 3 (split inside its sliding
    runs, the prompt longer than the window); a client's greedy generation is the one of the
    model in one process (``LocalModel``), token for token."""
    import asyncio

    from memswarm import MemorySwarm

    from layerchain.model import SamplingParams

    config = family_config("gemma3_text", vocab_size=len(smollm2_tokenizer))
    path = save_random_model(config, tmp_path / "gemma3")
    smollm2_tokenizer.save_pretrained(str(path))
    spans = ((0, 1), (1, 4), (4, 6))  # layers S | S F S | S F
    prompt, params = "What is the capital of France?", SamplingParams(max_new_tokens=8)

    async def main():
        swarm = MemorySwarm(str(path))
        try:
            for start, end in spans:
                await swarm.add_node(start, end, tmp_path)
            return await swarm.client().generate(prompt, params)
        finally:
            await swarm.close()

    result = asyncio.run(asyncio.wait_for(main(), 120))
    expected = reference(str(path), prompt, params)
    assert result.token_ids == expected.token_ids and len(set(result.token_ids)) > 1
    assert [(h.start, h.end) for h in result.route] == list(spans)


def test_llama3_rope_is_read_from_rope_freqs_and_an_unknown_one_refused():
    """Llama 3.2's rope_freqs (factor 32) give its rope_scaling; a tensor no released Llama 3
    rope makes is refused by name, not run unscaled (transformers' GGUF loader ignores it)."""
    from pathlib import Path

    from transformers import LlamaConfig

    from layerchain.errors import UnsupportedArchitecture
    from layerchain.model.gguf_file import llama3_rope_of

    rope = {**LLAMA31_ROPE, "factor": 32.0}
    real = dict(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_theta=500000.0)
    factors = llama_cpp_rope_freqs(LlamaConfig(**real, rope_scaling=dict(rope)))
    assert llama3_rope_of(factors, real, Path("x.gguf")) == rope
    bent = factors.clone()
    bent[len(bent) // 2] *= 1.01
    with pytest.raises(UnsupportedArchitecture, match="rope_freqs"):
        llama3_rope_of(bent, real, Path("x.gguf"))


def test_moe_spans_run_the_experts_as_transformers_does(family_dir):
    """Not the per-expert loop a standalone experts module falls back to (with a warning),
    but the grouped matmul ``AutoModelForCausalLM`` runs: the same bits, not merely close."""
    path = family_dir("qwen3_moe")
    spec, reference = resolve_model(path), reference_model(path)
    span = load_span(spec, 0, 1)
    assert span.config._experts_implementation == reference.config._experts_implementation
    x = torch.randn(1, 6, spec.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ours = span.forward(x)
        theirs = reference.model.layers[0].mlp(reference.model.layers[0].post_attention_layernorm(x))
        mine = span.layers[0].mlp(span.layers[0].post_attention_layernorm(x))
    assert torch.equal(mine, theirs) and ours.shape == x.shape


def test_an_image_text_gemma3_checkpoint_serves_its_text_model(tmp_path):
    """Gemma 3 4B-27B ship as image-text checkpoints (model_type gemma3, the text model under
    ``language_model.``): the spec is their gemma3_text model, and its spans decode what
    transformers' image-text model decodes from text alone."""
    from transformers import AutoModelForImageTextToText, Gemma3Config, SiglipVisionConfig

    # no final soft-capping (Gemma 3 has none; the image-text class would not apply it)
    text = family_config("gemma3_text", vocab_size=300, final_logit_softcapping=None)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=4, image_token_index=299, boi_token_index=297,
                          eoi_token_index=298)
    path = tmp_path / "gemma3-it"
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(path))
    spec = resolve_model(path)
    assert (spec.family, spec.num_blocks, spec.hidden_size) == ("gemma3_text", 6, 64)
    reference = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    prompt = random_prompt(296)
    spans = [load_span(spec, a, b) for a, b in SPLITS["gemma3_text"]]
    ours = decode(chain_step(spans, load_head(spec)), prompt, steps=3)
    assert_same(ours, decode(reference_step(reference), prompt, steps=3))

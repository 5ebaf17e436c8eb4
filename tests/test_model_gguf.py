"""GGUF files of other families: written from a tiny HF model with gguf-py, read back the same.

SmolLM2 covers llama GGUF files against transformers; this covers the tensor-name mapping and
config reading for the qwen2 (attention biases) and phi3 (fused qkv and gate/up) layouts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerchain.model import load_span, resolve_model
from layerchain.model.shards import block_tensor_names


def write_gguf(spec, path) -> None:
    """Write ``spec``'s float32 weights and config as llama.cpp names them (no permutation:
    llama.cpp permutes q/k only for the llama architecture)."""
    import gguf

    arch = spec.family
    cfg = spec.config
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
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)

    def add(hf_name, tensor):
        base, _, suffix = hf_name.rpartition(".")
        writer.add_tensor(names.get_name(base) + "." + suffix, tensor.numpy().astype(np.float32))

    for i in range(spec.num_blocks):
        for name, tensor in spec.source.block_state(i, block_tensor_names(spec, i)).items():
            add(f"model.layers.{i}.{name}", tensor)
    head = spec.source.head_state()
    add("model.embed_tokens.weight", head["embed_tokens.weight"])
    add("model.norm.weight", head["norm.weight"])
    if "lm_head.weight" in head:
        add("lm_head.weight", head["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_gguf_of_family_reads_back_like_the_hf_directory(family, tiny_model_dir, tmp_path):
    hf = resolve_model(tiny_model_dir(family))
    path = tmp_path / f"tiny-{family}.gguf"
    write_gguf(hf, path)
    spec = resolve_model(path)
    assert (spec.kind, spec.family, spec.num_blocks) == ("gguf", family, hf.num_blocks)
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
    ):
        assert getattr(spec.config, key) == pytest.approx(getattr(hf.config, key)), key
    for i in range(hf.num_blocks):
        names = block_tensor_names(hf, i)
        ours, theirs = spec.source.block_state(i, names), hf.source.block_state(i, names)
        assert all(torch.equal(ours[n], theirs[n]) for n in names), i
    ours, theirs = spec.source.head_state(), hf.source.head_state()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    span = load_span(spec, 1, 3)
    assert [layer.self_attn.layer_idx for layer in span.layers] == [1, 2]

"""Loading models: only a span's tensors, shard directories, model ids, typed errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from layerchain.errors import (
    ModelFileError,
    ShardHashMismatch,
    SpanError,
    UnknownModel,
    UnsupportedArchitecture,
)
from layerchain.model import convert_to_shards, load_head, load_span, read_manifest, resolve_model
from layerchain.model.shards import block_file, block_tensor_names
from layerchain.types import Span


def all_block_bytes(spec) -> int:
    """float32 bytes of every block's parameters, counted on the meta device (nothing loaded)."""
    total = 0
    for index in range(spec.num_blocks):
        with torch.device("meta"):
            layer = spec.family_info.decoder_layer(spec.config, index)
        total += sum(p.numel() * 4 for p in layer.parameters())
    return total


def test_span_reads_and_holds_only_its_blocks(smollm2_spec, monkeypatch):
    read = []
    original = smollm2_spec.source.file.tensor
    monkeypatch.setattr(
        smollm2_spec.source.file, "tensor", lambda name: read.append(name) or original(name)
    )
    span = load_span(smollm2_spec, 7, 10)
    assert read and {name.split(".")[1] for name in read} == {"7", "8", "9"}
    k, total_blocks = 3, smollm2_spec.num_blocks
    share = span.parameter_bytes() / all_block_bytes(smollm2_spec)
    assert share <= k / total_blocks + 0.02
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in span.parameters())
    assert [layer.self_attn.layer_idx for layer in span.layers] == [7, 8, 9]


def test_smollm2_spec(smollm2_spec):
    spec = smollm2_spec
    assert (spec.num_blocks, spec.hidden_size, spec.vocab_size, spec.family) == (
        30,
        576,
        49152,
        "llama",
    )
    assert spec.kind == "gguf" and spec.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(spec.model_id) == 64 and int(spec.model_id, 16) >= 0
    assert resolve_model(spec.path).model_id == spec.model_id  # a path to the same file


def test_model_id_follows_weights(tiny_model_dir, tmp_path):
    original = tiny_model_dir("llama")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert resolve_model(copy).model_id == resolve_model(original).model_id
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    weights["model.layers.3.mlp.down_proj.weight"][0, 0] += 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert resolve_model(copy).model_id != resolve_model(original).model_id


def test_shard_convert_load_same_logits(tiny_model_dir, tmp_path):
    source = resolve_model(tiny_model_dir("llama", tokenizer=True))
    out = tmp_path / "shards"
    manifest = convert_to_shards(source, out)
    files = sorted(p.name for p in out.iterdir())
    assert [block_file(i) for i in range(4)] == [f for f in files if f.startswith("block_")]
    assert {"head.safetensors", "manifest.json", "tokenizer.json"} <= set(files)
    assert manifest["num_blocks"] == 4 and manifest["model_id"] == source.model_id
    assert set(manifest["blocks"]) == {"0", "1", "2", "3"}

    shards = resolve_model(out)
    assert (
        shards.kind == "shards"
        and shards.model_id == manifest["model_id"] == read_manifest(out)["model_id"]
    )
    assert shards.model_id == source.model_id  # the same weights: one model (issue 20.4)
    ids = torch.tensor([[5, 17, 300, 4000, 42]])
    with torch.inference_mode():
        logits = []
        for spec in (source, shards):
            span, head = load_span(spec, 0, 4), load_head(spec)
            logits.append(head.logits(span.forward(head.embed(ids), span.new_cache())))
    assert torch.equal(logits[0], logits[1])
    assert shards.source.tokenizer().encode("hello world") == source.source.tokenizer().encode(
        "hello world"
    )

    # converting only blocks 1:3 writes only their files, with the same manifest and model id
    partial = tmp_path / "partial"
    assert convert_to_shards(source, partial, blocks=Span(1, 3))["model_id"] == manifest["model_id"]
    assert sorted(p.name for p in partial.glob("block_*")) == [block_file(1), block_file(2)]
    spec = resolve_model(partial)
    load_span(spec, 1, 3)
    with pytest.raises(ModelFileError, match=block_file(0)):
        load_span(spec, 0, 2)


def test_tampered_shard_is_refused_by_name(tiny_model_dir, tmp_path):
    source = resolve_model(tiny_model_dir("llama", tokenizer=True))
    out = tmp_path / "shards"
    convert_to_shards(source, out)
    target = out / block_file(2)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    target.write_bytes(bytes(data))
    spec = resolve_model(out)
    load_span(spec, 0, 2)  # files that were not touched still load: only needed files are read
    with pytest.raises(ShardHashMismatch, match=block_file(2)):
        load_span(spec, 1, 4)
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"num_blocks": 4', '"num_blocks": 3'))
    with pytest.raises(ShardHashMismatch, match="manifest.json"):
        resolve_model(out)


def test_errors_are_typed(smollm2_spec, tiny_model_dir, tmp_path):
    with pytest.raises(UnknownModel) as info:
        resolve_model("no-such-model")
    assert "smollm2" in str(info.value)  # the hint lists what is accepted
    with pytest.raises(SpanError, match="30 blocks"):
        load_span(smollm2_spec, 25, 40)
    for start, end in ((5, 5), (7, 3), (-1, 2)):
        with pytest.raises(SpanError):
            load_span(smollm2_spec, start, end)

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ModelFileError):
        resolve_model(bad)
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    with pytest.raises(UnknownModel):
        resolve_model(not_a_model)

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llama"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFileError):
        load_span(resolve_model(broken), 0, 1)

    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedArchitecture, match="llama"):
        resolve_model(other)


def test_block_tensor_names_are_the_layer_parameters(tiny_model_dir):
    spec = resolve_model(tiny_model_dir("phi3"))
    names = block_tensor_names(spec, 0)
    assert "self_attn.qkv_proj.weight" in names and "mlp.gate_up_proj.weight" in names

"""Model ids are manifest hashes (issue 20.4): any source, no collisions, cached manifests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import pytest

from layerchain.errors import ModelFileError, ShardHashMismatch
from layerchain.model import convert_to_shards, read_manifest, resolve_model
from layerchain.model import digest, manifest as manifest_module
from layerchain.model.manifest import (
    block_file_bytes,
    cache_dir,
    client_files,
    file_bytes,
    manifest_files,
    manifest_of,
)
from layerchain.model.shards import HEAD_FILE, block_file, manifest_id
from test_model_gguf import write_gguf


def test_a_gguf_file_and_its_shard_directory_have_one_id(tiny_model_dir, tmp_path):
    gguf = tmp_path / "tiny.gguf"
    write_gguf(resolve_model(tiny_model_dir("qwen2")), gguf)
    spec = resolve_model(gguf)
    manifest = manifest_of(spec)
    assert spec.model_id == manifest["model_id"] == manifest_id(manifest)
    assert len(manifest["blocks"]) == spec.num_blocks  # the full sha256 of every block file

    out = tmp_path / "shards"
    convert_to_shards(spec, out)
    shards = resolve_model(out)
    assert shards.kind == "shards" and shards.model_id == spec.model_id
    renamed = tmp_path / "another name.gguf"  # a label: the name is not in the id
    shutil.copy(gguf, renamed)
    assert resolve_model(renamed).model_id == spec.model_id
    assert read_manifest(out)["name"] == "tiny.gguf"


def test_an_hf_directory_and_its_shards_have_one_id_and_the_same_files(tiny_model_dir, tmp_path):
    source = resolve_model(tiny_model_dir("llama", tokenizer=True))
    out = tmp_path / "shards"
    written = convert_to_shards(source, out)
    shards = resolve_model(out)
    assert written["model_id"] == source.model_id == shards.model_id
    listed = manifest_files(manifest_of(source))
    assert set(listed) == {block_file(i) for i in range(4)} | {HEAD_FILE} | set(written["files"])
    assert "tokenizer.json" in client_files(written)
    tokenizer = set(written["files"]) - {"tokenizer.json"}  # each rebuilds the tokenizer: one
    for name, entry in listed.items():  # what a seeding node serves, from either source
        if name in tokenizer:
            continue
        built, read = file_bytes(source, name), file_bytes(shards, name)
        assert built == read == (out / name).read_bytes(), name
        assert hashlib.sha256(built).hexdigest() == entry.sha256
        assert entry.size in (None, len(built))
    assert hashlib.sha256(block_file_bytes(source, 2)).hexdigest() == (
        written["blocks"]["2"]["sha256"]
    )
    with pytest.raises(ModelFileError, match="no file"):
        file_bytes(source, "../etc/passwd")


def _tensor_data_span(path, name):
    """(start, end) byte offsets of tensor ``name``'s data inside a safetensors file."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8 : 8 + header_len])
    begin, end = header[name]["data_offsets"]
    return 8 + header_len + begin, 8 + header_len + end


def test_two_files_differing_in_one_unsampled_byte_have_different_ids(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The collision of the old sampled ids: one byte deep inside a block, outside the
    header and every sample a sampled digest reads, changes the id (each block file's full
    sha256 is in the manifest). The old sampling thresholds are lowered so that, on the old
    code, these small files would have been hashed by samples and shared an id."""
    header, samples, sample_bytes = 4096, 4, 1024
    for name, value in (("_WHOLE_FILE_LIMIT", 0), ("_HEADER_BYTES", header),
                        ("_SAMPLES", samples), ("_SAMPLE_BYTES", sample_bytes)):
        monkeypatch.setattr(digest, name, value, raising=False)
    original = tiny_model_dir("mistral")
    other = tmp_path / "other"
    shutil.copytree(original, other)
    weights = other / "model.safetensors"
    size = weights.stat().st_size
    sampled = [(0, header)] + [(size * i // samples, size * i // samples + sample_bytes)
                               for i in range(samples)]
    start, end = _tensor_data_span(weights, "model.layers.2.mlp.down_proj.weight")
    offset = next(o for o in range(start, end, 4)
                  if not any(a <= o < b for a, b in sampled))  # a float's lowest byte
    data = bytearray(weights.read_bytes())
    data[offset] ^= 0x01
    weights.write_bytes(bytes(data))

    def sampled_digest(path):  # the old rule, at the lowered sizes
        raw = path.read_bytes()
        return hashlib.sha256(b"".join(raw[a:b] for a, b in sampled)).hexdigest()

    assert sampled_digest(weights) == sampled_digest(original / "model.safetensors")
    ours, theirs = resolve_model(other), resolve_model(original)
    assert ours.model_id != theirs.model_id
    differ = [i for i in range(4) if manifest_of(ours)["blocks"][str(i)]
              != manifest_of(theirs)["blocks"][str(i)]]
    assert differ == [2]


def test_the_manifest_is_built_once_and_rebuilt_when_the_file_changes(
    tiny_model_dir, tmp_path, monkeypatch
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("gemma"), model)
    builds = []
    real_build = manifest_module.build_manifest
    monkeypatch.setattr(manifest_module, "build_manifest",
                        lambda spec: builds.append(spec.path) or real_build(spec))
    before = set(cache_dir().glob("*.json"))  # other tests may have cached this model's id
    first = resolve_model(model).model_id  # under another path (the session's tiny model)
    assert resolve_model(model).model_id == first and len(builds) == 1  # cached
    cached = [p for p in set(cache_dir().glob("*.json")) - before
              if json.loads(p.read_text())["manifest"]["model_id"] == first]
    assert len(cached) == 1

    cached[0].write_text(cached[0].read_text().replace('"num_blocks": 4', '"num_blocks": 3'))
    assert resolve_model(model).model_id == first and len(builds) == 2  # damaged: rebuilt

    weights = model / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert resolve_model(model).model_id == first and len(builds) == 3  # new key, same id


def test_a_source_that_no_longer_builds_its_manifest_is_refused_by_name(tiny_model_dir,
                                                                       monkeypatch):
    spec = resolve_model(tiny_model_dir("phi3"))
    monkeypatch.setattr(manifest_module, "block_bytes", lambda spec, index: b"not the block")
    with pytest.raises(ShardHashMismatch, match=block_file(1)):
        block_file_bytes(spec, 1)

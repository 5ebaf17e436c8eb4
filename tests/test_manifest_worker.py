"""A node builds a model's manifest in a child process (``model.manifest_worker``, issue 21
item 2): the same manifest, byte for byte, as the in-process builder, and the node's own
process imports no transformers for it."""

from __future__ import annotations

import json

import pytest

from layerchain.errors import ModelFileError
from layerchain.model import convert_to_shards, resolve_model
from layerchain.model import manifest as manifest_module
from layerchain.model import manifest_worker
from layerchain.model.manifest_worker import build_in_child, main
from layerchain.model.shards import build_manifest
from test_model_gguf import write_gguf


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """An empty LAYERCHAIN_HOME: no manifest cached, as on a machine's first start."""
    home = tmp_path / "home"
    monkeypatch.setenv("LAYERCHAIN_HOME", str(home))
    return home


def _child_main_output(spec, tmp_path) -> dict:
    out = tmp_path / "built.json"
    main([spec.kind, str(spec.path), spec.name, str(out)])
    return json.loads(out.read_text())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_childs_build_is_the_in_process_build_of_a_gguf_file(family, tiny_model_dir,
                                                                  tmp_path):
    gguf = tmp_path / f"tiny-{family}.gguf"
    write_gguf(resolve_model(tiny_model_dir(family)), gguf)
    spec = resolve_model(gguf)
    built = _child_main_output(spec, tmp_path)  # what the child runs, in this process
    assert built == build_manifest(spec)
    assert built["model_id"] == spec.model_id


def test_the_childs_build_is_the_in_process_build_of_an_hf_directory(tiny_model_dir, tmp_path):
    spec = resolve_model(tiny_model_dir("llama", tokenizer=True))
    built = _child_main_output(spec, tmp_path)
    assert built == build_manifest(spec)
    assert built["files"] and built["model_id"] == spec.model_id  # tokenizer files hashed


def test_a_shard_directory_has_no_manifest_to_build(tiny_model_dir, tmp_path):
    out = tmp_path / "shards"
    convert_to_shards(resolve_model(tiny_model_dir("llama")), out)
    with pytest.raises(ModelFileError, match="no manifest to build"):
        build_in_child(resolve_model(out))


def test_resolve_hands_a_cold_build_to_the_builder_given_and_caches_it(tiny_model_dir, tmp_path,
                                                                       fresh_home):
    gguf = tmp_path / "tiny.gguf"
    write_gguf(resolve_model(tiny_model_dir("llama")), gguf)
    asked = []

    def builder(spec):
        asked.append(spec.path)
        return build_manifest(spec)

    first = resolve_model(gguf, build=builder)
    again = resolve_model(gguf, build=builder)  # cached: the builder is not asked again
    assert asked == [gguf] and first.model_id == again.model_id
    assert list(manifest_module.cache_dir().glob("*.json"))


@pytest.mark.slow
def test_a_child_process_builds_the_same_manifest(tiny_model_dir, tmp_path, fresh_home):
    gguf = tmp_path / "tiny.gguf"
    write_gguf(resolve_model(tiny_model_dir("llama")), gguf)
    spec = resolve_model(gguf)  # (cached in fresh_home: build_in_child does not read it)
    assert build_in_child(spec) == build_manifest(spec)


@pytest.mark.parametrize("script, error", [
    ("echo 'ValueError: no such tensor' >&2; exit 1", "failed: ValueError: no such tensor"),
    ("exit 3", "failed: exit status 3"),
    ('for last; do :; done; echo \'{"model_id": "00"}\' > "$last"', "does not verify"),
    ("exit 0", "does not verify"),  # wrote nothing
])
def test_a_child_that_fails_or_writes_no_valid_manifest_is_refused(script, error, tiny_model_dir,
                                                                    tmp_path, monkeypatch):
    fake = tmp_path / "fake-python"  # stands for the interpreter the child would run
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    spec = resolve_model(tiny_model_dir("llama"))
    monkeypatch.setattr(manifest_worker.sys, "executable", str(fake))
    with pytest.raises(ModelFileError, match=error):
        build_in_child(spec)

"""Shard directories: one safetensors file per block, one for the head, and a manifest.

``convert_to_shards(spec, out)`` writes::

    block_000.safetensors ... block_{L-1}.safetensors   float32 tensors of each block,
                                                        named as in the decoder layer
    head.safetensors                                    embed_tokens / norm / lm_head (if untied)
    tokenizer.json, tokenizer_config.json, ...          the tokenizer, with its chat template
    manifest.json                                       see below

``manifest.json`` holds the format version, the model name and family, ``num_blocks``, the
transformers config (``config``, without the fields naming where it was read from or which
transformers wrote it), the file name, size and sha256 of every block file (``blocks``), of
the head (``head``) and of the tokenizer files (``files``; none for a model directory without
a tokenizer), and ``model_id``: the sha256 of the canonical JSON of all the other fields but
``name`` (a label: the same weights under another file name are the same model). So a
manifest is verifiable on its own, like a torrent's info hash, and every file is verifiable
against it: peers fetch missing block files from each other (DESIGN "Shards").

The manifest is a function of the weights alone (``build_manifest``): the manifest of a
GGUF file or a Hugging Face directory is the one its shard directory gets, and *its model id
is that manifest's hash* (``model.manifest``), so a GGUF file and the shards converted from it
are one model to the swarm, and two weight files that differ anywhere have different ids.
Converting only some blocks (``blocks=Span``) still hashes every block, so the manifest and
the model id are the same as a full conversion's; only the chosen files are written.
Version 1 manifests (which also hashed ``name`` and held ``source_model_id``) still verify
under their own rule.

``ShardSource`` loads from such a directory: it reads only the files asked for and refuses
any whose sha256 differs from the manifest (``ShardHashMismatch``, naming the file).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load, save

from layerchain.errors import ModelFileError, ShardHashMismatch
from layerchain.model.digest import digest_of
from layerchain.model.gguf_file import GGUFFile
from layerchain.model.llama_block import ConfigFields
from layerchain.model.shape import ModelShape, shape_of
from layerchain.model.span import span_config
from layerchain.model.spec import ModelSpec
from layerchain.model.tokenizer import tokenizer_from_dir
from layerchain.types import Span

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

FORMAT = "layerchain-shards"
VERSION = 2  # 2: the model id leaves out ``name``; no ``source_model_id``
MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"
# config fields that say where a config was read from or which library wrote it, not what
# the model is: left out of manifests, so the same weights get the same id anywhere
VOLATILE_CONFIG_KEYS = ("_name_or_path", "_model_name_or_path", "transformers_version")


def block_file(index: int) -> str:
    """File name of block ``index`` in a shard directory."""
    return f"block_{index:03d}.safetensors"


def block_tensor_names(spec: ModelSpec, index: int) -> list[str]:
    """Names of block ``index``'s tensors, relative to the decoder layer (built on meta)."""
    with torch.device("meta"):
        layer = spec.family_info.decoder_layer(span_config(spec), index)
    return list(layer.state_dict().keys())


def block_bytes(spec: ModelSpec, index: int) -> bytes:
    """The safetensors bytes of block ``index`` of ``spec``, as its shard file holds them."""
    state = spec.source.block_state(index, block_tensor_names(spec, index))
    return bytes(save({k: v.contiguous() for k, v in state.items()}))


def head_bytes(spec: ModelSpec) -> bytes:
    """The safetensors bytes of ``spec``'s head file."""
    return bytes(save({k: v.contiguous() for k, v in spec.source.head_state().items()}))


def tokenizer_files(spec: ModelSpec) -> dict[str, bytes]:
    """The tokenizer files of ``spec`` (name -> bytes), as ``save_pretrained`` writes them;
    {} for a model directory or GGUF file that holds no tokenizer."""
    if not _has_tokenizer(spec):
        return {}
    tokenizer = spec.source.tokenizer()
    with tempfile.TemporaryDirectory(prefix="layerchain-tokenizer-") as tmp:
        saved = tokenizer.save_pretrained(tmp)
        return {Path(p).name: Path(p).read_bytes() for p in saved if Path(p).is_file()}


def _has_tokenizer(spec: ModelSpec) -> bool:
    if spec.kind == "gguf":
        file = getattr(spec.source, "file", None)  # weights.GGUFSource's GGUFFile
        return not isinstance(file, GGUFFile) or "tokenizer.ggml.model" in file.metadata
    names = ("tokenizer.json", "tokenizer.model", "vocab.json")
    return spec.kind != "hf" or any((spec.path / name).is_file() for name in names)


def config_dict(spec: ModelSpec) -> dict[str, Any]:
    """``spec``'s transformers config as a manifest holds it (no ``VOLATILE_CONFIG_KEYS``)."""
    config = json.loads(spec.config.to_json_string(use_diff=False))
    return {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}


def build_manifest(
    spec: ModelSpec,
    keep: Callable[[str, bytes], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The manifest of ``spec``'s weights (see the module docstring), computed from its
    source: every block file is built and hashed (a few seconds per GiB of float32).

    ``keep(name, data)`` is called with each file built, to write it; ``progress(step)``
    after each block, the head and the tokenizer (``num_blocks + 2`` calls).
    """
    tell = progress or (lambda _step: None)

    def entry(name: str, data: bytes) -> dict[str, Any]:
        if keep is not None:
            keep(name, data)
        return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    blocks = {}
    for index in range(spec.num_blocks):
        blocks[str(index)] = entry(block_file(index), block_bytes(spec, index))
        tell(f"block {index}")
    head = entry(HEAD_FILE, head_bytes(spec))
    tell("head")
    files = {}
    for name, data in tokenizer_files(spec).items():
        files[name] = entry(name, data)["sha256"]
    tell("tokenizer")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "name": spec.name,
        "family": spec.family,
        "num_blocks": spec.num_blocks,
        "config": config_dict(spec),
        "blocks": blocks,
        "head": head,
        "files": files,
    }
    manifest["model_id"] = manifest_id(manifest)
    return manifest


def convert_to_shards(
    spec: ModelSpec,
    out: Path,
    blocks: Span | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the shard directory of ``spec`` into ``out``; return its manifest.

    ``blocks``: write only these block files (all are hashed). ``progress(step)`` is called
    after each written or hashed file (``num_blocks + 2`` calls).
    """
    if blocks is not None:
        blocks.check_within(spec.num_blocks)
    out.mkdir(parents=True, exist_ok=True)
    chosen = None if blocks is None else {block_file(i) for i in range(blocks.start, blocks.end)}

    def keep(name: str, data: bytes) -> None:
        if chosen is None or name in chosen or not name.startswith("block_"):
            (out / name).write_bytes(data)

    manifest = build_manifest(spec, keep, progress)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def manifest_id(manifest: dict[str, Any]) -> str:
    """The model id a manifest names: sha256 of its canonical JSON without ``model_id`` and
    (from version 2) ``name``."""
    left_out = ("model_id",) if manifest.get("version") == 1 else ("model_id", "name")
    return digest_of({k: v for k, v in manifest.items() if k not in left_out})


def read_manifest(directory: Path) -> dict[str, Any]:
    """The checked manifest of a shard directory (ModelFileError / ShardHashMismatch if bad)."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as error:
        raise ModelFileError(f"cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise ModelFileError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise ModelFileError(f"{path} is not a layerchain shard manifest (not a JSON object)")
    missing = {"format", "num_blocks", "config", "blocks", "head", "model_id"} - set(manifest)
    if manifest.get("format") != FORMAT or missing:
        raise ModelFileError(
            f"{path} is not a layerchain shard manifest (missing {sorted(missing)})"
        )
    if manifest_id(manifest) != manifest["model_id"]:
        raise ShardHashMismatch(f"{path}: its model_id does not match its content")
    return manifest


def verify_file(path: Path, sha256: str) -> bytes:
    """The bytes of ``path`` if their sha256 is ``sha256``; else ShardHashMismatch naming it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(
            f"shard file {path} is missing", hint="convert it again or fetch it from a peer"
        ) from None
    except OSError as error:
        raise ModelFileError(f"cannot read shard file {path}: {error.strerror}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ShardHashMismatch(
            f"shard file {path} does not match the sha256 in its manifest",
            hint="delete it and convert or fetch it again",
        )
    return data


class ShardSource:
    """Reads a shard directory, verifying each file it reads against the manifest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest = read_manifest(path)

    def config(self) -> PretrainedConfig:
        from transformers import CONFIG_MAPPING  # lazily, like every transformers import here

        config = dict(self.manifest["config"])
        model_type = config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ModelFileError(f"{self.path / MANIFEST}: unknown model type {model_type!r}")
        return CONFIG_MAPPING[model_type].from_dict(config)

    def shape(self) -> ModelShape:
        # read off the manifest's config as written (every field: ``config_dict``), without
        # building transformers' config: a node started by model id resolves this directory
        return shape_of(ConfigFields(self.manifest["config"]))

    def _load(self, entry: dict[str, Any], names: Iterable[str] | None) -> dict[str, torch.Tensor]:
        path = self.path / entry["file"]
        data = verify_file(path, entry["sha256"])
        try:
            state = load(data)
        except Exception as error:  # safetensors raises its own error types
            raise ModelFileError(f"cannot read shard file {path}: {error}") from None
        if names is None:
            return state
        names = list(names)
        missing = [n for n in names if n not in state]
        if missing:
            raise ModelFileError(f"shard file {path} lacks tensors {missing}")
        return {n: state[n] for n in names}

    def block_state(self, index: int, names: Iterable[str]) -> dict[str, torch.Tensor]:
        entry = self.manifest["blocks"].get(str(index))
        if entry is None:
            raise ModelFileError(f"{self.path / MANIFEST} lists no block {index}")
        return self._load(entry, names)

    def head_state(self) -> dict[str, torch.Tensor]:
        return self._load(self.manifest["head"], None)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        for name, sha256 in self.manifest.get("files", {}).items():
            verify_file(self.path / name, sha256)
        return tokenizer_from_dir(self.path)

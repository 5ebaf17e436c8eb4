"""Weight sources: single tensors, the config and the tokenizer from where a model lives.

Each class here implements ``spec.WeightSource`` and hands out the float32 tensors of one
block, or of the head, by the names transformers' modules use, reading nothing else: a GGUF
file dequantizes only those tensors (``gguf_file.GGUFFile``), a Hugging Face directory reads
only those tensors from its memory-mapped safetensors files. (A shard directory's source,
which verifies every file it reads, is ``shards.ShardSource``.) Sources know nothing about
spans or networks; ``resolve.open_source`` picks one.

Names: block tensors are relative to the decoder layer (``self_attn.q_proj.weight``); head
tensors are ``embed_tokens.weight``, ``norm.weight`` and, when the LM head is not tied to the
embeddings, ``lm_head.weight``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from gguf import get_tensor_name_map
from safetensors import safe_open

from layerchain.errors import ModelFileError
from layerchain.model.families import family_for, text_model_of
from layerchain.model.family_experts import fuse_stacked, gguf_expert_parts, hf_block_state
from layerchain.model.gguf_file import (
    GGUFFile,
    gguf_arch,
    gguf_config,
    gguf_shape,
    reverse_permute_qk,
)
from layerchain.model.shape import ModelShape, shape_of
from layerchain.model.tokenizer import tokenizer_from_dir, tokenizer_from_gguf

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

HEAD_NAMES = ("embed_tokens.weight", "norm.weight", "lm_head.weight")


class GGUFSource:
    """Tensors dequantized one by one from a memory-mapped GGUF file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = GGUFFile(path)
        self._shape = gguf_shape(self.file)  # no transformers: the client's head needs no more
        self._config: PretrainedConfig | None = None  # built when a span needs it
        self._names = get_tensor_name_map(gguf_arch(self.file), self._shape.num_hidden_layers)
        self._family = family_for(self._shape.model_type)

    def config(self) -> PretrainedConfig:
        if self._config is None:
            self._config = gguf_config(self.file)
        return self._config

    def shape(self) -> ModelShape:
        return self._shape

    def _gguf_name(self, hf_name: str) -> str:
        base, dot, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, dot, suffix = hf_name, "", ""
        mapped: str | None = self._names.get_name(base)
        if mapped is None:
            raise ModelFileError(f"{self.path}: no GGUF tensor for {hf_name}")
        return mapped + dot + suffix

    def _tensor(self, hf_name: str) -> torch.Tensor:
        name = self._gguf_name(hf_name)
        tensor = self.file.tensor(name)
        if self.file.architecture == "llama":  # llama.cpp permutes q/k rows for its rope layout
            # the head counts as transformers' config reads them, without building it
            heads = int(self.file.metadata["llama.attention.head_count"])
            if ".attn_q." in name:
                tensor = reverse_permute_qk(tensor, heads)
            elif ".attn_k." in name:
                kv_heads = self.file.metadata.get("llama.attention.head_count_kv", heads)
                tensor = reverse_permute_qk(tensor, int(kv_heads))
        elif self._family.norm_offset and name.endswith("norm.weight"):
            tensor = tensor - 1  # llama.cpp stores gemma's (1 + w) norm weights as 1 + w
        return tensor

    def _block_tensor(self, index: int, name: str) -> torch.Tensor:
        parts = gguf_expert_parts(name, index) if self._family.experts is not None else ()
        if parts:  # fused experts, from the file's stacked tensors (family_experts)
            return fuse_stacked(name, [self.file.tensor(part) for part in parts])
        return self._tensor(f"model.layers.{index}.{name}")

    def block_state(self, index: int, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: self._block_tensor(index, n) for n in names}

    def head_state(self) -> dict[str, torch.Tensor]:
        state = {
            "embed_tokens.weight": self._tensor("model.embed_tokens.weight"),
            "norm.weight": self._tensor("model.norm.weight"),
        }
        if not self._shape.tie_word_embeddings:
            state["lm_head.weight"] = self._tensor("lm_head.weight")
        return state

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return tokenizer_from_gguf(self.path)


class HFDirSource:
    """Tensors read one by one from a Hugging Face directory's safetensors files."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoConfig

        self.path = path
        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ModelFileError(f"cannot read {path / 'config.json'}: {error}") from None
        # an image-text checkpoint (gemma3): its text model's config and tensor-name prefix
        self._config, self._prefix = text_model_of(config)
        self._files = sorted(path.glob("*.safetensors"))
        if not self._files:
            raise ModelFileError(f"{path} has config.json but no *.safetensors weights")
        self._where: dict[str, Path] | None = None

    def config(self) -> PretrainedConfig:
        return self._config

    def shape(self) -> ModelShape:
        return shape_of(self._config)

    def _index(self) -> dict[str, Path]:
        """Tensor name -> file, from the index json or the files' headers (never their data)."""
        if self._where is None:
            index = self.path / "model.safetensors.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._where = {k: self.path / v for k, v in weight_map.items()}
            else:
                self._where = {}
                for f in self._files:
                    try:
                        with safe_open(str(f), framework="pt") as handle:
                            self._where.update({k: f for k in handle.keys()})
                    except Exception as error:  # safetensors raises its own error types
                        raise ModelFileError(f"cannot read {f}: {error}") from None
        return self._where

    def _read(self, names: dict[str, str]) -> dict[str, torch.Tensor]:
        """Read tensors {our name: name in the files}, as float32, opening each file once."""
        where, by_file = self._index(), dict[Path, dict[str, str]]()
        for ours, theirs in names.items():
            if theirs not in where:
                raise ModelFileError(f"{self.path} has no tensor {theirs}")
            by_file.setdefault(where[theirs], {})[ours] = theirs
        out = {}
        for f, wanted in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for ours, theirs in wanted.items():
                        out[ours] = handle.get_tensor(theirs).to(torch.float32)
            except Exception as error:  # safetensors raises its own error types
                raise ModelFileError(f"cannot read {f}: {error}") from None
        return out

    def block_state(self, index: int, names: Iterable[str]) -> dict[str, torch.Tensor]:
        experts = family_for(str(self._config.model_type)).experts
        prefix = f"{self._prefix}model.layers.{index}."
        if experts is None:
            return self._read({n: prefix + n for n in names})
        count = int(getattr(self._config, experts.count))  # E: one matrix per expert on disk
        return hf_block_state(experts, count, names, prefix, self._index(), self._read)

    def head_state(self) -> dict[str, torch.Tensor]:
        names = {
            "embed_tokens.weight": f"{self._prefix}model.embed_tokens.weight",
            "norm.weight": f"{self._prefix}model.norm.weight",
        }
        if not self._config.tie_word_embeddings:
            names["lm_head.weight"] = f"{self._prefix}lm_head.weight"
        return self._read(names)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return tokenizer_from_dir(self.path)

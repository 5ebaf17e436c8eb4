"""Reading a GGUF file: its metadata, a model's shape and transformers config, single tensors.

The file is memory-mapped; opening it parses only the header (metadata and tensor table).
Tensor data is touched only when a tensor is asked for, and then only that tensor's bytes are
dequantized (with ``gguf.quants.dequantize``, the reference implementation of llama.cpp's
formats). So a node serving blocks 7:23 never reads, let alone dequantizes, the other blocks.

Why not ``gguf.GGUFReader``: it eagerly decodes every metadata string, including the whole
vocabulary and merge table (about 100,000 strings for SmolLM2), which takes seconds each time a
node or test opens the file. This reader walks over those arrays and decodes them only when the
tokenizer is built. The format is small: magic, version, counts, key/value pairs, tensor infos,
aligned data (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).

The config mapping follows transformers' own legacy GGUF loader
(``modeling_gguf_pytorch_utils.load_gguf_checkpoint``) so that a span and
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` see the same config, and the tensor
fixes follow its ``TensorProcessor``s (the llama q/k reverse permutation).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType
from gguf.quants import _type_traits, dequantize

from layerchain.errors import ModelFileError, UnsupportedArchitecture
from layerchain.model.shape import ModelShape, shape_of

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
# fixed-width metadata value types: struct format per type id (gguf.md, gguf_metadata_value_type)
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# metadata arrays of strings decoded only on request (the tokenizer's)
_LAZY_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: GGUF name, torch-order shape, ggml type id, byte range."""

    name: str
    shape: tuple[int, ...]  # torch order (outermost first); ggml stores it reversed
    ggml_type: int
    offset: int  # absolute offset of the first byte in the file
    nbytes: int


class GGUFFile:
    """A memory-mapped GGUF file; ``metadata`` and ``tensors`` are parsed at open."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._blob = np.memmap(self.path, mode="r", dtype=np.uint8)
            self.metadata, self.tensors, self.header_size = _parse(self._blob)
        except ModelFileError as error:
            raise ModelFileError(f"{self.path}: {error.message}") from None
        except (OSError, ValueError, struct.error, UnicodeDecodeError, IndexError) as error:
            raise ModelFileError(f"cannot read GGUF file {self.path}: {error}") from None
        self.architecture: str = str(self.metadata.get("general.architecture", ""))

    def header_bytes(self) -> bytes:
        """The bytes before the tensor data: metadata and tensor table (hashed for model ids)."""
        return bytes(self._blob[: self.header_size])

    def data_view(self, start: int, length: int) -> np.ndarray:
        """A read-only view of ``length`` bytes from absolute offset ``start``."""
        return self._blob[start : start + length]

    def string_array(self, key: str) -> list[str]:
        """Decode a metadata array of strings that the header parse skipped (vocabulary, merges)."""
        offset = self.metadata.get(f"{key}@offset")
        if offset is None:
            return []
        raw = self._blob.data  # memoryview: what struct reads
        _element_type, count = struct.unpack_from("<IQ", raw, offset)
        pos, out = offset + 12, []
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", raw, pos)
            out.append(bytes(raw[pos + 8 : pos + 8 + length]).decode("utf-8", errors="replace"))
            pos += 8 + length
        return out

    @cached_property
    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> torch.Tensor:
        """Dequantize one tensor to a float32 torch tensor of its torch-order shape.

        Rows go through gguf-py's own per-type ``dequantize_rows`` a few million values at a
        time: the same arithmetic as ``gguf.quants.dequantize`` (bit for bit), without its
        16-row grouping, which is 2-3x slower.
        """
        info = self.by_name.get(name)
        if info is None:
            raise ModelFileError(f"{self.path} has no tensor {name!r}")
        qtype = GGMLQuantizationType(info.ggml_type)
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        raw = self.data_view(info.offset, info.nbytes)
        if raw.size != info.nbytes:
            raise ModelFileError(f"{self.path} is truncated: tensor {name} lies past its end")
        cols = info.shape[-1]
        rows = raw.reshape(-1, cols // block_elems * block_bytes)  # [rows, bytes per row]
        out = np.empty((rows.shape[0], cols), dtype=np.float32)
        trait = _type_traits.get(qtype)
        if qtype == GGMLQuantizationType.BF16:
            out[:] = (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif trait is None:  # F32, F16
            out[:] = dequantize(rows, qtype)
        else:
            step = max(1, (1 << 22) // cols)  # rows per chunk: ~4M values, bounded temporaries
            for i in range(0, rows.shape[0], step):
                out[i : i + step] = trait.dequantize_rows(rows[i : i + step])
        return torch.from_numpy(out.reshape(info.shape))


def _parse(blob: np.ndarray) -> tuple[dict[str, Any], tuple[TensorInfo, ...], int]:
    """(metadata, tensor infos, offset of the tensor data)."""
    if blob.size < 24 or bytes(blob[:4]) != _MAGIC:
        raise ModelFileError("not a GGUF file (bad magic bytes)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob.data, 4)
    if version not in _VERSIONS:
        raise ModelFileError(f"GGUF version {version} is not supported (only 2 and 3)")
    pos, metadata = 24, {}
    for _ in range(n_kv):
        key, pos = _read_string(blob, pos)
        (vtype,) = struct.unpack_from("<I", blob.data, pos)
        if key in _LAZY_ARRAYS:
            metadata[f"{key}@offset"] = pos + 4
        metadata[key], pos = _read_value(blob, pos + 4, vtype, lazy=key in _LAZY_ARRAYS)
    entries = []
    for _ in range(n_tensors):
        name, pos = _read_string(blob, pos)
        (n_dims,) = struct.unpack_from("<I", blob.data, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", blob.data, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", blob.data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        entries.append((name, tuple(reversed(dims)), ggml_type, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = tuple(
        TensorInfo(name, shape, gtype, data_start + off, _nbytes(gtype, shape))
        for name, shape, gtype, off in entries
    )
    return metadata, tensors, data_start


def _nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    try:
        block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ModelFileError(f"unknown ggml tensor type {ggml_type}") from None
    return int(prod(shape) // block_elems * block_bytes)


def _read_string(blob: np.ndarray, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob.data, pos)
    end = pos + 8 + length
    if end > blob.size:
        raise ModelFileError("truncated header")
    return bytes(blob[pos + 8 : end]).decode("utf-8"), end


def _read_value(blob: np.ndarray, pos: int, vtype: int, lazy: bool = False) -> tuple[Any, int]:
    if vtype in _SCALAR:
        fmt = _SCALAR[vtype]
        return struct.unpack_from(fmt, blob.data, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        return _read_string(blob, pos)
    if vtype != _ARRAY:
        raise ModelFileError(f"unknown metadata value type {vtype}")
    etype, count = struct.unpack_from("<IQ", blob.data, pos)
    pos += 12
    if etype in _SCALAR:
        fmt = _SCALAR[etype]
        width = struct.calcsize(fmt)
        if count > 4096:  # scores, token types: kept as an array, not a list of python numbers
            dtype = np.dtype(fmt)
            return np.frombuffer(blob, dtype=dtype, count=count, offset=pos), pos + count * width
        return list(struct.unpack_from(f"<{count}{fmt[1]}", blob.data, pos)), pos + count * width
    if etype != _STRING:
        raise ModelFileError(f"metadata arrays of type {etype} are not supported")
    values: list[str] = []
    raw = blob.data  # memoryview: what struct reads
    for _ in range(count):  # variable length: walk it; decode only if small or asked
        (length,) = struct.unpack_from("<Q", raw, pos)
        if not lazy:
            values.append(bytes(raw[pos + 8 : pos + 8 + length]).decode("utf-8", "replace"))
        pos += 8 + length
    return (count if lazy else values), pos


# ---------------------------------------------------------------------------- config


def gguf_config(gguf: GGUFFile) -> PretrainedConfig:
    """A transformers ``PretrainedConfig`` from the file's metadata, as transformers builds it."""
    from transformers import CONFIG_MAPPING
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = gguf.architecture
    updated = gguf_model_type(gguf.metadata, arch)
    if _KEYS_AS.get(updated, updated) not in GGUF_CONFIG_MAPPING:
        raise UnsupportedArchitecture(
            f"GGUF architecture {arch!r} in {gguf.path} is not supported",
            hint="use a Hugging Face directory (config.json + safetensors) for this model",
        )
    config: dict[str, Any] = {
        "tie_word_embeddings": "output.weight" not in gguf.by_name,
        **GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, {}),
    }
    for key, value in gguf.metadata.items():
        if key.endswith("@offset"):
            continue
        prefix, _, rest = key.replace(arch, updated).partition(".")
        target = GGUF_CONFIG_MAPPING.get(_KEYS_AS.get(prefix, prefix), {}).get(rest)
        if target is None and prefix == updated:
            target = _EXTRA_KEYS.get(updated, {}).get(rest)
        if target is None or target == -1:
            continue
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        config[target] = value.tolist() if isinstance(value, np.ndarray) else value
    if "vocab_size" not in config:
        tokens = gguf.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, int):
            config["vocab_size"] = tokens
    _as_llama_cpp_runs_it(gguf.metadata, arch, updated, config)
    if "rope_freqs.weight" in gguf.by_name:
        config["rope_scaling"] = llama3_rope_of(gguf.tensor("rope_freqs.weight"), config, gguf.path)
    model_type = config.get("model_type")
    if model_type == "gemma3":  # a GGUF gemma3 holds the text model only, as transformers reads it
        model_type = config["model_type"] = "gemma3_text"
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedArchitecture(f"unknown model type {model_type!r} in {gguf.path}")
    return CONFIG_MAPPING[model_type].from_dict(config)


# llama.cpp's architecture names that differ from transformers' (as its GGUF loader renames them)
_ARCH_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
_KEYS_AS = {"mixtral": "llama"}  # model types whose metadata keys map as another's


def gguf_model_type(meta: dict[str, Any], arch: str) -> str:
    """transformers' ``model_type`` of a GGUF file of architecture ``arch``: llama.cpp writes
    Mistral and Mixtral as "llama" (Mixtral: with experts, ``llama.expert_count``), Qwen MoE
    without the underscore, gemma3 for the text model (transformers' ``gemma3_text``, set
    after the config keys are read)."""
    if arch == "llama" and meta.get("llama.expert_count"):
        return "mixtral"
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        return "mistral"
    return _ARCH_RENAMES.get(arch, arch)
# ``{arch}.`` metadata keys transformers' GGUF mapping lacks, where its config default would be
# wrong: Qwen3's head_dim (128 while hidden / heads is 64 in Qwen3-0.6B), Qwen3-MoE's expert width
_EXTRA_KEYS = {
    "mixtral": {"expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok"},
    "qwen3": {"attention.key_length": "head_dim"},
    "qwen3_moe": {"expert_feed_forward_length": "moe_intermediate_size"},
}


def _as_llama_cpp_runs_it(
    meta: dict[str, Any], arch: str, updated: str, config: dict[str, Any]
) -> None:
    """Config fields llama.cpp derives rather than reads, set as it runs the file (where
    transformers' loader keeps defaults): linear rope scaling (``rope.scaling.type``/
    ``factor``; gemma3 applies it to its global layers), and gemma3's attention scale, which
    is 1/sqrt(head_dim) but 1/sqrt(hidden / heads) for the 62-block 27B
    (llama.cpp ``llama-model.cpp``, ``LLM_ARCH_GEMMA3``), and its sliding-window pattern;
    Qwen3-MoE's renormalized top-k routing weights (``norm_topk_prob``, transformers' default
    False)."""
    scaling, factor = meta.get(f"{arch}.rope.scaling.type"), meta.get(f"{arch}.rope.scaling.factor")
    if scaling == "linear" and factor is not None:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    if updated == "qwen3_moe":  # llama.cpp's qwen3moe graph renormalizes the top-k weights
        config["norm_topk_prob"] = True
    if updated != "gemma3":
        return
    blocks, hidden, heads = (config.get(k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
    head_dim = config.get("head_dim")
    if blocks == 62 and hidden and heads:
        config["query_pre_attn_scalar"] = hidden // heads
    elif head_dim:
        config["query_pre_attn_scalar"] = head_dim
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, int):
        config["sliding_window_pattern"] = pattern
    elif isinstance(pattern, list) and blocks and len(pattern) == blocks:  # per layer: True = SWA
        config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]


# the llama3 rope parameters Meta has released (Llama 3.1, 3.2, 3.3), besides the factor
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_rope_of(factors: torch.Tensor, config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``rope_scaling`` of a Llama 3.x GGUF file, from its ``rope_freqs`` tensor.

    llama.cpp's ``convert_hf_to_gguf`` writes no rope-scaling metadata for the "llama3" rope
    type, only ``rope_freqs`` [head_dim / 2]: the factor each rotary frequency is divided by,
    computed from (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    transformers' GGUF loader ignores the tensor and runs the model unscaled. The factor is its
    largest entry; the others are the released values, checked by recomputing every entry as
    the converter does. UnsupportedArchitecture if they do not reproduce the tensor.
    """
    # numpy, not torch: a config may be built under ``torch.device("meta")`` (shards)
    stored = factors.numpy().astype(np.float64)
    base = float(config.get("rope_theta", 10000.0))
    dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    factor = float(stored.max())
    low, high = _LLAMA3_ROPE["low_freq_factor"], _LLAMA3_ROPE["high_freq_factor"]
    context = _LLAMA3_ROPE["original_max_position_embeddings"]
    wavelen = 2 * np.pi * base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # 2 pi / freq
    smooth = (context / wavelen - low) / (high - low)
    expected = np.where(
        wavelen < context / high,
        1.0,
        np.where(wavelen > context / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-5, atol=0):
        raise UnsupportedArchitecture(
            f"{path}: rope_freqs is not a Llama 3 rope scaling this loader knows",
            hint="use the Hugging Face directory (config.json) of this model",
        )
    return {"rope_type": "llama3", "factor": factor, **_LLAMA3_ROPE}


# GGUF architectures whose shape is read from the metadata without transformers: each maps
# the keys below as transformers' GGUF_CONFIG_MAPPING does (tests/test_startup.py checks it);
# any other architecture, or a file lacking a key, goes through ``gguf_config``
_LIGHT_ARCHS = ("llama", "qwen2", "phi3")


def gguf_shape(gguf: GGUFFile) -> ModelShape:
    """The ``ModelShape`` of the file from its metadata alone (no transformers import): equal
    to ``shape_of(gguf_config(gguf))``, which it falls back to when a field is missing."""
    meta, arch = gguf.metadata, gguf.architecture
    model_type = gguf_model_type(meta, arch)
    tokens = meta.get("tokenizer.ggml.tokens")  # lazily parsed: the count
    found: dict[str, Any] = {
        "blocks": meta.get(f"{arch}.block_count"),
        "hidden": meta.get(f"{arch}.embedding_length"),
        "vocab": meta.get(f"{arch}.vocab_size", tokens if isinstance(tokens, int) else None),
        "eps": meta.get(f"{arch}.attention.layer_norm_rms_epsilon"),
        "eos": meta.get("tokenizer.ggml.eos_token_id"),
        "context": meta.get(f"{arch}.context_length"),
    }
    light = arch in _LIGHT_ARCHS and model_type in (arch, "mistral")
    if not light or any(value is None for value in found.values()):
        return shape_of(gguf_config(gguf))
    return ModelShape(
        model_type=model_type,
        num_hidden_layers=int(found["blocks"]),
        hidden_size=int(found["hidden"]),
        vocab_size=int(found["vocab"]),
        rms_norm_eps=float(found["eps"]),
        tie_word_embeddings="output.weight" not in gguf.by_name,
        eos_token_id=(int(found["eos"]),),
        max_position_embeddings=int(found["context"]),
    )


def gguf_arch(gguf: GGUFFile) -> MODEL_ARCH:
    """gguf-py's ``MODEL_ARCH`` for the file (used to map tensor names)."""
    for arch, name in MODEL_ARCH_NAMES.items():
        if name == gguf.architecture:
            return arch
    raise UnsupportedArchitecture(f"GGUF architecture {gguf.architecture!r} is unknown to gguf-py")


def reverse_permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf ``LlamaModel.permute``).

    ``weight``: [n_head * head_dim, in]; llama.cpp interleaves the two rotary halves of each head.
    """
    dim = weight.shape[0] // n_head // 2
    w = weight.reshape(n_head, dim, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape).contiguous()

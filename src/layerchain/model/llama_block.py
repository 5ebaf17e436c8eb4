"""Llama decoder blocks of our own: transformers' ``LlamaDecoderLayer`` bit for bit, without it.

Why: importing transformers' llama modeling module (and building a ``LlamaConfig``) costs a
node about 120 MiB of private memory (``torch._dynamo``, ``torch.distributed.tensor``, sympy,
accelerate, scipy; docs/BENCHMARKS.md "Node memory"), more than SmolLM2's weights for ten
blocks. A node serving a llama-family model builds these instead: the same modules under the
same names (``self_attn.q_proj.weight``, ``mlp.gate_proj.weight``, ``input_layernorm.weight``,
...; so ``load_span``'s state dicts load unchanged), the same torch ops in the same order, so
the outputs are the same bits (tests/test_llama_block.py checks them against transformers'
classes: prefill with masks, decode, batches, GQA, llama3 and linear rope scaling). The
config is a small frozen record read from the GGUF metadata (``gguf_block_config``: the keys
and defaults transformers' GGUF loader would use) or from a transformers config
(``block_config_of``), never a ``LlamaConfig``.

What is mirrored, and nothing more: ``LlamaRMSNorm``, ``LlamaRotaryEmbedding`` for the rope
types llama GGUF files use (``ROPE_TYPES``: plain, linear, llama3), ``apply_rotary_pos_emb``,
``LlamaAttention`` through transformers' SDPA attention function (``sdpa_attention``: its GQA
choices, ``scaled_dot_product_attention``), the SiLU MLP, and ``LlamaDecoderLayer.forward``'s
signature (``cache=`` with a KV cache's ``update`` API). Anything else (another activation,
rope type or attention dropout) gets ``None`` from the config readers, and the span is built
from transformers' classes as before. The module knows nothing of files, spans or networks.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from layerchain.model.gguf_file import GGUFFile, gguf_model_type, llama3_rope_of

ROPE_TYPES = ("default", "linear", "llama3")  # rotary variants mirrored here
# LlamaConfig's defaults where a GGUF file states nothing (transformers' GGUF loader keeps them)
_DEFAULT_THETA, _DEFAULT_EPS, _DEFAULT_CONTEXT = 10000.0, 1e-6, 2048


@dataclass(frozen=True)
class LlamaBlockConfig:
    """What a llama block and its rotary table read of a model's config; each field has the
    value transformers' ``LlamaConfig`` of the same model has (rope fields: those of its
    ``rope_parameters``)."""

    hidden_size: int  # H
    intermediate_size: int  # the MLP's width
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (GQA: fewer than query heads)
    head_dim: int  # D
    rms_norm_eps: float
    max_position_embeddings: int  # the context, tokens
    rope_theta: float = _DEFAULT_THETA  # rotary base
    rope_type: str = "default"  # one of ROPE_TYPES
    rope_factor: float = 1.0  # linear, llama3: frequencies divided by this
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3: the pre-scaling context, tokens
    attention_bias: bool = False  # q/k/v/o projections carry biases
    mlp_bias: bool = False  # gate/up/down projections carry biases
    model_type: str = "llama"  # what ``families`` keys it by


def block_config_of(config: object) -> LlamaBlockConfig | None:
    """The block config of a transformers llama config (read by attribute: transformers is
    not imported here), or None when the blocks do something not mirrored here."""
    get = functools.partial(getattr, config)
    rope = get("rope_parameters", None) or {
        "rope_type": (get("rope_scaling", None) or {}).get("rope_type", "default"),
        "rope_theta": get("rope_theta", _DEFAULT_THETA),
        **(get("rope_scaling", None) or {}),
    }
    kind = rope.get("rope_type", rope.get("type", "default"))
    if (
        get("model_type", None) != "llama"
        or get("hidden_act", "silu") != "silu"
        or float(get("attention_dropout", 0.0) or 0.0) != 0.0
        or kind not in ROPE_TYPES
        or "rope_theta" not in rope
        or float(rope.get("partial_rotary_factor", 1.0)) != 1.0
    ):
        return None
    heads, hidden = int(get("num_attention_heads")), int(get("hidden_size"))
    kv_heads = get("num_key_value_heads", None)
    scaled = kind != "default"
    return LlamaBlockConfig(
        hidden_size=hidden,
        intermediate_size=int(get("intermediate_size")),
        num_attention_heads=heads,
        num_key_value_heads=heads if kv_heads is None else int(kv_heads),
        head_dim=int(get("head_dim", None) or hidden // heads),
        rms_norm_eps=float(get("rms_norm_eps")),
        max_position_embeddings=int(get("max_position_embeddings")),
        rope_theta=float(rope["rope_theta"]),
        rope_type=kind,
        rope_factor=float(rope["factor"]) if scaled else 1.0,
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        attention_bias=bool(get("attention_bias", False)),
        mlp_bias=bool(get("mlp_bias", False)),
    )


def gguf_block_config(gguf: GGUFFile) -> LlamaBlockConfig | None:
    """The block config of a GGUF file of architecture "llama" that transformers reads as a
    llama model, from its metadata (and its ``rope_freqs`` tensor, if any: the llama3 rope
    scaling), as ``gguf_file.gguf_config`` would build it, without transformers; None for
    anything else (mistral, mixtral, a rope scaling not mirrored, a missing key)."""
    meta = gguf.metadata
    if gguf.architecture != "llama" or gguf_model_type(meta, "llama") != "llama":
        return None
    key = "llama.{}".format
    hidden, ffn, heads = (
        meta.get(key(k)) for k in ("embedding_length", "feed_forward_length", "attention.head_count")
    )
    if hidden is None or ffn is None or heads is None:
        return None
    kv_heads, head_dim = meta.get(key("attention.head_count_kv")), meta.get(key("rope.dimension_count"))
    scaling = meta.get(key("rope.scaling.type"))
    rope: dict[str, Any] = {"rope_type": "default"}
    if scaling == "linear" and meta.get(key("rope.scaling.factor")) is not None:
        rope = {"rope_type": "linear", "factor": float(meta[key("rope.scaling.factor")])}
    elif scaling not in (None, "none"):
        return None  # not mirrored: leave it to gguf_config
    fields: dict[str, Any] = {
        "hidden_size": int(hidden),
        "num_attention_heads": int(heads),
        "rope_theta": float(meta.get(key("rope.freq_base"), _DEFAULT_THETA)),
        "head_dim": None if head_dim is None else int(head_dim),
    }
    if "rope_freqs.weight" in gguf.by_name:  # Llama 3.x
        rope = llama3_rope_of(gguf.tensor("rope_freqs.weight"), fields, gguf.path)
    config = ConfigFields(
        model_type="llama",
        intermediate_size=int(ffn),
        num_key_value_heads=None if kv_heads is None else int(kv_heads),
        rms_norm_eps=float(meta.get(key("attention.layer_norm_rms_epsilon"), _DEFAULT_EPS)),
        max_position_embeddings=int(meta.get(key("context_length"), _DEFAULT_CONTEXT)),
        rope_parameters={**rope, "rope_theta": fields["rope_theta"]},
        **fields,
    )
    return block_config_of(config)


class ConfigFields:
    """A config's fields as attributes (what ``block_config_of`` and ``shape.shape_of`` read):
    a config dict as written (a shard manifest's), or keyword arguments."""

    def __init__(self, fields: dict[str, Any] | None = None, **more: Any) -> None:
        self.__dict__.update(fields or {}, **more)


# ---------------------------------------------------------------------------- modules


class LlamaRMSNorm(nn.Module):
    """transformers' ``LlamaRMSNorm``: ``weight * x / sqrt(mean(x^2) + eps)``, in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rope_inv_freq(config: LlamaBlockConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [D/2], attention scaling) as transformers' rope init functions
    compute them for ``config.rope_type`` (the same ops: the same bits)."""
    base, dim = config.rope_theta, config.head_dim
    if config.rope_type == "default":
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    factor = config.rope_factor
    if config.rope_type == "linear":
        inv_freq /= factor
        return inv_freq, 1.0
    low, high = config.low_freq_factor, config.high_freq_factor  # llama3
    old_context = config.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context / wavelen - low) / (high - low)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0


class LlamaRotaryEmbedding(nn.Module):
    """transformers' ``LlamaRotaryEmbedding``: (cos, sin) [B, T, D] for position ids [B, T]."""

    inv_freq: torch.Tensor  # [D/2]

    def __init__(self, config: LlamaBlockConfig) -> None:
        super().__init__()
        self.rope_type = config.rope_type
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: (-second half, first half)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, heads, T, D], k [B, kv_heads, T, D] rotated by cos/sin [B, T, D]."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def rotate_heads(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> torch.Tensor:
    """``apply_rotary_pos_emb``'s ops on one tensor of heads x [B, heads, T, D] (query and key
    heads side by side: each element gets the same ops as there, so the same bits)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (x * cos) + (rotate_half(x) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, kv_heads * n_rep, S, D], each head repeated in place."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def _pack_gqa(hidden_states: torch.Tensor | None, n_rep: int) -> torch.Tensor | None:
    """One query token: [B, heads, 1, D] -> [B, kv_heads, n_rep, D]; a shared mask unchanged."""
    if hidden_states is None or hidden_states.shape[1] == 1:
        return hidden_states
    batch, num_attention_heads, _, dim = hidden_states.shape
    return hidden_states.reshape(batch, num_attention_heads // n_rep, n_rep, dim)


@functools.cache
def _gqa_with_mask() -> bool:
    """Whether transformers lets SDPA do GQA under a mask on this machine (XPU, MPS with
    torch >= 2.13, as its ``use_gqa_in_sdpa``; this project's torch is 2.13)."""
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available()) or torch.backends.mps.is_available()


def _use_gqa_in_sdpa(mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> bool:
    if os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1" or _gqa_with_mask():
        return True
    return mask is None and key.shape[-1] == value.shape[-1] <= 256


def sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward`` (CPU, CUDA, MPS, XPU paths): query
    [B, heads, T, D], key/value [B, kv_heads, S, D], a boolean mask [1, 1, T, S] or None ->
    ([B, T, heads, D], None)."""
    sdpa_kwargs = {}
    q_length = query.shape[2]
    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:
        if _use_gqa_in_sdpa(attention_mask, key, value):
            sdpa_kwargs["enable_gqa"] = True
        elif q_length == 1 and not torch.compiler.is_compiling():
            query = _pack_gqa(query, groups)  # type: ignore[assignment]
            attention_mask = _pack_gqa(attention_mask, groups)
        else:
            key = repeat_kv(key, groups)
            value = repeat_kv(value, groups)
    kv_length = key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and bool(is_causal)
    if is_causal and attention_mask is None and q_length > 1 and kv_length > q_length:
        key = key[:, :, :q_length, :]
        value = value[:, :, :q_length, :]
    attn_output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=is_causal, **sdpa_kwargs,
    )
    attn_output = attn_output.reshape(attn_output.shape[0], -1, q_length, value.shape[-1])
    return attn_output.transpose(1, 2).contiguous(), None


class KVUpdate(Protocol):
    """What attention needs of a KV cache (``span.KVCache``, transformers' ``Cache``)."""

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]: ...


class LlamaAttention(nn.Module):
    """transformers' ``LlamaAttention`` (SDPA): hidden [B, T, H] -> [B, T, H]."""

    def __init__(self, config: LlamaBlockConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # global block index: the KV cache's key
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        heads, kv_heads, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: KVUpdate | None = None,
    ) -> tuple[torch.Tensor, None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)  # [B, T, heads, D]
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        attn_output, attn_weights = sdpa_attention(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0, scaling=self.scaling,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class LlamaMLP(nn.Module):
    """transformers' ``LlamaMLP`` with SiLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaBlockConfig) -> None:
        super().__init__()
        width, bias = config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


class LlamaDecoderLayer(nn.Module):
    """transformers' ``LlamaDecoderLayer``: hidden [B, T, H] -> [B, T, H], pre-norm attention
    and MLP, each added to its input. ``attention_mask``: boolean [1, 1, T, S] (True = may
    attend) or None (one query seeing every key, or ``is_causal`` SDPA when nothing is cached);
    ``cache``: the KV cache the new keys/values are appended to (``update``)."""

    def __init__(self, config: LlamaBlockConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVUpdate | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if position_embeddings is None:
            raise TypeError("a llama block takes its rotary (cos, sin) as position_embeddings")
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states, position_embeddings, attention_mask=attention_mask, cache=cache
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


@dataclass(frozen=True)
class BlockClasses:
    """The classes a span is built of: a decoder layer ``(config, layer_idx)``, its rotary
    table ``(config=config)`` and its RMS norm (how ``SpanModel`` finds its compute dtype)."""

    decoder_layer: type[nn.Module]
    rotary_embedding: type[nn.Module]
    rms_norm: type[nn.Module]


OWN = BlockClasses(LlamaDecoderLayer, LlamaRotaryEmbedding, LlamaRMSNorm)

"""A span of decoder blocks ``[start, end)`` and its per-session KV cache.

``load_span(spec, start, end, device=...)`` builds transformers' own decoder-layer classes for
the model's family (for llama, ``model.llama_block``'s, the same bits without importing
transformers; ``block_config``), each with its true global ``layer_idx``, on the meta device, then fills
them with the span's tensors only, as float32, one block at a time moved to ``device`` (CPU by
default; ``model.device``). Memory for weights is thus proportional to the span's share of the
blocks. ``SpanModel.forward(hidden, cache)`` runs the blocks on hidden states
``[batch, tokens, hidden]`` at positions ``cache.length + arange(tokens)``, appending the new
keys and values to ``cache``. A chain of spans computes exactly what the whole model computes in
one process, because it runs the same layers with the same masks and positions.

Placement: the span's weights, rotary tables and every KV cache it makes live on
``span.device``; ``forward`` takes hidden states from anywhere (the wire delivers them in CPU
memory, in the sender's dtype) and moves them with one copy to the span's device and compute
dtype (``span.compute_dtype``); its output stays there (the caller moves it once, e.g. to the
wire). Every tensor a step creates (positions, masks, cache storage) is made on that device.

The causal mask is built explicitly whenever it is not trivial (several tokens, or a sliding
window shorter than the context), so a step of T > 1 tokens on a cache that already holds tokens
(replay after a failover, a multi-turn chat) is correct; a one-token decode step needs no mask.
The span knows nothing of sessions, peers or networks.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from layerchain.errors import ModelFileError, SpanError
from layerchain.model.device import resolve_device
from layerchain.model.families import rope_key_of, sliding_window_of
from layerchain.model.gguf_file import GGUFFile
from layerchain.model import llama_block
from layerchain.model.llama_block import OWN, BlockClasses, LlamaBlockConfig
from layerchain.model.kv_cache import KVCache as KVCache  # its home; imported from here too
from layerchain.model.native_step import NativeStep
from layerchain.model.quant import fused, quantize_module, release_freed_memory
from layerchain.model.spec import ModelSpec
from layerchain.types import Span

if TYPE_CHECKING:
    from transformers import PretrainedConfig

class SpanModel(nn.Module):
    """Decoder blocks ``[start, end)`` of one model, eval mode, no gradients, on one device
    (``device``), computing in one dtype (``compute_dtype``: float32 unless cast to half)."""

    def __init__(
        self,
        spec: ModelSpec,
        start: int,
        end: int,
        layers: list[nn.Module],
        config: PretrainedConfig | LlamaBlockConfig,
    ) -> None:
        super().__init__()
        self.spec, self.start, self.end = spec, start, end
        self.config = config
        self.classes = block_classes(spec, config)  # our own llama blocks', or transformers'
        self.layers = nn.ModuleList(layers)
        self.rotary_emb = self.classes.rotary_embedding(config=config)
        # one window per layer (None = full attention); masks are built once per distinct window
        self.windows = [sliding_window_of(config, i) for i in range(start, end)]
        # one rotary table key per layer (None: the one table; gemma3: the layer's type)
        self.rope_keys = [rope_key_of(spec.family_info, config, i) for i in range(start, end)]
        # transformers 5.x names the layer's KV-cache argument ``cache`` (``past_key_values``
        # is deprecated with a FutureWarning); older releases know only ``past_key_values``
        accepted = inspect.signature(self.classes.decoder_layer.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._placement = _placement_of(self)  # (device, compute dtype), kept by ``_apply``
        self.rotary_emb.to(self._placement[0])  # with the blocks, whoever built them
        # one-token steps needing no mask (every decode step within the window) run the
        # blocks through ``LeanDecode``: the same modules and functions in the same order,
        # without the decoder layer's own dispatch; False: always the layers' own forward
        lean = LeanDecode.for_layers(spec, layers)
        self._lean = lean if lean is not None and self._agrees(lean) else None
        self.fast_decode = self._lean is not None
        # one-token steps through our own llama blocks in native code when it is built
        # (``model.native_step``: the lean path's ops from C++, same bits); False: never
        own = self._lean is not None and self._lean.rotate is llama_block.apply_rotary_pos_emb
        self._native = NativeStep.for_span(self) if own else None
        self.native_decode = self._native is not None

    def _agrees(self, lean: LeanDecode) -> bool:
        """Whether ``lean`` gives the first block's own bits for two one-token steps on a
        random input (the second reading the first's keys): a transformers release whose
        layers do more than ``LeanDecode`` mirrors fails this, and the span keeps the plain
        path. Costs two tokens through one block, once per span."""
        layer, index = self.layers[0], self.start
        device, dtype = self._placement
        g = torch.Generator().manual_seed(0)
        xs = torch.randn(2, 1, 1, self.config.hidden_size, generator=g).to(device, dtype)
        outs: dict[bool, torch.Tensor] = {}
        with torch.inference_mode():
            for fast in (False, True):
                cache = KVCache(index, index + 1, max_length=2)
                for position, x in enumerate(xs):
                    ids = torch.full((1, 1), position, dtype=torch.long, device=device)
                    cos_sin = self.rotary_emb(x, ids)
                    if fast:
                        out = lean(layer, x, cos_sin, cache)
                    else:
                        kwargs = {self._cache_arg: cache, "use_cache": True}
                        got = layer(x, attention_mask=None, position_ids=ids,
                                    position_embeddings=cos_sin, **kwargs)
                        out = got[0] if isinstance(got, tuple) else got
                    cache.length += 1
                outs[fast] = out
        return bool(torch.equal(outs[False], outs[True]))

    @property
    def native(self) -> NativeStep | None:
        """The native decode path (``model.native_step``) when built, applicable to these
        blocks and switched on (``native_decode``), else None."""
        return self._native if self.native_decode else None

    @property
    def device(self) -> torch.device:
        """Where the weights, the rotary tables and the KV caches live, and steps compute."""
        return self._placement[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype hidden states are computed in (that of the blocks' norms: float32 for
        float32 or weight-only quantized spans, bfloat16/float16 for a cast span)."""
        return self._placement[1]

    def _apply(self, fn: Any, recurse: bool = True) -> SpanModel:
        """``nn.Module._apply`` (behind ``.to``, ``.cuda``, ``.half``), then re-read the
        placement, so ``device``/``compute_dtype`` never go stale."""
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._placement = _placement_of(self)
        return self

    @property
    def span(self) -> Span:
        return Span(self.start, self.end)

    def new_cache(
        self, start: int | None = None, end: int | None = None, *, max_length: int | None = None
    ) -> KVCache:
        """An empty KV cache for one session on blocks ``[start, end)`` of this span.

        Default: all of it (a route may use any sub-range of a peer's span); the cache holds
        ``max_length`` tokens at most (None: unbounded, grown by doubling)."""
        start, end = self._sub_range(start, end)
        return KVCache(start, end, max_length)

    def _sub_range(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise SpanError(
                f"blocks {start}:{end} are not a non-empty part of this span {self.span}"
            )
        return start, end

    def parameter_bytes(self) -> int:
        """Bytes of weights held: parameters and buffers (compact forms keep theirs in buffers)."""
        tensors = [*self.parameters(), *self.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: KVCache | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """hidden [B, T, H] -> [B, T, H] through blocks ``[start, end)``; the input may be on
        any device in any float dtype (moved with one copy, ``to_span``), the output is on
        ``device`` in ``compute_dtype``.

        With a cache: runs the cache's blocks (``start``/``end``, if given, must agree) under
        ``torch.inference_mode`` at positions ``cache.length + arange(T)``, appending T tokens.
        Without one: a stateless pass over positions ``0..T-1`` through ``[start, end)``
        (default: the whole span); gradients flow if enabled.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise SpanError(
                f"hidden states must be [batch, tokens, {self.config.hidden_size}], "
                f"got {list(hidden.shape)}"
            )
        hidden = self.to_span(hidden)
        if cache is None:
            return self._run(hidden, None, 0, *self._sub_range(start, end))
        if (start is not None and start != cache.start) or (end is not None and end != cache.end):
            raise SpanError(f"cache is for blocks {cache.start}:{cache.end}, not {start}:{end}")
        self._sub_range(cache.start, cache.end)
        with torch.inference_mode():
            out = self._run(hidden, cache, cache.length, cache.start, cache.end)
            cache.length += hidden.shape[1]
        return out

    def forward_stepwise(self, hidden: torch.Tensor, cache: KVCache) -> Iterator[torch.Tensor]:
        """``forward(hidden, cache)`` one block at a time, for a caller that must stay
        responsive during a long step (a node answering pings between the blocks of a
        prefill): yields the hidden states [B, T, H] after each of the cache's blocks, the
        last being the output, and advances ``cache.length`` by T after the last. Each block
        runs under ``torch.inference_mode``, which is not held across a yield. The same
        layers run on the same inputs as in ``forward``: the same numbers. Abandoned midway,
        the cache keeps its length, as after a failed forward."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise SpanError(
                f"hidden states must be [batch, tokens, {self.config.hidden_size}], "
                f"got {list(hidden.shape)}"
            )
        self._sub_range(cache.start, cache.end)
        past = cache.length
        hidden = self.to_span(hidden)
        rotary = None  # the step's positions and cos/sin, computed once for all its blocks
        for block in range(cache.start, cache.end):
            with torch.inference_mode():
                if rotary is None:
                    rotary = self._positions(hidden, past)
                hidden = self._run(hidden, cache, past, block, block + 1, rotary)
            if block + 1 == cache.end:
                cache.length = past + hidden.shape[1]
            yield hidden

    def to_span(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` on this span's device in its compute dtype: itself when it already is,
        else one copy (a wire tensor in CPU memory to a GPU, a float16 input to float32)."""
        device, dtype = self._placement
        if hidden.device == device and hidden.dtype == dtype:
            return hidden
        return hidden.to(device=device, dtype=dtype)

    def _positions(self, hidden: torch.Tensor, past: int) -> Rotary:
        """Position ids [1, T] of a step's tokens and their rotary (cos, sin), each
        [1, T, rot_dim], on ``hidden``'s device, per rotary table key (``rope_keys``): the
        same for every block of the step that uses that table."""
        tokens = hidden.shape[1]
        position_ids = torch.arange(past, past + tokens, device=hidden.device).unsqueeze(0)
        tables = {
            key: self.rotary_emb(hidden, position_ids)
            if key is None
            else self.rotary_emb(hidden, position_ids, key)
            for key in dict.fromkeys(self.rope_keys)
        }
        return position_ids, tables

    def _run(
        self,
        hidden: torch.Tensor,
        cache: KVCache | None,
        past: int,
        start: int,
        end: int,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        tokens = hidden.shape[1]
        position_ids, tables = self._positions(hidden, past) if rotary is None else rotary
        masks: dict[int | None, torch.Tensor | None] = {}
        lo, hi = start - self.start, end - self.start
        cache_kwargs = {self._cache_arg: cache, "use_cache": cache is not None}
        lean = self._lean if self.fast_decode and tokens == 1 and cache is not None else None
        native = self.native if lean is not None and cache is not None else None
        if native is not None and cache is not None:
            # a native span's blocks need no mask for one token (no sliding windows)
            # a plain list: slicing the ModuleList builds a new Module (~50 us a step)
            layers = list(self.layers)[lo:hi]
            out = native(layers, hidden, tables[self.rope_keys[lo]], cache, lean)
            if out is not None:
                return out
        for layer, window, rope_key in zip(
            self.layers[lo:hi], self.windows[lo:hi], self.rope_keys[lo:hi], strict=True
        ):
            cos_sin = tables[rope_key]
            if window not in masks:
                masks[window] = causal_mask(past, tokens, window, hidden.device)
            if lean is not None and cache is not None and masks[window] is None:
                hidden = lean(layer, hidden, cos_sin, cache)
                continue
            out = layer(
                hidden,
                attention_mask=masks[window],
                position_ids=position_ids,
                position_embeddings=cos_sin,
                **cache_kwargs,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


# position ids [1, T], {rotary table key: (cos, sin)} (see ``SpanModel.rope_keys``)
Rotary = tuple[torch.Tensor, dict[str | None, tuple[torch.Tensor, torch.Tensor]]]

LEAN_FAMILIES = ("llama", "mistral", "qwen2")  # blocks shaped as transformers' LlamaDecoderLayer


@dataclass(frozen=True)
class LeanDecode:
    """One-token decode steps without a mask through llama-shaped blocks, op for op what
    the block's own ``forward`` computes (the same torch ops and transformers' own rotary and
    SDPA functions, in the same order, so the outputs are bit-identical; checked for the first
    block when a span is built, and by tests/test_span_overheads for every such family), minus
    the Python around them: the decoder layer's, attention's, norms', MLP's and plain
    linears' module calls, two keyword-deprecation wrappers, the attention-interface lookup,
    the keyword dictionaries, the norms' no-op casts. A third fewer Python calls per block,
    4-7% of a SmolLM2 decode step's CPU time (docs/BENCHMARKS.md, "Per-step overheads")."""

    rotate: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # the family's apply_rotary_pos_emb
    attend: Callable[..., tuple[torch.Tensor, Any]]  # transformers' sdpa_attention_forward

    @classmethod
    def for_layers(cls, spec: ModelSpec, layers: list[nn.Module]) -> LeanDecode | None:
        """The lean path for ``layers`` of ``spec``'s family, or None when they are not all
        the family's own blocks (a cheat's stand-ins) or the family is not llama-shaped."""
        if layers and all(type(layer) is OWN.decoder_layer for layer in layers):
            return cls(llama_block.apply_rotary_pos_emb, llama_block.sdpa_attention)
        family = spec.family_info
        if family.name not in LEAN_FAMILIES or not layers:
            return None
        if not all(type(layer) is family.decoder_layer for layer in layers):
            return None
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        module = sys.modules[family.decoder_layer.__module__]
        return cls(module.apply_rotary_pos_emb, ALL_ATTENTION_FUNCTIONS["sdpa"])

    def __call__(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
    ) -> torch.Tensor:
        """``layer(hidden, attention_mask=None, position_embeddings=cos_sin, cache=cache)``
        for hidden [B, 1, H]."""
        block: Any = layer  # a llama-shaped decoder layer (``for_layers`` checked its class)
        attn = block.self_attn
        residual = hidden
        x = _rms_norm(block.input_layernorm, hidden)
        query, key, value = rotated_qkv(attn, x, self.rotate, cos_sin)  # [B, heads | kv, T, D]
        key, value = cache.update(key, value, attn.layer_idx)
        out, _ = self.attend(attn, query, key, value, None, dropout=0.0, scaling=attn.scaling)
        hidden = residual + _linear(attn.o_proj, out.reshape(*x.shape[:-1], -1).contiguous())
        residual = hidden
        return residual + mlp_out(block.mlp, _rms_norm(block.post_attention_layernorm, hidden))


def project_qkv(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value of a llama-shaped attention module for the normed hidden states
    x [B, T, H]: [B, heads, T, D], [B, kv_heads, T, D], [B, kv_heads, T, D] (views, before
    rotary). The one place the q/k/v projections run on the lean and batched decode paths
    (``LeanDecode``, ``model.batched``), so another kernel for them is swapped in here."""
    shape = (*x.shape[:-1], -1, attn.head_dim)  # [B, T, heads, D]
    parts = fused(attn, "fused_qkv", attn.q_proj, attn.k_proj, attn.v_proj)  # int4: one call
    if parts is not None:
        query, key, value = parts(x)
    else:
        query, key, value = (_linear(m, x) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    return (
        query.view(shape).transpose(1, 2),
        key.view(shape).transpose(1, 2),
        value.view(shape).transpose(1, 2),
    )


def rotated_qkv(
    attn: Any,
    x: torch.Tensor,
    rotate: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    cos_sin: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``project_qkv`` then ``rotate(query, key, *cos_sin)``: query and key rotated, value as
    is. For our own llama blocks (``rotate`` is ``llama_block.apply_rotary_pos_emb``) with
    fused int4 q/k/v, query and key are rotated as one tensor of heads (their columns sit
    side by side in the fused output): the same elementwise ops on the same values, so the
    same bits, with half the rotary ops (docs/BENCHMARKS.md "Per-step overheads")."""
    parts = fused(attn, "fused_qkv", attn.q_proj, attn.k_proj, attn.v_proj)
    if parts is None or rotate is not llama_block.apply_rotary_pos_emb:
        query, key, value = project_qkv(attn, x)
        query, key = rotate(query, key, *cos_sin)
        return query, key, value
    q_size, k_size, _ = parts.sizes
    out = parts.joint(x)  # [B, T, q + k + v]
    shape = (*x.shape[:-1], -1, attn.head_dim)  # [B, T, heads, D]
    both = llama_block.rotate_heads(
        out[..., : q_size + k_size].view(shape).transpose(1, 2), *cos_sin
    )  # [B, heads + kv_heads, T, D]
    heads = q_size // attn.head_dim
    value = out[..., q_size + k_size :].view(shape).transpose(1, 2)
    return both[:, :heads], both[:, heads:], value


def mlp_out(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    """A llama-shaped MLP's output [B, T, H] for the normed hidden states x [B, T, H]:
    ``down(act(gate(x)) * up(x))``; the one place it runs on the lean and batched decode
    paths (see ``project_qkv``)."""
    parts = fused(mlp, "fused_gate_up", mlp.gate_proj, mlp.up_proj)  # int4: one call
    if parts is not None:
        gate, up = parts(x)
    else:
        gate, up = _linear(mlp.gate_proj, x), _linear(mlp.up_proj, x)
    if type(mlp.act_fn) is nn.SiLU:  # its op, and the product into its fresh output: same bits
        return _linear(mlp.down_proj, F.silu(gate).mul_(up))
    return _linear(mlp.down_proj, mlp.act_fn(gate) * up)


def _linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; for a plain ``nn.Linear`` its one op without the module call (a
    compact form's module, ``model.quant``, is called as it is)."""
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module(x)  # type: ignore[no-any-return]


def _rms_norm(norm: Any, hidden: torch.Tensor) -> torch.Tensor:
    """``norm(hidden)`` for the llama-shaped families' RMSNorm: for a float32 input, its ops
    without the two casts that are then no-ops and without the module call."""
    if hidden.dtype != torch.float32:
        return norm(hidden)  # type: ignore[no-any-return]
    variance = hidden.pow(2).mean(-1, keepdim=True)  # fresh: the next two ops run in place
    scaled = hidden * variance.add_(norm.variance_epsilon).rsqrt_()
    return scaled.mul_(norm.weight)  # = weight * scaled, bit for bit (one allocation less)


def _placement_of(span: SpanModel) -> tuple[torch.device, torch.dtype]:
    """(device, compute dtype) of a span: those of its first RMS norm's weight (never
    quantized, always in the dtype activations run in), else of its first floating tensor."""
    norm = span.classes.rms_norm
    tensors: list[torch.Tensor] = [
        next(m.parameters()) for m in span.layers.modules() if isinstance(m, norm)
    ]
    tensors += [t for t in (*span.parameters(), *span.buffers()) if t.is_floating_point()]
    return (tensors[0].device, tensors[0].dtype) if tensors else (torch.device("cpu"), torch.float32)


def causal_mask(
    past: int, tokens: int, window: int | None, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """Boolean mask [1, 1, T, past+T] (True = may attend), or None when nothing is masked.

    Query ``i`` sits at position ``past + i`` and sees keys at positions ``<= past + i`` (and,
    with a sliding window, ``> past + i - window``, as transformers' ``sliding_window_overlay``).
    """
    total = past + tokens
    if tokens == 1 and (window is None or total <= window):
        return None  # one query at the newest position sees every key
    q_pos = torch.arange(past, total, device=device).unsqueeze(1)  # [T, 1]
    k_pos = torch.arange(total, device=device).unsqueeze(0)  # [1, past+T]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed[None, None]


def span_config(spec: ModelSpec) -> PretrainedConfig:
    """A private copy of the spec's config, set to run transformers' SDPA attention (and,
    for a mixture of experts, the experts' implementation ``AutoModelForCausalLM`` picks by
    default: "grouped_mm"; the per-expert loop differs in the last bits)."""
    config = copy.deepcopy(spec.config)
    config._attn_implementation = "sdpa"
    if spec.family_info.experts is not None:
        config._experts_implementation = "grouped_mm"
    return config


def block_config(spec: ModelSpec) -> PretrainedConfig | LlamaBlockConfig:
    """The config a span of ``spec`` is built from: for a llama model whose blocks
    ``model.llama_block`` mirrors, its own small record (from a GGUF file's metadata: no
    transformers import, about 120 MiB less for a node; docs/BENCHMARKS.md "Node memory"),
    else transformers' (``span_config``)."""
    own: LlamaBlockConfig | None = None
    if spec.family == "llama":
        file = getattr(spec.source, "file", None)  # a GGUF source's: read without transformers
        manifest = getattr(spec.source, "manifest", None)  # a shard directory's
        if isinstance(file, GGUFFile):
            own = llama_block.gguf_block_config(file)
        elif isinstance(manifest, dict) and isinstance(manifest.get("config"), dict):
            own = llama_block.block_config_of(llama_block.ConfigFields(manifest["config"]))
        else:
            own = llama_block.block_config_of(spec.config)
    return span_config(spec) if own is None else own


def block_classes(spec: ModelSpec, config: PretrainedConfig | LlamaBlockConfig) -> BlockClasses:
    """The classes of ``spec``'s blocks for ``config`` (``block_config``): ours for our own
    record, else the family's transformers classes."""
    if isinstance(config, LlamaBlockConfig):
        return OWN
    family = spec.family_info
    return BlockClasses(family.decoder_layer, family.rotary_embedding, family.rms_norm)


def load_span(
    spec: ModelSpec,
    start: int,
    end: int,
    *,
    dtype: str | None = None,
    device: str | torch.device = "cpu",
) -> SpanModel:
    """Blocks ``[start, end)`` of ``spec`` with only their own tensors loaded (float32, eval).

    ``dtype`` (concrete, see ``quant.resolve_dtype``; None: the spec's own form, ``spec.dtype``,
    fp32 unless ``spec.in_form`` chose another) other than fp32 rewrites each block's
    linears in that compact form as it loads (``quant.quantize_module``), so at most one
    block's float32 matrices are held at a time.

    ``device`` (a ``model.device`` name or a ``torch.device``): each block is read into CPU
    memory and moved there before the next is read, so the CPU holds one block's tensors at
    most.

    Raises SpanError for an empty or out-of-range span, ModelFileError for missing or
    unreadable tensors, ConfigError for a device this machine does not have.
    """
    Span(start, end).check_within(spec.num_blocks)
    dtype = spec.dtype if dtype is None else dtype
    place = resolve_device(device) if isinstance(device, str) else device
    config = block_config(spec)
    layer_cls = block_classes(spec, config).decoder_layer
    layers = []
    for index in range(start, end):
        with torch.device("meta"):
            layer = layer_cls(config, index)
        names = list(layer.state_dict().keys())
        state = spec.source.block_state(index, names)
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise ModelFileError(
                f"block {index} of {spec.name} does not fit its config: "
                f"{str(error).splitlines()[0]}"
            ) from None
        layers.append(quantize_module(layer, dtype).to(place))
    if dtype != "fp32":
        release_freed_memory()  # the dropped float32 matrices, back to the OS (see quant)
    span = SpanModel(spec, start, end, layers, config)
    span.eval().requires_grad_(False)
    return span.to(place)  # the rotary tables; the blocks are there already

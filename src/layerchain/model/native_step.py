"""A span's one-token decode steps through the native library (``layerchain.native``).

``NativeStep.for_span(span)`` says whether a span's blocks can take the native path at all:
our own llama blocks (``llama_block``) on the CPU in float32, one rotary table, attention
that ``decode.cpp`` mirrors (GQA through SDPA's ``enable_gqa``, as transformers chooses it
for a one-token step without a mask). Each step then reads the blocks' tensors afresh
(``_block_fields``: a swapped module, a cheat's stand-in, is seen at once) in one of two
layouts: float32 ``nn.Linear`` weights without biases, or int4 with fused q/k/v and
gate/up (``quant.FusedLinears``) and int4 o/down projections. ``NativeStep.batch`` does
the same for a node's batch of sessions (``model.batched.decode_batch``'s ops). Anything
else (int8, a bias, a mixed span, a cache without room for the token) returns None and the
caller takes the Python path, which gives the same bits.

The same bits are checked, not assumed: the first step of each layout (``_agrees``) and
the first batch (``_batch_agrees``) run through the span's first block both ways; a
mismatch (a torch or compiler whose ops differ) turns that path off for the span for good.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerchain import native
from layerchain.model.kv_cache import KVCache
from layerchain.model.llama_block import OWN
from layerchain.model.quant import INT4_GROUP, Int4Linear, fused

FLOAT_LAYOUT, INT4_LAYOUT = 0, 1  # decode.cpp's kFloatLayout, kInt4Layout
MAX_GQA_HEAD_DIM = 256  # transformers' SDPA takes enable_gqa without a mask up to this


@dataclass
class NativeStep:
    """The native path of one span: its static shape, and which layouts agreed."""

    dims: list[int]  # head_dim, query heads, key/value heads, int4 group (decode.cpp's order)
    eps: float  # the RMS norms' epsilon
    scaling: float  # attention's scale (head_dim ** -0.5, as the module holds it)
    # layout (solo steps) or -1 - layout (batches) -> whether it gave the Python path's bits
    agreed: dict[int, bool] = field(default_factory=dict)
    # the last step's blocks' modules (``_modules_of``) and their fields: read again when a
    # module changed (reading the fields costs ~20 us per block; comparing ~1 us)
    _seen: list[Any] = field(default_factory=list)
    _fields: tuple[int, list[torch.Tensor]] | None = None

    @classmethod
    def for_span(cls, span: Any) -> NativeStep | None:
        """The native path for ``span`` (a ``SpanModel`` with a lean path), or None when its
        blocks or placement are not what ``decode.cpp`` mirrors or the library is absent."""
        layers = list(span.layers)
        if not layers or not native.enabled():
            return None
        if span.device.type != "cpu" or span.compute_dtype != torch.float32:
            return None
        if len(set(span.rope_keys)) != 1 or any(w is not None for w in span.windows):
            return None
        if not all(type(layer) is OWN.decoder_layer for layer in layers):
            return None
        attn = layers[0].self_attn
        heads = attn.q_proj.out_features // attn.head_dim
        kv_heads = heads // attn.num_key_value_groups
        if heads != kv_heads and attn.head_dim > MAX_GQA_HEAD_DIM:
            return None  # transformers packs the query heads instead (not mirrored)
        eps = {n.variance_epsilon for layer in layers
               for n in (layer.input_layernorm, layer.post_attention_layernorm)}
        if len(eps) != 1:
            return None
        return cls([attn.head_dim, heads, kv_heads, INT4_GROUP], eps.pop(), attn.scaling)

    def __call__(
        self,
        layers: Sequence[nn.Module],
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        cache: Any,
        lean: Any,
    ) -> torch.Tensor | None:
        """``layers``' one-token step of hidden [B, 1, H] (float32, CPU) at ``cache.length``,
        writing each block's key/value into ``cache`` (a ``span.KVCache`` over at least these
        blocks) without advancing its length; None (nothing written) when the step is not
        one the native path takes. ``lean``: the span's ``LeanDecode`` (the first check's
        reference)."""
        fields = self._fields_of(layers)
        if fields is None or hidden.dtype != torch.float32 or hidden.shape[1] != 1:
            return None
        layout, tensors = fields
        room = _room(cache, layers, hidden.shape[0])
        if room is None:
            return None
        keys, values = room
        if layout not in self.agreed:
            self.agreed[layout] = self._agrees(layers[0], lean)
        if not self.agreed[layout]:
            return None
        return self._run(layout, tensors, hidden, cos_sin, keys, values, cache.length)

    def batch(
        self,
        layers: Sequence[nn.Module],
        rows: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        caches: Sequence[KVCache],
        reference: Callable[..., torch.Tensor],
    ) -> torch.Tensor | None:
        """``model.batched.decode_batch``'s blocks for rows [B, 1, H] (row i: ``caches[i]``'s
        session at its length; cos/sin [B, 1, D], each row's own) in one native call,
        writing each session's keys/values without advancing its length; None (nothing
        written) when the native path does not take it. ``reference(layer, rows, cos_sin,
        caches)``: the Python batch's block (the first check's reference)."""
        fields = self._fields_of(layers)
        if fields is None or rows.dtype != torch.float32 or rows.shape[1] != 1:
            return None
        layout, tensors = fields
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for cache in caches:
            got = _room(cache, layers, 1)
            if got is None:
                return None
            keys.extend(got[0])
            values.extend(got[1])
        key = -1 - layout  # batches are checked apart from solo steps
        if key not in self.agreed:
            self.agreed[key] = self._batch_agrees(layers[0], reference)
        if not self.agreed[key]:
            return None
        cos, sin = cos_sin
        return torch.ops.layerchain.span_decode_batch(  # type: ignore[no-any-return]
            rows, cos, sin, tensors, keys, values, [c.length for c in caches], layout,
            self.dims, self.eps, self.scaling,
        )

    def _batch_agrees(self, layer: nn.Module, reference: Callable[..., torch.Tensor]) -> bool:
        """Whether a batch of two sessions (of 1 and 2 cached tokens) through ``layer`` gives
        ``reference``'s bits, on random inputs in scratch caches."""
        block: Any = layer  # our own llama block (``step_fields`` said so)
        index, hidden_size = int(block.self_attn.layer_idx), int(block.hidden_size)
        one = step_fields([layer])
        if one is None:
            return False
        g = torch.Generator().manual_seed(1)
        rows = torch.randn(2, 1, hidden_size, generator=g)
        cos_sin = (torch.randn(2, 1, self.dims[0], generator=g),
                   torch.randn(2, 1, self.dims[0], generator=g))
        primed = torch.randn(3, 1, 1, hidden_size, generator=g)
        outs = []
        with torch.inference_mode():
            for use_native in (False, True):
                caches = [KVCache(index, index + 1, max_length=3) for _ in range(2)]
                for cache, count in zip(caches, (1, 2), strict=True):  # storage and a past
                    for x in primed[:count]:
                        reference(layer, x, (cos_sin[0][:1], cos_sin[1][:1]), [cache])
                        cache.length += 1
                if use_native:
                    keys = [k for c in caches for k in c._keys if k is not None]
                    values = [v for c in caches for v in c._values if v is not None]
                    outs.append(torch.ops.layerchain.span_decode_batch(
                        rows, *cos_sin, one[1], keys, values, [c.length for c in caches],
                        one[0], self.dims, self.eps, self.scaling,
                    ))
                else:
                    outs.append(reference(layer, rows, cos_sin, caches))
        return bool(torch.equal(outs[0], outs[1]))

    def _fields_of(
        self, layers: Sequence[nn.Module]
    ) -> tuple[int, list[torch.Tensor]] | None:
        """``step_fields(layers)``, read again only when a module changed."""
        seen = _modules_of(layers)
        if seen is None:
            return None
        if seen != self._seen:
            self._seen, self._fields = seen, step_fields(layers)
        return self._fields

    def _run(
        self,
        layout: int,
        tensors: list[torch.Tensor],
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        length: int,
    ) -> torch.Tensor:
        cos, sin = cos_sin
        return torch.ops.layerchain.span_decode(  # type: ignore[no-any-return]
            hidden, cos, sin, tensors, keys, values, length, layout, self.dims,
            self.eps, self.scaling,
        )

    def _agrees(self, layer: nn.Module, lean: Any) -> bool:
        """Whether a one-token step through ``layer`` after a first one (so it reads a
        cached key) gives the lean path's bits, on random inputs in a scratch cache."""
        fields = step_fields([layer])
        if fields is None:
            return False
        block: Any = layer  # our own llama block (``step_fields`` said so)
        index, hidden_size = int(block.self_attn.layer_idx), int(block.hidden_size)
        g = torch.Generator().manual_seed(0)
        xs = torch.randn(2, 1, 1, hidden_size, generator=g)
        cos_sin = torch.randn(2, 1, 1, self.dims[0], generator=g)
        outs = []
        with torch.inference_mode():
            for use_native in (False, True):
                cache = KVCache(index, index + 1, max_length=2)
                lean(layer, xs[0], (cos_sin[0], cos_sin[1]), cache)  # allocates the storage
                cache.length = 1
                if use_native:
                    keys = [k for k in cache._keys if k is not None]
                    values = [v for v in cache._values if v is not None]
                    outs.append(self._run(*fields, xs[1], (cos_sin[1], cos_sin[0]), keys,
                                          values, 1))
                else:
                    outs.append(lean(layer, xs[1], (cos_sin[1], cos_sin[0]), cache))
        return bool(torch.equal(outs[0], outs[1]))


def step_fields(layers: Sequence[nn.Module]) -> tuple[int, list[torch.Tensor]] | None:
    """(layout, every block's tensors in decode.cpp's order) when all ``layers`` share one
    layout, else None."""
    layout, tensors = None, []
    for layer in layers:
        got = _block_fields(layer)
        if got is None or (layout is not None and got[0] != layout):
            return None
        layout = got[0]
        tensors.extend(got[1])
    return None if layout is None else (layout, tensors)


def _block_fields(layer: nn.Module) -> tuple[int, list[torch.Tensor]] | None:
    if type(layer) is not OWN.decoder_layer:
        return None
    block: Any = layer  # our own llama block: its modules by name
    attn, mlp = block.self_attn, block.mlp
    if type(mlp.act_fn) is not nn.SiLU:
        return None
    norms = (block.input_layernorm.weight, block.post_attention_layernorm.weight)
    if any(n.dtype != torch.float32 for n in norms):
        return None
    qkv = fused(attn, "fused_qkv", attn.q_proj, attn.k_proj, attn.v_proj)
    gate_up = fused(mlp, "fused_gate_up", mlp.gate_proj, mlp.up_proj)
    if qkv is not None and gate_up is not None:
        o, down = attn.o_proj, mlp.down_proj
        if (
            qkv.bias is not None
            or gate_up.bias is not None
            or gate_up.sizes[0] != gate_up.sizes[1]
            or not all(type(m) is Int4Linear and m.scales_zeros is not None and m.bias is None
                       for m in (o, down))
        ):
            return None
        return INT4_LAYOUT, [
            norms[0], qkv.packed, qkv.scales_zeros, o.packed, o.scales_zeros,
            norms[1], gate_up.packed, gate_up.scales_zeros, down.packed, down.scales_zeros,
        ]
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
               mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if all(type(m) is nn.Linear and m.bias is None and m.weight.dtype == torch.float32
           for m in linears):
        q, k, v, o, gate, up, down = (m.weight for m in linears)
        return FLOAT_LAYOUT, [norms[0], q, k, v, o, norms[1], gate, up, down]
    return None


def _modules_of(layers: Sequence[nn.Module]) -> list[Any] | None:
    """Every module a step through ``layers`` reads (each layer, its children and theirs,
    in order), or None when a layer is not our own llama block: equal lists (by identity)
    mean ``step_fields`` would read the same tensors, as modules are swapped, not their
    tensors (``load_state_dict`` copies into them; nothing here assigns a module's
    parameters after it is built)."""
    seen: list[Any] = []
    for layer in layers:
        if type(layer) is not OWN.decoder_layer:
            return None
        children = layer._modules
        seen.append(layer)
        seen.extend(children.values())
        seen.extend(children["self_attn"]._modules.values())  # type: ignore[union-attr]
        seen.extend(children["mlp"]._modules.values())  # type: ignore[union-attr]
    return seen


def _room(
    cache: KVCache, layers: Sequence[nn.Module], batch: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """``cache``'s key and value storage for ``layers`` when each has room for one more
    token of ``batch`` rows, else None (the Python path grows it, or refuses a full cache)."""
    block: Any = layers[0]  # our own llama block (``step_fields`` said so)
    first = block.self_attn.layer_idx - cache.start
    keys = cache._keys[first : first + len(layers)]
    values = cache._values[first : first + len(layers)]
    need = cache.length + 1
    if cache.max_length is not None and need > cache.max_length:
        return None
    for k in keys:
        if k is None or k.shape[2] < need or k.shape[0] != batch:
            return None
    return keys, values  # type: ignore[return-value]  # none is None (checked)


def applies(span: Any) -> bool:
    """Whether ``span``'s one-token steps take the native path now: it is on for the span
    and every block is in a layout ``decode.cpp`` computes (fp32 or fused int4)."""
    return bool(span.native_decode) and step_fields(list(span.layers)) is not None


def describe(span: Any) -> str:
    """One line for a node's log: which path ``span``'s decode steps take, and why not the
    native one when they do not."""
    if applies(span):
        return "native (C++, layerchain.native)"
    if span.native_decode:
        return "Python (weights in a form the native path does not mirror: it runs fp32, int4)"
    if native.switched_off():
        return f"Python ({native.ENV_SWITCH}=0)"
    if native.find_library() is None:
        return "Python (the native library is not built: python -m layerchain.native)"
    if not native.load():
        return "Python (the native library did not load)"
    return "Python (these blocks are not what the native path mirrors)"

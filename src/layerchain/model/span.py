"""A span of decoder blocks ``[start, end)`` and its per-session KV cache.

``load_span(spec, start, end)`` builds transformers' own decoder-layer classes for the model's
family (each with its true global ``layer_idx``), on the meta device, then fills them with the
span's tensors only, as float32. Memory for weights is thus proportional to the span's share of
the blocks. ``SpanModel.forward(hidden, cache)`` runs the blocks on hidden states
``[batch, tokens, hidden]`` at positions ``cache.length + arange(tokens)``, appending the new
keys and values to ``cache``. A chain of spans computes exactly what the whole model computes in
one process, because it runs the same layers with the same masks and positions.

The causal mask is built explicitly whenever it is not trivial (several tokens, or a sliding
window shorter than the context), so a step of T > 1 tokens on a cache that already holds tokens
(replay after a failover, a multi-turn chat) is correct; a one-token decode step needs no mask.
The span knows nothing of sessions, peers or networks.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from layerchain.errors import ModelFileError, SpanError
from layerchain.model.families import sliding_window_of
from layerchain.model.spec import ModelSpec
from layerchain.types import Span

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_MIN_CAPACITY = 64  # tokens: smallest cache allocation, grown by doubling


class KVCache:
    """Keys and values of one session for the layers ``[start, end)`` of one span.

    ``length`` counts the tokens processed so far. Storage per layer is
    ``[batch, kv_heads, capacity, head_dim]`` float32, grown by doubling (or preallocated to
    ``max_length``); ``update`` is the method transformers' attention modules call.
    A forward that fails midway leaves ``length`` unchanged, so the cache stays consistent:
    entries past ``length`` are never read and are overwritten by the next step.
    """

    def __init__(self, start: int, end: int, max_length: int | None = None) -> None:
        self.start, self.end = start, end
        self.length = 0
        self.max_length = max_length  # tokens; None: unbounded
        self._keys: list[torch.Tensor | None] = [None] * (end - start)
        self._values: list[torch.Tensor | None] = [None] * (end - start)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (capacity, not length)."""
        return sum(
            t.numel() * t.element_size() for t in (*self._keys, *self._values) if t is not None
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held (transformers' Cache API)."""
        return self.length

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` [B, kv_heads, T, D] of global layer ``layer_idx`` at positions
        ``length .. length+T``; return all keys/values so far, [B, kv_heads, length+T, D]."""
        i = layer_idx - self.start
        new = key.shape[2]
        need = self.length + new
        if self.max_length is not None and need > self.max_length:
            raise SpanError(f"session cache is full: {need} tokens > max_length {self.max_length}")
        keys, values = self._keys[i], self._values[i]
        if keys is None or values is None or need > keys.shape[2] or keys.shape[0] != key.shape[0]:
            keys, values = self._grow(i, key, value, need)
        keys[:, :, self.length : need] = key
        values[:, :, self.length : need] = value
        return keys[:, :, :need], values[:, :, :need]

    def _grow(
        self, i: int, key: torch.Tensor, value: torch.Tensor, need: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self._keys[i], self._values[i]
        capacity = self.max_length or max(
            _MIN_CAPACITY, need, 2 * (0 if old_k is None else old_k.shape[2])
        )
        b, h, _, d = key.shape
        keys = key.new_empty((b, h, capacity, d))
        values = value.new_empty((b, h, capacity, value.shape[3]))
        if old_k is not None and old_v is not None and self.length and old_k.shape[0] == b:
            keys[:, :, : self.length] = old_k[:, :, : self.length]
            values[:, :, : self.length] = old_v[:, :, : self.length]
        self._keys[i], self._values[i] = keys, values
        return keys, values

    def truncate(self, length: int) -> None:
        """Forget tokens past ``length`` (the kept ones stay valid)."""
        if not 0 <= length <= self.length:
            raise SpanError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length


class SpanModel(nn.Module):
    """Decoder blocks ``[start, end)`` of one model, float32, eval mode, no gradients."""

    def __init__(
        self,
        spec: ModelSpec,
        start: int,
        end: int,
        layers: list[nn.Module],
        config: PretrainedConfig,
    ) -> None:
        super().__init__()
        self.spec, self.start, self.end = spec, start, end
        self.config = config
        self.layers = nn.ModuleList(layers)
        self.rotary_emb = spec.family_info.rotary_embedding(config=config)
        # one window per layer (None = full attention); masks are built once per distinct window
        self.windows = [sliding_window_of(config, i) for i in range(start, end)]
        # transformers 5.x names the layer's KV-cache argument ``cache`` (``past_key_values``
        # is deprecated with a FutureWarning); older releases know only ``past_key_values``
        accepted = inspect.signature(spec.family_info.decoder_layer.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"

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
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def forward(
        self,
        hidden: torch.Tensor,
        cache: KVCache | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """hidden [B, T, H] float32 -> [B, T, H] through blocks ``[start, end)``.

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
        for block in range(cache.start, cache.end):
            with torch.inference_mode():
                hidden = self._run(hidden, cache, past, block, block + 1)
            if block + 1 == cache.end:
                cache.length = past + hidden.shape[1]
            yield hidden

    def _run(
        self, hidden: torch.Tensor, cache: KVCache | None, past: int, start: int, end: int
    ) -> torch.Tensor:
        tokens = hidden.shape[1]
        position_ids = torch.arange(past, past + tokens, device=hidden.device).unsqueeze(
            0
        )  # [1, T]
        cos_sin = self.rotary_emb(hidden, position_ids)  # ([1, T, rot_dim], [1, T, rot_dim])
        masks: dict[int | None, torch.Tensor | None] = {}
        lo, hi = start - self.start, end - self.start
        cache_kwargs = {self._cache_arg: cache, "use_cache": cache is not None}
        for layer, window in zip(self.layers[lo:hi], self.windows[lo:hi], strict=True):
            if window not in masks:
                masks[window] = causal_mask(past, tokens, window, hidden.device)
            out = layer(
                hidden,
                attention_mask=masks[window],
                position_ids=position_ids,
                position_embeddings=cos_sin,
                **cache_kwargs,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


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
    """A private copy of the spec's config, set to run transformers' SDPA attention."""
    config = copy.deepcopy(spec.config)
    config._attn_implementation = "sdpa"
    return config


def load_span(spec: ModelSpec, start: int, end: int) -> SpanModel:
    """Blocks ``[start, end)`` of ``spec`` with only their own tensors loaded (float32, eval).

    Raises SpanError for an empty or out-of-range span, ModelFileError for missing or
    unreadable tensors.
    """
    Span(start, end).check_within(spec.num_blocks)
    config = span_config(spec)
    layer_cls = spec.family_info.decoder_layer
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
        layers.append(layer)
    span = SpanModel(spec, start, end, layers, config)
    span.eval().requires_grad_(False)
    return span

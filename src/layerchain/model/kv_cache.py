"""A session's KV cache over the blocks of one span (``KVCache``): what ``model.span``'s
steps append to, on both the Python and the native decode paths."""

from __future__ import annotations

from typing import Any

import torch

from layerchain.errors import SpanError

_MIN_CAPACITY = 64  # tokens: smallest cache allocation, grown by doubling


class KVCache:
    """Keys and values of one session for the layers ``[start, end)`` of one span.

    ``length`` counts the tokens processed so far. Storage per layer is
    ``[batch, kv_heads, capacity, head_dim]``, in the keys' dtype on the keys' device (the
    span's: the cache is allocated by the first step), grown by doubling (or preallocated to
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

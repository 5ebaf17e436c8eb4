"""Batched decode: one-token steps of several sessions as one forward over a span.

A decode step is memory-bound: each block's weight matrices are read for one row of
activations. ``decode_batch(span, hidden, caches)`` stacks the rows of B sessions
(hidden [B, 1, H]) and runs each block's linears (norms, q/k/v, o, gate/up/down: the
functions ``LeanDecode`` runs, ``span.project_qkv`` and ``span.mlp_out``) once over all B
rows, so the weights are read once per step instead of B times, while attention stays per
session: each session's own ``KVCache`` (its own length, no padding, no copy), its own
position and hence its own rotary cos/sin (computed per session, as its solo step does),
with no mask (only steps needing none are batched, as only they take the lean path).

Exactness: a row's attention, rotary and cache writes are the ops of that session's solo
step on the same inputs; the linears run on [B, 1, H] instead of [1, 1, H], which a BLAS
may block differently, so a batched row may differ from the solo row in the last bits
(greedy tokens do not change: tests/test_model_batched.py, tests/test_node_batching.py).
A caller wanting today's bits for a single session runs ``span.forward`` (the node does,
for a batch of one).

Like a failed ``span.forward``, a batch that fails midway leaves every cache's ``length``
unchanged (entries past it are overwritten by the next step), so its sessions can be
stepped again, e.g. one by one. The module knows nothing of sessions, nodes or networks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from layerchain.errors import SpanError
from layerchain.model.span import (
    KVCache,
    LeanDecode,
    SpanModel,
    _linear,
    _rms_norm,
    causal_mask,
    mlp_out,
    project_qkv,
)


def batchable(span: SpanModel, cache: KVCache) -> bool:
    """Whether a one-token step of ``cache``'s session through ``span`` may join a batch:
    the span has the lean decode path (llama-shaped blocks that agree with their own forward)
    and no block of the cache's range needs a mask for it (within every sliding window)."""
    if not span.fast_decode or not span.start <= cache.start < cache.end <= span.end:
        return False
    lo, hi = cache.start - span.start, cache.end - span.start
    return all(causal_mask(cache.length, 1, w) is None for w in set(span.windows[lo:hi]))


def decode_batch(span: SpanModel, hidden: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
    """hidden [B, 1, H] (row i: session i's new token, any device and float dtype) ->
    [B, 1, H] on ``span.device`` in ``span.compute_dtype``, through the blocks of the caches'
    range, appending one token to each cache (``caches[i]`` holds session i's keys/values;
    all for the same blocks; each ``batchable``).

    Raises SpanError for caches of different block ranges, a cache that is not
    ``batchable``, a row count other than ``len(caches)``, a cache that is full."""
    if hidden.dim() != 3 or hidden.shape[1] != 1 or hidden.shape[2] != span.config.hidden_size:
        raise SpanError(
            f"a decode batch is [B, 1, {span.config.hidden_size}], got {list(hidden.shape)}"
        )
    if not caches or hidden.shape[0] != len(caches):
        raise SpanError(f"{hidden.shape[0]} rows for {len(caches)} caches")
    start, end = caches[0].start, caches[0].end
    if any((c.start, c.end) != (start, end) for c in caches):
        raise SpanError("a decode batch runs the same blocks for every session")
    if not all(batchable(span, c) for c in caches):
        raise SpanError(f"these sessions' steps through {span.span} cannot be batched")
    lean = LeanDecode.for_layers(span.spec, list(span.layers))
    if lean is None:  # fast_decode said it had one
        raise SpanError(f"span {span.span} has no lean decode path")
    rows = span.to_span(hidden)  # [B, 1, H]
    # per session: position [1, 1] = its cache length; cos/sin [1, 1, rot] as its solo step
    # computes them (per row, so a rope scaling reading the positions sees only its own),
    # per rotary table key; then stacked to [B, 1, rot]
    tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode():
        for key in dict.fromkeys(span.rope_keys[start - span.start : end - span.start]):
            parts = []
            for i, cache in enumerate(caches):
                ids = torch.full((1, 1), cache.length, dtype=torch.long, device=rows.device)
                row = rows[i : i + 1]
                parts.append(
                    span.rotary_emb(row, ids) if key is None else span.rotary_emb(row, ids, key)
                )
            tables[key] = (torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts]))
        native = span.native  # C++ when built (model.native_step): the same ops and bits
        done = None if native is None else native.batch(
            list(span.layers)[start - span.start : end - span.start], rows,
            tables[span.rope_keys[start - span.start]], caches,
            lambda layer, x, cos_sin, batch: _block(lean, layer, x, cos_sin, batch),
        )
        if done is not None:
            rows = done
        else:
            for index in range(start, end):
                layer = span.layers[index - span.start]
                rope = tables[span.rope_keys[index - span.start]]
                rows = _block(lean, layer, rows, rope, caches)
        for cache in caches:
            cache.length += 1
    return rows


def _block(
    lean: LeanDecode,
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    caches: Sequence[KVCache],
) -> torch.Tensor:
    """One llama-shaped block over hidden [B, 1, H]: ``LeanDecode.__call__``'s ops, with the
    attention (cache update, SDPA) per session and everything else over the B rows."""
    block: object = layer
    attn = block.self_attn  # type: ignore[attr-defined]
    residual = hidden
    x = _rms_norm(block.input_layernorm, hidden)  # type: ignore[attr-defined]
    query, key, value = project_qkv(attn, x)  # [B, heads | kv_heads, 1, D]
    query, key = lean.rotate(query, key, *cos_sin)
    outs = []
    for i, cache in enumerate(caches):  # [1, kv_heads, length + 1, D] each: no padding
        keys, values = cache.update(key[i : i + 1], value[i : i + 1], attn.layer_idx)
        out, _ = lean.attend(
            attn, query[i : i + 1], keys, values, None, dropout=0.0, scaling=attn.scaling
        )
        outs.append(out)  # [1, 1, heads, D]
    out = torch.cat(outs).reshape(*x.shape[:-1], -1).contiguous()  # [B, 1, heads * D]
    hidden = residual + _linear(attn.o_proj, out)
    norm = block.post_attention_layernorm  # type: ignore[attr-defined]
    return hidden + mlp_out(block.mlp, _rms_norm(norm, hidden))  # type: ignore[attr-defined]

"""Activation compression on the wire: the forms a session's hidden states travel in.

A client names a form when it opens a session (``OpenSession.wire``); every Step and
StepResult of that session then carries its hidden states in that form, both ways. The node
still computes in its own dtype; decoding always gives a float tensor. ``WIRE_FORMS``:

* ``""``: as today, the exactness reference (float32 from a float32 client; a node answers
  per ``model.device.reply_dtype``), 4 bytes a value;
* ``"fp16"`` / ``"bf16"``: the tensor cast to float16 / bfloat16 (the codec's own dtypes),
  2 bytes a value;
* ``"int8"``: 8-bit blockwise with exact outliers, ~1.1 bytes a value (H = 576: 644 bytes a
  token instead of 2,304).

8-bit blockwise (after Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization",
as bitsandbytes and hivemind's ``compression`` do it; our own torch code), per token of
``hidden [B, T, H]``:

* the ``OUTLIERS`` = 4 values of largest magnitude travel exactly (float32, with their int32
  positions). They are what a receipt's commitment pins down (``market.commitment.TOP_K``
  = 4 largest values per token), so a decoded int8 output is as far from an honest fp32
  recomputation, by ``commitment_distance``, as an fp32 one: audits, referees and slashing
  evidence need no int8 case. They are also the "massive activations" of LLM hidden states
  (SmolLM2: one value near 25,000 where most are below 10), which would otherwise flatten
  their whole block to zeros;
* the rest (outliers counted as 0) is cut along H into blocks of ``BLOCK`` = 64 values (the
  last one shorter when 64 does not divide H); each block gets::

    scale  s = absmax / 127      float32, its significand cut (floored) to 16 bits
    codes  c = round(x / s)      int8 in -127..127 (absmax-symmetric; -128 unused)
    decoded  x' = c * s          float32

  so a value is off by at most ``s / 2`` = absmax / 254 (0.4 % of its block's largest
  non-outlier magnitude). ``c * s`` is exact in float32 (7 + 16 significant bits): the
  numbers are the same on every machine, and no decoded value exceeds its block's absmax
  (the floor), so none overtakes an outlier.

**Idempotent**: quantizing a decoded tensor gives back its parts bit for bit (the outliers
are still the largest; absmax' = 127 s exactly, so s' = s), barring exact ties of magnitude
between an outlier and another value. A hop's int8 output sent on to the next hop loses
nothing more, and a replay re-sends what the first run sent.

What receipts commit to: ``to_wire`` gives the tensor *as the receiver will decode it* (for
int8 a ``Blockwise8``: the float32 decoded values, holding the parts for the codec). A node
commits to that (``market.commitment``) and a client keeps and hashes that as the hop's
input, so receipts, commitments and audits see the same numbers on both sides.

Frame layout of an int8 tensor field (``wire.codec``): descriptor ``["int8b64", [B, T, H],
nbytes]``; then, 8-aligned, little-endian: scales float32 ``[B, T, nb]``, outliers float32
``[B, T, k]``, positions int32 ``[B, T, k]``, codes int8 ``[B, T, H]``, with ``nb = ceil(H /
64)``, ``k = min(4, H)``: ``nbytes = B T (4 nb + 8 k + H)``.

This module knows nothing of frames, sessions or networks; it transforms tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from layerchain.errors import LimitExceeded

WIRE_FORMS = ("", "fp16", "bf16", "int8")  # OpenSession.wire values ("": float32, as today;
# a client names it fp32: client.config.WIRE_NAMES)
BLOCK = 64  # values per int8 block, along the hidden axis
OUTLIERS = 4  # largest-magnitude values per token sent exactly (= market.commitment.TOP_K)
INT8_NAME = "int8b64"  # the int8 form's dtype name in a tensor descriptor (wire.codec)
_QMAX = 127  # codes are in -127..127
_CUT_MASK = ~0xFF  # a scale keeps 16 significant bits (1 + 15 stored): 127 * s is exact;
# clearing the 8 low stored bits is a floor for a positive scale (inf stays, NaN stays NaN
# or turns inf: non-finite either way)
_SMALLEST = 1.4e-45  # float32's smallest subnormal: a 0 scale (an all-zero block) divides by it
_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, eq=False)
class Int8Parts:
    """What an int8 tensor [B, T, H] travels as (all CPU, contiguous)."""

    scales: torch.Tensor  # float32 [B, T, nb]: each block's step
    outliers: torch.Tensor  # float32 [B, T, k]: the k largest magnitudes of each token, exact
    positions: torch.Tensor  # int32 [B, T, k]: where they sit along H
    codes: torch.Tensor  # int8 [B, T, H]: the rest (0 where an outlier sits)


class Blockwise8(torch.Tensor):
    """A float32 tensor whose values are the decoded int8 form (``to_wire``), holding the
    ``parts`` it decodes from: the codec sends those instead of the floats. Any torch op on
    it gives a plain tensor (its values); it must not be changed in place (its parts would
    no longer match)."""

    parts: Int8Parts
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]
    # (ops on it return plain tensors)


def check_form(form: str) -> str:
    """``form`` if a node can answer in it; LimitExceeded (``limit_exceeded``) otherwise."""
    if form not in WIRE_FORMS:
        shown = form if len(form) <= 20 else form[:17] + "..."
        raise LimitExceeded(
            f"unknown wire form {shown!r}; a node speaks {', '.join(map(repr, WIRE_FORMS))}"
        )
    return form


def blocks_of(hidden_size: int) -> int:
    """Int8 blocks per token of ``hidden_size`` values."""
    return -(-hidden_size // BLOCK)


def outliers_of(hidden_size: int) -> int:
    """Values per token of ``hidden_size`` sent exactly."""
    return min(OUTLIERS, hidden_size)


def int8_nbytes(shape: list[int] | tuple[int, ...] | torch.Size) -> int:
    """Bytes of an int8 tensor [B, T, H] in a frame (see the module docstring)."""
    tokens, size = int(shape[0]) * int(shape[1]), int(shape[2])
    return tokens * (4 * blocks_of(size) + 8 * outliers_of(size) + size)


def quantize(hidden: torch.Tensor) -> Int8Parts:
    """The int8 parts of ``hidden`` [B, T, H] (any float dtype and device; computed in
    float32 on the CPU, with numpy). A NaN or infinity is an outlier (kept as it is) or, past the 4th of
    a token, makes its block's scale non-finite: non-finite values decode non-finite."""
    x = hidden.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    size = x.shape[-1]
    k, nb = outliers_of(size), blocks_of(size)
    with np.errstate(all="ignore"):  # non-finite inputs stay non-finite, silently
        positions = np.argpartition(np.abs(x), size - k, axis=-1)[..., size - k :]  # NaN last
        outliers = np.take_along_axis(x, positions, -1)
        rest = x.copy()
        np.put_along_axis(rest, positions, np.float32(0.0), -1)
        if nb * BLOCK != size:  # pad the last block with zeros (they leave its absmax)
            rest = np.pad(rest, [(0, 0)] * (rest.ndim - 1) + [(0, nb * BLOCK - size)])
        blocks = rest.reshape(*x.shape[:-1], nb, BLOCK)  # [B, T, nb, 64]
        scales = np.abs(blocks).max(axis=-1) / np.float32(_QMAX)  # [B, T, nb]
        scales = (scales.view(np.int32) & np.int32(_CUT_MASK)).view(np.float32)
        divisor = np.maximum(scales, np.float32(_SMALLEST))[..., None]  # 0: an all-zero block
        codes = np.rint(blocks / divisor)
        np.nan_to_num(codes, copy=False, nan=0.0)  # a NaN's block: its scale is NaN
        np.clip(codes, -_QMAX, _QMAX, out=codes)
    codes_i8 = codes.astype(np.int8).reshape(*x.shape[:-1], nb * BLOCK)[..., :size]
    return Int8Parts(
        scales=torch.from_numpy(np.ascontiguousarray(scales)),
        outliers=torch.from_numpy(np.ascontiguousarray(outliers)),
        positions=torch.from_numpy(positions.astype(np.int32)),
        codes=torch.from_numpy(np.ascontiguousarray(codes_i8)),
    )


def dequantize(parts: Int8Parts) -> torch.Tensor:
    """float32 [B, T, H]: each code times its block's scale, the outliers at their positions
    (every product exact). The positions must be in 0..H-1 (the codec checks them)."""
    codes = parts.codes.numpy()
    size = codes.shape[-1]
    per_value = np.repeat(parts.scales.numpy(), BLOCK, axis=-1)[..., :size]
    with np.errstate(all="ignore"):  # 0 x inf: a non-finite block decodes NaN
        values = codes.astype(np.float32) * per_value
    np.put_along_axis(values, parts.positions.numpy().astype(np.int64), parts.outliers.numpy(), -1)
    return torch.from_numpy(values)


def to_wire(hidden: torch.Tensor, form: str) -> torch.Tensor:
    """``hidden`` as the receiver of ``form`` will decode it: itself for "", a cast for
    fp16/bf16, a ``Blockwise8`` (float32 values, holding its parts) for int8, on the CPU.
    A tensor already in ``form`` comes back as it is."""
    if not form:
        return hidden
    cast = _CASTS.get(form)
    if cast is not None:
        return hidden.to(device="cpu", dtype=cast)
    if form != "int8":
        check_form(form)
    if type(hidden) is Blockwise8:
        return hidden
    parts = quantize(hidden)
    out = dequantize(parts).as_subclass(Blockwise8)
    out.parts = parts
    return out


def wire_bytes(shape: list[int] | tuple[int, ...] | torch.Size, form: str) -> int:
    """Bytes of the payload a [B, T, H] tensor takes on the wire in ``form`` ("": float32,
    4 a value); frame headers and padding not counted."""
    if form == "int8":
        return int8_nbytes(shape)
    numel = int(shape[0]) * int(shape[1]) * int(shape[2])
    return numel * (2 if form in _CASTS else 4)

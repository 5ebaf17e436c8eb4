"""Compact weights: a built span or head rewritten to hold its matrices in bf16, fp16, int8 or int4.

``quantize_module(module, dtype)`` is a transform applied to a built model (STYLE rule 6): it
swaps every ``nn.Linear`` inside ``module`` for a weight-only linear that holds only the
compact weights (the float32 matrix is dropped, so memory falls with it) and computes through
PyTorch's own CPU kernels. Norms, rotary tables and the KV cache stay float32, and every
linear takes and returns the caller's dtype (float32 on CPU): activations cross the wire as
they always have, and ``SpanModel`` does not know the weights changed.

Forms (``DTYPES``; "fp32" is the exactness reference and the default everywhere):

* ``int8``: symmetric per-output-channel int8 codes ``[N, K]`` and scales ``[N]``;
  ``aten._weight_int8pack_mm``. 1 byte/weight.
* ``int4``: asymmetric groupwise codes, ``INT4_GROUP`` = 32 weights along K per (scale, zero)
  pair, packed by ``aten._convert_weight_to_int4pack_for_cpu``; ``aten._weight_int4pack_mm_for_cpu``.
  0.5 byte/weight + 4 bytes per group. The group is GGUF Q4_1's block (32 weights, a scale and
  a minimum), so a Q4_1 file's blocks requantize to their own codes: int4 adds only the bf16
  rounding of the scales and of the activations.
* ``bf16``/``fp16``: the matrices cast; 2 bytes/weight.

Two kernels beyond one per linear (docs/BENCHMARKS.md "Compact weights", "Fused projections
and a rescored head"): a block's int4 q/k/v and gate/up run as one call each
(``FusedLinears``, bit-identical per part), and the int8 LM head scores every row with
FBGEMM's int8 x int8 kernel and recomputes the best 64 exactly (``RescoredInt8Linear``).

Both integer kernels are fast only for bf16 activations on CPU (measured 2026-12-02, one
thread, docs/BENCHMARKS.md "Compact weights": float32 inputs take a scalar path 10x slower), so
a compact linear casts its input to bf16 for the matmul and its output back. Off CPU, int8
dequantizes its matrix per call (compact memory, not the fastest) and int4 is refused.

``resolve_dtype("auto", device)`` picks the fastest form whose greedy agreement with fp32 on
the default model stayed at or above ``AGREEMENT_FLOOR`` (``layerchain bench compute``).
"""

from __future__ import annotations

import ctypes
import functools
import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerchain.errors import ConfigError
from layerchain.model.device import resolve_device
from layerchain.model.dtypes import DTYPES as DTYPES  # --dtype choices (torch-free home)
from layerchain.model.dtypes import check_dtype as check_dtype

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT4_GROUP = 32  # weights along K sharing one (scale, zero): GGUF Q4_1's block size
AGREEMENT_FLOOR = 0.9  # fraction of fp32's greedy tokens a form must reproduce to be "auto"
# "auto" per device type, fastest first among those above the floor (BENCHMARKS "Compact weights")
AUTO_DTYPE = {"cpu": "int4", "cuda": "bf16", "mps": "fp16"}
_KERNEL_DTYPE = torch.bfloat16  # activations inside the integer kernels (their fast path)


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> str:
    """The concrete form (never "auto") to hold weights in on ``device`` (a ``torch.device``
    or a ``model.device`` name, "auto" included).

    "auto" maps through ``AUTO_DTYPE`` by device type; an explicit int4 off CPU is a
    ConfigError (its packed layout and kernel are CPU ones).
    """
    kind = (resolve_device(device) if isinstance(device, str) else device).type
    if check_dtype(name) == "auto":
        return AUTO_DTYPE.get(kind, "fp32")
    if name == "int4" and kind != "cpu":
        raise ConfigError("--dtype int4 runs on CPU only", hint=f"use int8 or bf16 on {kind}")
    return name


class CastLinear(nn.Module):
    """A linear with its weight ``[N, K]`` (and bias) held in bf16 or fp16; input/output dtype kept."""

    weight: torch.Tensor  # [N, K] bf16 | fp16
    bias: torch.Tensor | None  # [N]

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # the same tensor when it is already in ``dtype`` (a tied head shares its rows' table)
        self.register_buffer(
            "weight", weight if weight.dtype == dtype else weight.detach().to(dtype)
        )
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> CastLinear:
        return cls(linear.weight, linear.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class Int8Linear(nn.Module):
    """Weight-only int8 linear: codes ``[N, K]`` int8, per-output-channel scales ``[N]``."""

    codes: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N] float32, applied after the kernel (bf16 would bias channels)
    ones: torch.Tensor  # [N] bf16 ones: the kernel's own scale argument
    bias: torch.Tensor | None  # [N] float32

    def __init__(
        self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.float())
        self.register_buffer("ones", torch.ones(codes.shape[0], dtype=_KERNEL_DTYPE))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        codes, scales = int8_codes(linear.weight.detach())
        return cls(codes, scales, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(_KERNEL_DTYPE)  # [M, K]
        if flat.device.type == "cpu":
            dots = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.ones)  # [M, N]
        else:  # no fused kernel assumed: codes cast per call, memory stays compact
            dots = F.linear(flat, self.codes.to(_KERNEL_DTYPE))
        out = dots.float() * self.scales  # [M, N] float32
        return _finish(out, x, self.bias, self.out_features)


class Int4Linear(nn.Module):
    """Weight-only int4 linear, groups of ``INT4_GROUP`` along K, CPU packed layout.

    ``packed`` is ``[N, K/2]`` uint8; ``scales_zeros`` ``[K/group, N, 2]`` bf16 with
    w = (code - 8) * scale + zero, codes 0..15 (the layout ``_weight_int4pack_mm_for_cpu`` reads).
    """

    packed: torch.Tensor  # [N, K/2] uint8
    scales_zeros: torch.Tensor | None  # [K/group, N, 2] bf16; None: its rows of ``shared``'s
    bias: torch.Tensor | None  # [N] float32

    def __init__(
        self,
        codes: torch.Tensor | None,
        scales_zeros: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        packed: torch.Tensor | None = None,
    ) -> None:
        """From ``codes`` [N, K] int32 0..15, or (``codes`` None) from an already ``packed``
        [N, K/2] uint8 (rows of a ``FusedLinears``' packing: the same bytes)."""
        super().__init__()
        if packed is None:
            assert codes is not None
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # [N, K/2]
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros.to(_KERNEL_DTYPE))
        # a fused part's scales live in its ``FusedLinears`` (one copy): (fusion, first row)
        self.shared: tuple[FusedLinears, int] | None = None
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        codes, scales_zeros = int4_codes(linear.weight.detach().float(), INT4_GROUP)
        return cls(codes, scales_zeros, linear.bias)

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        """The packing needs N % 16 == 0 and K % (group) == 0; other layers take int8."""
        return linear.out_features % 16 == 0 and linear.in_features % INT4_GROUP == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(_KERNEL_DTYPE)  # [M, K]
        scales = self.scales_zeros
        if scales is None:  # a fused part (the prefill path): its rows, contiguous
            assert self.shared is not None
            fusion, start = self.shared
            scales = fusion.scales_zeros[:, start : start + self.out_features].contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, INT4_GROUP, scales
        )  # [M, N]
        return _finish(out, x, self.bias, self.out_features)


class FusedLinears(nn.Module):
    """Several int4 linears that read the same input (a block's q/k/v, its gate/up), as one
    kernel call over their rows stacked along N: each output row keeps its own codes, scale
    and zero, so each part's output is bit-identical to its own linear's
    (tests/test_quant_fused.py), with one cast of the input, one kernel call and one cast back
    instead of one each per part (docs/BENCHMARKS.md "Compact weights").

    The parts keep working on their own (the prefill path calls them), holding nothing twice:
    each part's ``packed`` becomes a view of its rows of the stacked packing, and its (scale,
    zero) pairs move here (the kernel reads only contiguous scales, so a part called on its
    own copies its columns, [K/group, N, 2], per call: small beside a prefill's product).
    ``serves(*parts)`` says whether the parts are still the ones fused (a caller swapping a
    linear gets the separate path).
    """

    scales_zeros: torch.Tensor  # [K/group, sum N, 2] bf16
    bias: torch.Tensor | None  # [sum N] float32

    def __init__(self, parts: list[Int4Linear]) -> None:
        super().__init__()
        self.in_features = parts[0].in_features
        self.sizes = [part.out_features for part in parts]
        self.out_features = sum(self.sizes)
        # plain attributes: not this module's children or buffers (the parts hold and count
        # them); a tuple, so nn.Module does not register the parts a second time
        self.parts: tuple[Int4Linear, ...] = tuple(parts)
        self.packed = torch.cat([part.packed for part in parts])  # [sum N, K/2] uint8
        row_bytes = self.packed.shape[1] * self.packed.element_size()
        starts = [sum(self.sizes[:i]) for i in range(len(parts))]
        self.offsets = tuple(start * row_bytes for start in starts)  # each part's first byte
        self.register_buffer(
            "scales_zeros", torch.cat([_scales_of(part) for part in parts], dim=1),
            persistent=False,
        )
        biases = [part.bias for part in parts]
        self.register_buffer(
            "bias",
            None if biases[0] is None else torch.cat([b for b in biases if b is not None]),
            persistent=False,
        )
        start = 0
        for part, size in zip(parts, self.sizes, strict=True):
            part.packed = self.packed[start : start + size]  # a view: the codes held once
            part.scales_zeros = None  # its columns of this module's (held once)
            part.shared = (self, start)
            start += size

    @staticmethod
    def fusable(parts: list[Any]) -> bool:
        """int4 CPU linears with one input size, all with or all without a bias, each but the
        last a whole number of the kernel's row blocks (``int4_block_rows``: the packing
        interleaves the rows of a block, so stacked packings split inside one are misread)."""
        return (
            len(parts) > 1
            and all(type(part) is Int4Linear and part.shared is None for part in parts)
            and len({part.in_features for part in parts}) == 1
            and len({part.bias is None for part in parts}) == 1
            and all(part.packed.device.type == "cpu" for part in parts)
            and all(part.out_features % int4_block_rows() == 0 for part in parts[:-1])
        )

    def serves(self, *parts: Any) -> bool:
        """Whether ``parts`` are the linears fused here, in order, with their packing."""
        base = self.packed.data_ptr()
        return len(parts) == len(self.parts) and all(
            a is b and a.packed.data_ptr() == base + offset
            for a, b, offset in zip(parts, self.parts, self.offsets, strict=True)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., K] -> each part's output [..., N_i] (views of one [..., sum N] tensor)."""
        return tuple(torch.split(self.joint(x), self.sizes, dim=-1))

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> the parts' outputs side by side, [..., sum N] (in ``parts`` order),
        for a caller that slices them itself (``span.rotated_qkv``)."""
        flat = x.reshape(-1, self.in_features).to(_KERNEL_DTYPE)  # [M, K]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, INT4_GROUP, self.scales_zeros
        )  # [M, sum N]
        return _finish(out, x, self.bias, self.out_features)


@functools.cache
def int4_block_rows() -> int:
    """Rows of one block of the CPU int4 packing on this machine: torch packs (and its kernel
    reads) rows in blocks whose size follows the CPU (64 with AVX-512, measured 2026-12-03 on
    an AMD EPYC with AVX-512; smaller with AVX2 only). Found by trying: the smallest size at
    which two stacked packings give each one's own product (the fusion's condition)."""
    gen = torch.Generator().manual_seed(0)
    k = 2 * INT4_GROUP
    x = torch.randn(2, k, generator=gen).to(_KERNEL_DTYPE)
    tail = torch.randint(0, 16, (16, k), dtype=torch.int32, generator=gen)
    tail_scales = torch.rand(k // INT4_GROUP, 16, 2, generator=gen).to(_KERNEL_DTYPE)
    for rows in (16, 32, 64, 128, 256):
        head = torch.randint(0, 16, (rows, k), dtype=torch.int32, generator=gen)
        head_scales = torch.rand(k // INT4_GROUP, rows, 2, generator=gen).to(_KERNEL_DTYPE)
        packs = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, 1) for c in (head, tail)]
        apart = [torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, INT4_GROUP, sz)
                 for p, sz in zip(packs, (head_scales, tail_scales), strict=True)]
        joint = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, torch.cat(packs), INT4_GROUP, torch.cat([head_scales, tail_scales], dim=1))
        if torch.equal(joint, torch.cat(apart, dim=1)):
            return rows
    return sys.maxsize  # a packing this does not know: nothing is fused


def _scales_of(part: Int4Linear) -> torch.Tensor:
    assert part.scales_zeros is not None  # an unfused part (``FusedLinears.fusable``)
    return part.scales_zeros


FUSED = {"fused_qkv": ("q_proj", "k_proj", "v_proj"), "fused_gate_up": ("gate_proj", "up_proj")}


def fuse_projections(module: nn.Module) -> nn.Module:
    """Give each submodule of ``module`` holding int4 q/k/v (or gate/up) linears a
    ``FusedLinears`` of them (child ``fused_qkv`` / ``fused_gate_up``); in place, returned.
    ``model.span.project_qkv`` and ``mlp_out`` use them when ``serves`` says they still apply."""
    for owner in list(module.modules()):
        for name, part_names in FUSED.items():
            parts = [getattr(owner, p, None) for p in part_names]
            if not isinstance(owner, FusedLinears) and FusedLinears.fusable(parts):
                owner.add_module(name, FusedLinears([p for p in parts if p is not None]))
    return module


def fused(owner: Any, name: str, *parts: Any) -> FusedLinears | None:
    """``owner``'s ``FusedLinears`` called ``name`` if it still serves ``parts``, else None."""
    found = owner._modules.get(name)
    return found if found is not None and found.serves(*parts) else None


def int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (codes [N, K] int8 in -127..127, scales [N] float32), w ~= code * scale."""
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [N]
    codes = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.contiguous(), scales


def int4_codes(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float32 -> (codes [N, K] int32 in 0..15, scales_zeros [K/group, N, 2]).

    Per group: scale = (max - min) / 15, code = round((w - min) / scale), and zero = min + 8 *
    scale, so that (code - 8) * scale + zero = min + code * scale (GGUF Q4_1's d * q + m).
    """
    n, k = weight.shape
    groups = weight.reshape(n, k // group, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, K/group]
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
    zeros = low + 8 * scales
    scales_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return codes.to(torch.int32).reshape(n, k), scales_zeros


def _finish(
    out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, features: int
) -> torch.Tensor:
    """Kernel output [M, N] -> x's dtype and leading shape [..., N], plus the bias."""
    result = out.to(x.dtype).reshape(*x.shape[:-1], features)
    return result if bias is None else result + bias.to(x.dtype)


def compact_linear(linear: nn.Linear, dtype: str) -> nn.Module:
    """The weight-only replacement of ``linear`` in the concrete form ``dtype``."""
    if dtype in ("bf16", "fp16"):
        return CastLinear.from_linear(linear, FLOAT_DTYPES[dtype])
    if dtype == "int4" and Int4Linear.fits(linear):
        return Int4Linear.from_linear(linear)
    if dtype in ("int4", "int8"):
        return Int8Linear.from_linear(linear)
    raise ConfigError(f"no compact linear for dtype {dtype!r}")


def quantize_module(module: nn.Module, dtype: str) -> nn.Module:
    """Swap every ``nn.Linear`` in ``module`` for its ``dtype`` form, in place; return it.

    ``dtype`` is concrete ("auto" must be resolved first: ConfigError). "fp32" changes nothing.
    Each float32 matrix is released as its replacement is built (if nothing else holds it).
    """
    if check_dtype(dtype) == "auto":
        raise ConfigError("resolve --dtype auto with resolve_dtype(name, device) first")
    if dtype == "fp32":
        return module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, compact_linear(child, dtype))
    return fuse_projections(module) if dtype == "int4" else module


RESCORE_TOP = 64  # logits per row the fast head recomputes exactly (``RescoredInt8Linear``)


class RescoredInt8Linear(Int8Linear):
    """The LM head's int8 linear, fast on x86 CPUs: FBGEMM's int8 x int8 kernel scores
    every row (``quantized::linear_dynamic``: the activations quantized to 7 bits per call,
    2.4 vs 6.2 ms for SmolLM2's 49,152 x 576 head, one thread), then the ``RESCORE_TOP``
    best of each row are recomputed with ``Int8Linear``'s own kernel, whose bits they take.
    So the logits that win greedy steps and carry a sampler's mass are ``Int8Linear``'s
    (over the bench's 574 positions the exact argmax was always within the approximate top 8,
    docs/BENCHMARKS.md "Compact weights"); the others are within the 7-bit activations'
    rounding (mean 0.2, max 2.5 on SmolLM2's logits). Should an unrescored logit come out
    above every rescored one, the row's result is the exact kernel's over all rows.

    FBGEMM keeps its own packed copy of the codes (``packed_bytes``: V x (K + 12) bytes);
    the codes themselves stay for the rows the rescoring and the embedding read. Built only
    where the op exists (``build``: None elsewhere, and callers keep ``Int8Linear``); off CPU
    it is ``Int8Linear``.
    """

    def __init__(
        self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
        packed: Any,
    ) -> None:
        super().__init__(codes, scales, bias)
        self.packed = packed  # FBGEMM's LinearPackedParams (an opaque script object)
        rows, width = codes.shape
        self.packed_bytes = rows * (width + 12)  # codes + column offsets, scales, zero points

    @classmethod
    def build(
        cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> RescoredInt8Linear | None:
        """From per-channel int8 ``codes`` [N, K] and ``scales`` [N]; None where this torch
        has no FBGEMM (or x86) quantized linear, or for a head too small to rescore."""
        if codes.shape[0] <= RESCORE_TOP or codes.device.type != "cpu":
            return None
        try:
            with warnings.catch_warnings():  # quantized tensors warn they are deprecated
                warnings.simplefilter("ignore")
                weight = torch._make_per_channel_quantized_tensor(
                    codes, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0
                )
                packed = torch.ops.quantized.linear_prepack(weight, None)
                probe = torch.ops.quantized.linear_dynamic(
                    torch.zeros(1, codes.shape[1]), packed, True
                )
        except (RuntimeError, AttributeError, NotImplementedError):
            return None
        return cls(codes, scales, bias, packed) if probe.shape == (1, codes.shape[0]) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        flat = x.reshape(-1, self.in_features).float()  # [M, K]
        approx = torch.ops.quantized.linear_dynamic(flat, self.packed, True)  # [M, N]
        top = approx.topk(RESCORE_TOP, dim=-1).indices  # [M, k]
        rows, where = torch.unique(top, return_inverse=True)  # [U], [M, k]
        dots = torch.ops.aten._weight_int8pack_mm(
            flat.to(_KERNEL_DTYPE), self.codes[rows], self.ones[rows]
        )  # [M, U]
        exact = dots.float() * self.scales[rows]  # Int8Linear's values for these rows
        approx.scatter_(1, top, exact.gather(1, where))
        winners = approx.argmax(dim=-1, keepdim=True)  # [M, 1]
        if not bool((top == winners).any(dim=-1).all()):  # an unrescored row scored above
            return super().forward(x)  # every exact one: the exact kernel (not seen on SmolLM2)
        return _finish(approx, x, self.bias, self.out_features)


class Int8Rows(nn.Module):
    """An embedding table as int8 codes ``[V, H]`` + per-row scales ``[V]``: ids -> float32 rows."""

    codes: torch.Tensor  # [V, H] int8
    scales: torch.Tensor  # [V] float32

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes)  # [V, H] int8
        self.register_buffer("scales", scales.float())  # [V] float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, T, H] float32."""
        return F.embedding(ids, self.codes).float() * F.embedding(ids, self.scales[:, None])


class CastRows(nn.Module):
    """An embedding table held in bf16/fp16: ids -> float32 rows."""

    table: torch.Tensor  # [V, H] bf16 | fp16

    def __init__(self, table: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("table", table.detach().to(dtype))  # [V, H]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table).float()


def compact_head_tables(
    embed: torch.Tensor, lm_head: torch.Tensor, dtype: str, *, rescore: bool = True
) -> tuple[nn.Module, nn.Module]:
    """(rows, projection) modules for a head's embedding ``[V, H]`` and LM head ``[V, H]``.

    ``rows``: ids [B, T] -> [B, T, H] float32; ``projection``: [.., H] -> [.., V] logits.
    int4 heads use int8 (the table doubles as embedding rows, which the packed int4 layout
    cannot hand out; GGUF files keep this tensor in Q8_0 for the same reason). When tied
    (``lm_head is embed``) the codes are shared by both modules. ``rescore``: the projection
    is a ``RescoredInt8Linear`` where FBGEMM is there (faster, an extra packed copy), else
    (or False) an ``Int8Linear``.
    """
    if dtype in ("bf16", "fp16"):
        torch_dtype = FLOAT_DTYPES[dtype]
        cast_rows = CastRows(embed, torch_dtype)
        table = cast_rows.table if lm_head is embed else lm_head
        return cast_rows, CastLinear(table, None, torch_dtype)
    codes, scales = int8_codes(embed)
    rows = Int8Rows(codes, scales)
    if lm_head is not embed:
        codes, scales = int8_codes(lm_head)
    fast = RescoredInt8Linear.build(codes, scales) if rescore else None
    return rows, fast if fast is not None else Int8Linear(codes, scales, None)


def release_freed_memory() -> None:
    """Hand the free pages of the C heap back to the OS (glibc's ``malloc_trim``; elsewhere a
    no-op). Call after a compact load: glibc raises its mmap threshold as large chunks are
    freed, so the float32 matrices a load drops end up in the heap and stay resident (measured,
    30 blocks in int4: 283 MB of anonymous memory for 63 MB of weights, 119 MB after a trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: nothing to trim this way
        return None
    return libc if hasattr(libc, "malloc_trim") else None

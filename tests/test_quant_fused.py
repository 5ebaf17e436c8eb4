"""Fused int4 projections (model.quant.FusedLinears, issue 21 item 4): a block's q/k/v and
gate/up as one kernel call give each projection's own bits, the lean decode path using them
stays bit-identical to the blocks' own forward, and the codes are held once."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from layerchain.model.quant import (
    FusedLinears,
    Int4Linear,
    Int8Linear,
    fuse_projections,
    fused,
    int4_block_rows,
    quantize_module,
)

# torch packs int4 rows in blocks that follow the CPU (64 with AVX-512): parts of 128 and 64
# rows stack on block boundaries on every CPU measured, as SmolLM2's 576/192/192 and 1536 do
Q, KV = 128, 64


class _Attention(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.q_proj = nn.Linear(64, Q, bias=bias)
        self.k_proj = nn.Linear(64, KV, bias=bias)
        self.v_proj = nn.Linear(64, KV, bias=bias)


def _attention(bias: bool = False, seed: int = 0) -> _Attention:
    torch.manual_seed(seed)
    return _Attention(bias).requires_grad_(False)


@pytest.mark.parametrize("bias", [False, True])  # qwen2's q/k/v carry biases
def test_fused_projections_give_each_linears_own_bits(bias):
    attn = quantize_module(_attention(bias), "int4")
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    fusion = fused(attn, "fused_qkv", *parts)
    assert isinstance(fusion, FusedLinears)
    for shape in [(1, 1, 64), (2, 5, 64)]:  # a decode step, a batch of prefills
        x = torch.randn(*shape)
        outs = fusion(x)
        assert [o.shape[-1] for o in outs] == [Q, KV, KV]
        for out, part in zip(outs, parts, strict=True):
            assert torch.equal(out, part(x))


def test_fusion_holds_nothing_twice():
    plain = _attention()  # the same linears, unfused
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(plain, name, Int4Linear.from_linear(getattr(plain, name)))
    attn = quantize_module(_attention(), "int4")
    fusion = attn.fused_qkv
    base = fusion.packed.untyped_storage().data_ptr()
    assert all(p.packed.untyped_storage().data_ptr() == base for p in fusion.parts)
    assert all(p.scales_zeros is None for p in fusion.parts)  # the fusion holds them
    buffers = dict(attn.named_buffers())
    assert "fused_qkv.scales_zeros" in buffers and "fused_qkv.packed" not in buffers
    assert not any("fused" in name for name in attn.state_dict())  # nothing new to load

    def held(module: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in module.buffers())

    assert held(attn) == held(plain)


def test_a_swapped_or_moved_part_is_no_longer_served():
    attn = quantize_module(_attention(), "int4")
    assert fused(attn, "fused_qkv", attn.q_proj, attn.k_proj, attn.v_proj) is not None
    assert fused(attn, "fused_qkv", attn.q_proj, attn.v_proj, attn.k_proj) is None  # order
    copied = copy.deepcopy(attn)  # a cheater's copy keeps the sharing
    assert fused(copied, "fused_qkv", copied.q_proj, copied.k_proj, copied.v_proj) is not None
    attn.k_proj.packed = attn.k_proj.packed.clone()  # as ``.to`` another device would
    assert fused(attn, "fused_qkv", attn.q_proj, attn.k_proj, attn.v_proj) is None
    attn = quantize_module(_attention(seed=1), "int4")
    attn.v_proj = Int4Linear.from_linear(nn.Linear(64, KV, bias=False))
    assert fused(attn, "fused_qkv", attn.q_proj, attn.k_proj, attn.v_proj) is None


def test_only_int4_linears_of_one_input_size_fuse():
    attn = quantize_module(_attention(), "int8")
    assert isinstance(attn.q_proj, Int8Linear) and "fused_qkv" not in attn._modules
    mixed = _attention()
    mixed.k_proj = nn.Linear(32, KV, bias=False)  # another input size
    quantize_module(mixed, "int4")
    assert "fused_qkv" not in mixed._modules
    assert fuse_projections(nn.Linear(4, 4)) is not None  # nothing to fuse: unchanged


def test_parts_that_split_a_packing_block_are_not_fused():
    """Where the packing's row blocks are larger than 16 rows (AVX-512: 64), a part ending
    inside a block is not fused (stacked, its rows would be misread): each linear keeps its
    own kernel and bits. Where blocks are 16 rows, the same parts fuse and agree."""
    torch.manual_seed(0)
    attn = _Attention(False).requires_grad_(False)
    attn.q_proj, attn.k_proj = nn.Linear(64, 48, bias=False), nn.Linear(64, 16, bias=False)
    reference = {n: Int4Linear.from_linear(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")}
    quantize_module(attn, "int4")
    x = torch.randn(1, 1, 64)
    fusion = attn._modules.get("fused_qkv")
    assert (fusion is not None) == (int4_block_rows() <= 16)
    outs = fusion(x) if fusion is not None else [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    for out, name in zip(outs, ("q_proj", "k_proj", "v_proj"), strict=True):
        assert torch.equal(out, reference[name](x))


def test_the_packing_block_found_is_one_the_kernel_honours():
    rows = int4_block_rows()
    assert rows in (16, 32, 64, 128, 256)
    assert Q % rows == 0 and KV % rows == 0  # the aligned sizes above fuse on this CPU


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_int4_lean_decode_with_fused_projections_is_bit_identical(
    aligned_model_dir, family, monkeypatch
):
    """The span's own check (``_agrees``) passes with the fused kernels, and 12 decode steps
    through the lean path equal the blocks' own forward bit for bit."""
    from layerchain.model import load_span, resolve_model

    spec = resolve_model(str(aligned_model_dir(family)))
    span = load_span(spec, 0, 4, dtype="int4")
    layer = span.layers[0]
    assert isinstance(layer.self_attn.fused_qkv, FusedLinears)
    assert isinstance(layer.mlp.fused_gate_up, FusedLinears)
    assert span.fast_decode  # the lean path agreed with the blocks' forward at load
    torch.manual_seed(0)
    prompt = torch.randn(1, 5, spec.hidden_size)
    steps = torch.randn(12, 1, 1, spec.hidden_size)
    calls = []
    joint = FusedLinears.joint  # what each fused call runs (forward and span.rotated_qkv)
    monkeypatch.setattr(FusedLinears, "joint", lambda m, x: calls.append(1) or joint(m, x))
    outs = {}
    native, span.native_decode = span.native_decode, False  # the Python path's calls
    for lean in (True, False):
        span.fast_decode = lean
        cache = span.new_cache()
        span(prompt, cache)
        outs[lean] = torch.cat([span(step, cache) for step in steps], dim=1)
    span.fast_decode, span.native_decode = True, native
    # q/k/v and gate/up of 4 blocks, lean steps only (qwen2's windowed blocks: a mask, plain)
    assert len(calls) == 2 * 4 * 12 if family == "llama" else len(calls) >= 2 * 12
    assert torch.equal(outs[True], outs[False])
    cache = span.new_cache()  # the default path (native for llama where built): the same
    span(prompt, cache)
    assert torch.equal(torch.cat([span(step, cache) for step in steps], dim=1), outs[False])


def test_unfused_sets_the_fused_kernels_aside_and_back(aligned_model_dir):
    """``bench compute --baseline`` times int4 as before the fused kernels on the same
    model: ``unfused`` takes the fusions out of the span (the same bits) and restores them."""
    from layerchain.bench.compute import bench_compute, unfused
    from layerchain.model.generate import LocalModel
    from layerchain.model.resolve import resolve_model

    model = str(aligned_model_dir("llama", tokenizer=True))
    local = LocalModel(resolve_model(model), dtype="int4")
    attn = local.span.layers[0].self_attn
    x = torch.randn(1, 1, local.spec.hidden_size)
    fused_out = local.span(x, local.span.new_cache())
    with unfused(local):
        assert "fused_qkv" not in attn._modules
        plain_out = local.span(x, local.span.new_cache())
    assert "fused_qkv" in attn._modules
    assert torch.equal(fused_out, plain_out)
    report = bench_compute(model, dtypes=["int4"], tokens=2, repeats=1, agreement=False,
                           baseline=True)
    python = ["layerchain-python"] if local.span.native_decode else []  # native built
    assert [(r["runtime"], r["dtype"]) for r in report["rows"]][: 2 + len(python)] == [
        (runtime, "int4") for runtime in ["layerchain", *python, "layerchain-unfused"]
    ]


def test_int4_decode_batches_use_the_fused_kernels_and_match_solo_steps(aligned_model_dir):
    """``model.batched`` shares ``project_qkv``/``mlp_out``: a batch of 3 int4 sessions runs
    the fused kernels over its stacked rows and matches each session's solo step."""
    from layerchain.model import load_span, resolve_model
    from layerchain.model.batched import decode_batch

    spec = resolve_model(str(aligned_model_dir("llama")))
    span = load_span(spec, 0, 4, dtype="int4")
    assert isinstance(span.layers[0].self_attn.fused_qkv, FusedLinears)
    torch.manual_seed(3)
    batched, solo = [], []
    for length in (2, 5, 3):
        prompt = torch.randn(1, length, spec.hidden_size)
        for caches in (batched, solo):
            caches.append(cache := span.new_cache())
            span(prompt, cache)
    x = torch.randn(3, 1, spec.hidden_size)
    out = decode_batch(span, x, batched)
    for i in range(3):  # bf16 activations: rows of one kernel call may round differently
        torch.testing.assert_close(out[i : i + 1], span(x[i : i + 1], solo[i]),
                                   atol=2e-2, rtol=0)

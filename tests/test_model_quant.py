"""Compact weights (model.quant, issue 21 item 1): each form computes what its codes say,
holds only compact tensors, loads and runs a span, and agrees with fp32 above the floor."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from layerchain.errors import ConfigError
from layerchain.model.quant import (
    AGREEMENT_FLOOR,
    DTYPES,
    INT4_GROUP,
    RESCORE_TOP,
    CastLinear,
    Int4Linear,
    Int8Linear,
    RescoredInt8Linear,
    int4_codes,
    int8_codes,
    quantize_module,
    resolve_dtype,
)

CONCRETE = ("fp32", "bf16", "fp16", "int8", "int4")


def _linear(n: int, k: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    layer.requires_grad_(False)
    return layer


def test_int8_linear_computes_its_codes_times_scales():
    layer = _linear(64, 96)
    compact = Int8Linear.from_linear(layer)
    assert compact.codes.dtype == torch.int8 and compact.codes.shape == (64, 96)
    dequantized = compact.codes.float() * compact.scales[:, None]  # [N, K]
    assert (dequantized - layer.weight).abs().max() <= compact.scales.max() / 2 * 1.01
    x = torch.randn(2, 5, 96)
    expected = x @ dequantized.T + layer.bias
    out = compact(x)
    assert out.shape == (2, 5, 64) and out.dtype == torch.float32  # activations stay fp32
    torch.testing.assert_close(out, expected, rtol=0.02, atol=0.02)  # bf16 activations


def test_int4_linear_computes_its_groupwise_codes():
    layer = _linear(32, 128)
    codes, scales_zeros = int4_codes(layer.weight, INT4_GROUP)
    assert codes.min() >= 0 and codes.max() <= 15
    scales, zeros = scales_zeros[..., 0].T, scales_zeros[..., 1].T  # [N, K/group]
    groups = codes.float().reshape(32, -1, INT4_GROUP)
    dequantized = ((groups - 8) * scales[..., None] + zeros[..., None]).reshape(32, 128)
    assert (dequantized - layer.weight).abs().max() <= scales.max() / 2 * 1.01
    x = torch.randn(3, 128)
    torch.testing.assert_close(
        Int4Linear.from_linear(layer)(x), x @ dequantized.T + layer.bias, rtol=0.02, atol=0.02
    )


def test_int4_requantizes_gguf_q4_1_blocks_to_their_own_codes():
    """A Q4_1 block is w = m + d * q (q in 0..15, 32 weights): our int4 groups are the same,
    so a Q4_1 file's weights come back with their own codes (why int4 agrees so well)."""
    torch.manual_seed(1)
    n, k = 16, 64
    q = torch.randint(0, 16, (n, k))
    q[:, ::INT4_GROUP] = 0  # each block holds its minimum and maximum code, as Q4_1's do
    q[:, 1::INT4_GROUP] = 15
    d = torch.rand(n, k // INT4_GROUP).half().float() * 0.01 + 1e-3  # fp16 in the file
    m = -torch.rand(n, k // INT4_GROUP).half().float() * 0.1
    weight = (m[..., None] + d[..., None] * q.float().reshape(n, -1, INT4_GROUP)).reshape(n, k)
    codes, _ = int4_codes(weight, INT4_GROUP)
    assert torch.equal(codes, q.to(torch.int32))


def test_rescored_head_takes_the_exact_kernels_bits_for_its_best_rows():
    """The fast LM head: FBGEMM scores every row, the RESCORE_TOP best are Int8Linear's own
    bits, so the greedy pick is Int8Linear's; other logits are close."""
    torch.manual_seed(2)
    codes, scales = int8_codes(torch.randn(4096, 64) * 0.05)
    fast = RescoredInt8Linear.build(codes, scales)
    if fast is None:
        pytest.skip("this torch has no FBGEMM quantized linear")
    exact = Int8Linear(codes, scales, None)
    x = torch.randn(2, 3, 64) * 3
    got, want = fast(x), exact(x)
    assert got.shape == want.shape == (2, 3, 4096) and got.dtype == torch.float32
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert ((got == want).sum(-1) >= RESCORE_TOP).all()  # the rescored rows: exact
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    assert RescoredInt8Linear.build(codes[:RESCORE_TOP], scales[:RESCORE_TOP]) is None


def test_layers_the_int4_packing_cannot_hold_take_int8():
    odd = _linear(24, 64)  # N % 16 != 0
    module = quantize_module(nn.Sequential(odd, _linear(64, 24)), "int4")
    assert isinstance(module[0], Int8Linear) and isinstance(module[1], Int8Linear)
    assert isinstance(quantize_module(nn.Sequential(_linear(32, 64)), "int4")[0], Int4Linear)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8", "int4"])
def test_quantize_module_leaves_no_float32_matrix(dtype):
    model = nn.Sequential(_linear(64, 96), nn.ReLU(), nn.Sequential(_linear(32, 64)))
    quantize_module(model, dtype)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    matrices = [t for t in (*model.parameters(), *model.buffers()) if t.dim() == 2]
    assert matrices and all(t.dtype != torch.float32 for t in matrices)
    assert model(torch.randn(4, 96)).shape == (4, 32)


def test_cast_linear_keeps_the_callers_dtype():
    layer = _linear(16, 32)
    out = CastLinear.from_linear(layer, torch.bfloat16)(torch.randn(2, 32))
    assert out.dtype == torch.float32


def test_dtype_names_are_checked():
    assert DTYPES == ("auto", "fp32", "bf16", "fp16", "int8", "int4")
    assert resolve_dtype("auto", "cpu") == "int4"  # the fastest above the floor, measured
    assert resolve_dtype("int8", torch.device("cpu")) == "int8"
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        resolve_dtype("int3")
    with pytest.raises(ConfigError, match="CPU only"):
        resolve_dtype("int4", torch.device("cuda"))  # the packed layout is a CPU one
    with pytest.raises(ConfigError, match="resolve"):
        quantize_module(nn.Sequential(), "auto")


def test_node_config_and_cli_refuse_an_unknown_dtype(tmp_path):
    from typer.testing import CliRunner

    from layerchain.cli.main import app
    from layerchain.client.config import ClientConfig
    from layerchain.node.config import NodeConfig

    assert NodeConfig().dtype == "fp32" and NodeConfig(dtype="int8").dtype == "int8"
    with pytest.raises(ConfigError, match="dtype"):
        NodeConfig(dtype="int3")
    with pytest.raises(ConfigError, match="dtype"):
        ClientConfig(dtype="fp8")
    result = CliRunner().invoke(app, ["node", "start", "--blocks", "0:2", "--new-swarm",
                                      "--data-dir", str(tmp_path), "--dtype", "int3"])
    assert result.exit_code == 1 and "dtype" in result.output


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])  # qwen2: biased q/k/v
@pytest.mark.parametrize("dtype", CONCRETE)
def test_each_dtype_loads_and_runs_a_span(tiny_model_dir, family, dtype):
    from layerchain.model import load_span, resolve_model

    spec = resolve_model(str(tiny_model_dir(family)))
    reference = load_span(spec, 0, 4)
    span = load_span(spec, 0, 4, dtype=dtype)
    torch.manual_seed(0)
    hidden = torch.randn(1, 6, spec.hidden_size)
    expected = reference(hidden, reference.new_cache())
    out = span(hidden, span.new_cache())
    assert out.dtype == torch.float32 and out.shape == expected.shape
    error = (out - expected).norm() / expected.norm()
    assert error < {"fp32": 1e-6, "bf16": 0.02, "fp16": 0.01, "int8": 0.05, "int4": 0.2}[dtype]
    step = span(torch.randn(1, 1, spec.hidden_size), cache := span.new_cache())
    assert step.shape == (1, 1, spec.hidden_size) and cache.length == 1


def test_compact_spans_hold_a_fraction_of_fp32(smollm2_spec):
    """3 of SmolLM2's 30 blocks: int8 <= fp32 / 3.5, int4 <= fp32 / 6 (weights in memory)."""
    from layerchain.model import load_span

    sizes = {d: load_span(smollm2_spec, 10, 13, dtype=d).parameter_bytes() for d in CONCRETE}
    assert sizes["bf16"] <= sizes["fp32"] / 1.9
    assert sizes["int8"] <= sizes["fp32"] / 3.5
    assert sizes["int4"] <= sizes["fp32"] / 6


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_compact_head_embeds_and_projects_close_to_fp32(smollm2_spec, dtype):
    from layerchain.model import load_head

    reference, head = load_head(smollm2_spec), load_head(smollm2_spec, dtype=dtype)
    ids = torch.tensor([[1, 500, 20_000, 49_151]])
    rows = head.embed(ids)
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, reference.embed(ids), rtol=0.02, atol=0.01)
    hidden = torch.randn(1, 3, smollm2_spec.hidden_size)
    logits, expected = head.logits(hidden), reference.logits(hidden)
    assert logits.shape == expected.shape and logits.dtype == torch.float32
    # int8 heads: FBGEMM's 7-bit activations score the tail (the top rows exact, below)
    assert (logits - expected).norm() / expected.norm() < (0.02 if dtype == "bf16" else 0.03)
    fp32_bytes = sum(t.numel() * t.element_size() for t in reference.parameters())
    held = sum(t.numel() * t.element_size() for t in (*head.parameters(), *head.buffers()))
    assert held <= fp32_bytes / (1.9 if dtype == "bf16" else 3.5)  # tied: one int8 table
    if isinstance(head.projection, RescoredInt8Linear):  # + FBGEMM's packed copy
        assert held + head.projection.packed_bytes <= fp32_bytes / 1.9
        want = Int8Linear(head.projection.codes, head.projection.scales, None)(head.norm(hidden))
        assert torch.equal(logits.argmax(-1), want.argmax(-1))
        assert ((logits == want).sum(-1) >= RESCORE_TOP).all()  # the rescored rows: exact


@pytest.mark.slow
def test_int8_and_int4_agree_with_fp32_greedy_tokens(smollm2_spec):
    """Teacher-forced greedy agreement on the bench's prompts (measured 2026-12-02 over all 8
    prompts x 32 tokens: int8 0.95-0.97, int4 0.984-0.988, bf16 0.996); the floor is 0.9."""
    from layerchain.bench.compute import PROMPTS, agreement_with_fp32

    agreed = agreement_with_fp32(smollm2_spec, ["int8", "int4"], tokens=16, prompts=PROMPTS[:4])
    assert agreed["int8"] >= AGREEMENT_FLOOR
    assert agreed["int4"] >= AGREEMENT_FLOOR


def test_bench_compute_reports_rows_and_says_how_to_get_llamacpp(tiny_model_dir, monkeypatch):
    import importlib
    import json

    from typer.testing import CliRunner

    from layerchain.bench import compute
    from layerchain.cli.main import app

    real_import = importlib.import_module

    def no_llamacpp(name: str, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(compute.importlib, "import_module", no_llamacpp)
    model = str(tiny_model_dir("llama", tokenizer=True))
    result = CliRunner().invoke(app, ["bench", "compute", "--model", model, "--dtypes",
                                      "fp32,int8", "--tokens", "2", "--repeats", "1",
                                      "--no-agreement", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [(r["runtime"], r["dtype"]) for r in report["rows"]] == [
        ("layerchain", "fp32"), ("layerchain", "int8")
    ]
    for row in report["rows"]:
        assert row["ms_per_token"] > 0 and row["tokens_per_s"] > 0 and row["weights_mb"] > 0
        assert row["agreement"] is None  # --no-agreement
    assert report["rows"][1]["weights_mb"] < report["rows"][0]["weights_mb"] / 2
    assert report["ratio_vs_llamacpp"] is None and "pip install" in report["note"]
    bad = CliRunner().invoke(app, ["bench", "compute", "--threads", "0"])
    assert bad.exit_code == 1 and "--threads" in bad.output


def test_agreement_scores_fp32_against_itself_as_one(tiny_model_dir):
    from layerchain.bench.compute import PROMPTS, agreement_with_fp32
    from layerchain.model import resolve_model

    spec = resolve_model(str(tiny_model_dir("llama", tokenizer=True)))
    agreed = agreement_with_fp32(spec, ["fp32", "int4"], tokens=6, prompts=PROMPTS[:2])
    assert agreed["fp32"] == 1.0  # teacher forcing reads fp32's own greedy tokens back
    assert 0.0 <= agreed["int4"] <= 1.0


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_an_audit_in_the_nodes_own_form_agrees(smollm2_spec, smollm2_tokenizer, dtype):
    """What auditing compact nodes needs (BENCHMARKS "Compact weights"): recomputed in the same
    form, with other threads and as decode steps after a prefill instead of one prefill, a
    hop's commitment stays within AUDIT_TOLERANCE (an fp32 recomputation does not, measured)."""
    from layerchain.market.commitment import commit, commitment_agrees
    from layerchain.model import encode_prompt, load_head, load_span

    span = load_span(smollm2_spec, 20, 23, dtype=dtype)
    ids = encode_prompt(smollm2_tokenizer, "Name three rivers in Europe.")
    hidden = load_head(smollm2_spec).embed(torch.tensor([ids]))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        node_out = span(hidden, span.new_cache())  # [1, T, H]
        torch.set_num_threads(2)
        cache = span.new_cache()
        replayed = torch.cat([span(hidden[:, :-2], cache), span(hidden[:, -2:-1], cache),
                              span(hidden[:, -1:], cache)], dim=1)
    finally:
        torch.set_num_threads(threads)
    assert commitment_agrees(commit(node_out), replayed)


_ANON_GROWTH = """
import gc, sys
from layerchain.model import load_span, resolve_model
def anon_mb():  # anonymous resident memory: heap, not the GGUF file's mapped pages
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) / 1024
spec = resolve_model("smollm2")
load_span(spec, 0, 1, dtype=sys.argv[1]); gc.collect()  # imports and first-use caches first
before = anon_mb()
span = load_span(spec, 1, 11, dtype=sys.argv[1]); gc.collect()
print(anon_mb() - before, span.parameter_bytes() / 2**20)
"""


@pytest.mark.slow  # a fresh process per dtype (~6 s each)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_compact_load_returns_the_dropped_float32_memory(dtype):
    """10 blocks in a fresh process: resident heap grows by the compact weights plus a little,
    not by the float32 matrices the load dropped (glibc keeps them without a trim: measured
    on 30 blocks, int4 283 MB resident for 63 MB of weights; 119 MB with it)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _ANON_GROWTH, dtype], capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    grown, weights = float(out[0]), float(out[1])
    fp32_weights = {"int8": 3.96, "int4": 6.39}[dtype] * weights  # measured ratios
    assert grown <= weights + 0.25 * fp32_weights, (grown, weights)

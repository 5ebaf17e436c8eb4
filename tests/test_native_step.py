"""The native decode path (``layerchain.native``, ``model.native_step``): built by
``make install``, it gives the Python path's bits, steps aside for what it does not mirror,
and sees a swapped module at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from layerchain import native
from layerchain.errors import ConfigError, SpanError
from layerchain.model import load_span, resolve_model
from layerchain.model.native_step import FLOAT_LAYOUT, INT4_LAYOUT, NativeStep, step_fields

pytestmark = pytest.mark.skipif(
    native.compiler() is None, reason="no C++ compiler here: the native path is not built"
)


@pytest.fixture
def native_calls(monkeypatch):
    """The native steps run (each a list of the blocks' count), checks at load excluded."""
    calls: list[int] = []
    checking = []
    run, agrees = NativeStep._run, NativeStep._agrees

    def counting(self, layout, tensors, hidden, cos_sin, keys, values, length):
        if not checking:
            calls.append(len(keys))
        return run(self, layout, tensors, hidden, cos_sin, keys, values, length)

    def check(self, layer, lean):
        checking.append(1)
        try:
            return agrees(self, layer, lean)
        finally:
            checking.pop()

    monkeypatch.setattr(NativeStep, "_run", counting)
    monkeypatch.setattr(NativeStep, "_agrees", check)
    return calls


def decode(span, prompt, steps, *, native_on: bool, max_length: int | None = None):
    """Outputs [1, T, H] of a prefill then one-token steps through ``span``."""
    was, span.native_decode = span.native_decode, native_on
    try:
        cache = span.new_cache(max_length=max_length)
        outs = [span(prompt, cache)] + [span(step, cache) for step in steps]
    finally:
        span.native_decode = was
    return torch.cat(outs, dim=1)


def inputs(hidden: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 5, hidden, generator=g), torch.randn(steps, 1, 1, hidden, generator=g)


def test_make_install_built_the_library_and_it_loads():
    assert native.find_library() is not None, "run `make install` (python -m layerchain.native)"
    assert native.load() and native.enabled()
    assert hasattr(torch.ops.layerchain, "span_decode")


def test_float32_steps_give_the_python_paths_bits_through_a_growing_cache(
    tiny_model_dir, native_calls
):
    spec = resolve_model(tiny_model_dir("llama"))
    span = load_span(spec, 0, spec.num_blocks)
    assert span.native_decode and step_fields(list(span.layers))[0] == FLOAT_LAYOUT
    prompt, steps = inputs(spec.hidden_size, 70)  # past the unbounded cache's first 64
    python = decode(span, prompt, steps, native_on=False)
    assert native_calls == []
    ours = decode(span, prompt, steps, native_on=True)
    assert torch.equal(ours, python)
    # every step but the one that grew the cache (the Python path grows it) ran natively,
    # all four blocks at once
    assert len(native_calls) == 69 and set(native_calls) == {spec.num_blocks}
    bounded = decode(span, prompt, steps, native_on=True, max_length=75)
    assert torch.equal(bounded, python)


def test_int4_fused_steps_give_the_python_paths_bits(aligned_model_dir, native_calls):
    spec = resolve_model(str(aligned_model_dir("llama")))
    span = load_span(spec, 0, spec.num_blocks, dtype="int4")
    assert span.native_decode and step_fields(list(span.layers))[0] == INT4_LAYOUT
    prompt, steps = inputs(spec.hidden_size, 12, seed=1)
    python = decode(span, prompt, steps, native_on=False, max_length=20)
    ours = decode(span, prompt, steps, native_on=True, max_length=20)
    assert torch.equal(ours, python) and len(native_calls) == 12


def test_the_default_model_int4_and_fp32_decode_the_same_bits_natively(smollm2_spec):
    for dtype in ("int4", "fp32"):
        span = load_span(smollm2_spec, 0, 4, dtype=dtype)
        assert span.native_decode
        prompt, steps = inputs(smollm2_spec.hidden_size, 6)
        python = decode(span, prompt, steps, native_on=False, max_length=11)
        assert torch.equal(decode(span, prompt, steps, native_on=True, max_length=11), python)


def test_a_swapped_module_is_computed_with_at_once(tiny_model_dir, native_calls):
    """A module replaced between steps (an adapter, a cheat's stand-in) is what the next
    native step computes with; one the native path does not mirror sends it to Python."""
    spec = resolve_model(tiny_model_dir("llama"))
    span = load_span(spec, 0, spec.num_blocks)
    prompt, steps = inputs(spec.hidden_size, 6)
    mlp = span.layers[1].mlp
    original = mlp.down_proj
    other = nn.Linear(original.in_features, original.out_features, bias=False)
    with torch.no_grad():
        other.weight.copy_(original.weight * 1.5)
    cache = {on: span.new_cache(max_length=20) for on in (False, True)}
    outs: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    for i, step in enumerate(steps):
        if i == 2:
            mlp.down_proj = other
        if i == 4:
            mlp.down_proj = nn.Linear(original.in_features, original.out_features, bias=True)
        for on in (False, True):
            span.native_decode = on
            if i == 0:
                span(prompt, cache[on])
            outs[on].append(span(step, cache[on]))
    span.native_decode = True
    mlp.down_proj = original
    assert torch.equal(torch.cat(outs[True]), torch.cat(outs[False]))
    assert not torch.equal(outs[True][2], decode(span, prompt, steps[:3], native_on=False)[:, -1:])
    assert len(native_calls) == 4  # steps 0-3; a biased linear is not mirrored: Python


def test_a_full_cache_is_refused_as_on_the_python_path(tiny_model_dir):
    spec = resolve_model(tiny_model_dir("llama"))
    span = load_span(spec, 0, spec.num_blocks)
    prompt, steps = inputs(spec.hidden_size, 2)
    cache = span.new_cache(max_length=6)
    span(prompt, cache)
    span(steps[0], cache)
    with pytest.raises(SpanError, match="cache is full"):
        span(steps[1], cache)
    assert cache.length == 6


def test_a_layout_that_disagrees_at_its_first_step_is_never_used(
    tiny_model_dir, monkeypatch, native_calls
):
    spec = resolve_model(tiny_model_dir("llama"))
    span = load_span(spec, 0, spec.num_blocks)
    run = NativeStep._run
    monkeypatch.setattr(
        NativeStep, "_run", lambda self, *args: run(self, *args) + 1e-6  # a drifting build
    )
    prompt, steps = inputs(spec.hidden_size, 4)
    ours = decode(span, prompt, steps, native_on=True)
    assert span._native.agreed == {FLOAT_LAYOUT: False}
    assert torch.equal(ours, decode(span, prompt, steps, native_on=False))


def test_the_switch_turns_the_native_path_off(tiny_model_dir, monkeypatch):
    spec = resolve_model(tiny_model_dir("llama"))
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not native.enabled() and not load_span(spec, 0, 2).native_decode
    monkeypatch.delenv(native.ENV_SWITCH)
    assert load_span(spec, 0, 2).native_decode


def test_a_failed_build_is_one_error_and_keeps_the_built_library(monkeypatch):
    built = native.find_library()
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.raises(ConfigError, match="building layerchain's native decode failed"):
        native.build(force=True)
    assert native.find_library() == built is not None
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler"):
        native.build(force=True)
    done = subprocess.run(
        [sys.executable, "-m", "layerchain.native"], capture_output=True, text=True,
        env={**os.environ, "CXX": "no-such-compiler-here"}, check=False,
    )  # the library is already built: its path, nothing compiled
    assert done.returncode == 0 and done.stdout.strip() == str(built)


@pytest.fixture
def batch_calls(monkeypatch):
    """Rows of each native batch run (the first checks' excluded)."""
    calls: list[int] = []
    batch = NativeStep.batch

    def counting(self, layers, rows, cos_sin, caches, reference):
        out = batch(self, layers, rows, cos_sin, caches, reference)
        if out is not None:
            calls.append(rows.shape[0])
        return out

    monkeypatch.setattr(NativeStep, "batch", counting)
    return calls


def batched_run(span, prompts, steps: int, *, native_on: bool):
    """Rows [B, steps, H] of ``steps`` batched decode steps of sessions whose prompts
    (different lengths) ran alone first, each step's inputs the rows of the last."""
    from layerchain.model.batched import decode_batch

    was, span.native_decode = span.native_decode, native_on
    try:
        caches = [span.new_cache(max_length=40) for _ in prompts]
        rows = torch.cat([span(p, c)[:, -1:] for p, c in zip(prompts, caches)])  # [B, 1, H]
        outs = []
        for _ in range(steps):
            rows = decode_batch(span, rows, caches)
            outs.append(rows)
    finally:
        span.native_decode = was
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_batched_steps_give_the_python_batchs_bits(
    tiny_model_dir, aligned_model_dir, dtype, batch_calls
):
    path = tiny_model_dir("llama") if dtype == "fp32" else aligned_model_dir("llama")
    spec = resolve_model(str(path))
    span = load_span(spec, 0, spec.num_blocks, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, n, spec.hidden_size, generator=g) for n in (1, 4, 9)]
    python = batched_run(span, prompts, 8, native_on=False)
    assert batch_calls == []
    ours = batched_run(span, prompts, 8, native_on=True)
    assert torch.equal(ours, python) and batch_calls == [3] * 8


def test_a_batch_whose_check_fails_or_lacks_room_runs_in_python(
    tiny_model_dir, monkeypatch, batch_calls
):
    from layerchain.model.batched import decode_batch

    spec = resolve_model(tiny_model_dir("llama"))
    span = load_span(spec, 0, spec.num_blocks)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randn(1, n, spec.hidden_size, generator=g) for n in (2, 3)]
    python = batched_run(span, prompts, 3, native_on=False)
    # unbounded caches: storage of 64 tokens from the prompt, room for these steps
    caches = [span.new_cache() for _ in prompts]
    rows = torch.cat([span(p, c)[:, -1:] for p, c in zip(prompts, caches)])
    caches[1]._keys[2] = caches[1]._keys[2][:, :, :3]  # no room for its next token here
    caches[1]._values[2] = caches[1]._values[2][:, :, :3]
    decode_batch(span, rows, caches)  # the Python path grows it
    assert batch_calls == [] and caches[1]._keys[2].shape[2] >= 4
    ops = torch.ops.layerchain
    monkeypatch.setattr(torch.ops, "layerchain", type("Drift", (), {
        "span_decode": ops.span_decode,
        "span_decode_batch": staticmethod(lambda *a: ops.span_decode_batch(*a) * 1.0001),
    }))
    span._native.agreed.clear()
    assert torch.equal(batched_run(span, prompts, 3, native_on=True), python)
    assert batch_calls == [] and span._native.agreed[-1 - FLOAT_LAYOUT] is False


def test_a_node_can_say_which_path_its_steps_take(tiny_model_dir, monkeypatch):
    from layerchain.model.native_step import describe

    spec = resolve_model(tiny_model_dir("llama"))
    assert describe(load_span(spec, 0, 2)) == "native (C++, layerchain.native)"
    assert "does not mirror" in describe(load_span(spec, 0, 2, dtype="int8"))
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert describe(load_span(spec, 0, 2)) == "Python (LAYERCHAIN_NATIVE=0)"
    monkeypatch.delenv(native.ENV_SWITCH)
    monkeypatch.setattr(native, "find_library", lambda: None)
    off = load_span(spec, 0, 2)
    off.native_decode = False  # as a span built where nothing was
    assert "not built: python -m layerchain.native" in describe(off)


def test_a_build_clears_older_builds_of_its_checkout_only(tmp_path, monkeypatch):
    """Older libraries beside the package are this checkout's own and go; the user's cache
    folder (used when the package folder is read-only) may serve other installs: kept."""
    package, cache = tmp_path / "package", tmp_path / "cache"
    monkeypatch.setattr(native, "_PACKAGE_DIR", package)
    monkeypatch.setattr(native, "_CACHE_DIR", cache)

    def compile_(command, **_):  # writes the -o file, as the compiler would
        Path(command[command.index("-o") + 1]).write_bytes(b"library")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(native.subprocess, "run", compile_)
    for folder in (package, cache):
        folder.mkdir()
        (folder / "layerchain_native-0000.so").write_bytes(b"older")
    writable = native._writable
    monkeypatch.setattr(native, "_writable", lambda d: d != package and writable(d))
    built = native.build(force=True)
    assert built.parent == cache and (cache / "layerchain_native-0000.so").exists()
    monkeypatch.setattr(native, "_writable", writable)
    built = native.build(force=True)
    assert built.parent == package and not (package / "layerchain_native-0000.so").exists()
    assert sorted(p.name for p in package.iterdir()) == [built.name]

"""``layerchain bench step``: where the time of one decode step through a span goes.

A decode step is one token through blocks ``[0, blocks)`` with a KV cache already holding
``context`` tokens (the cache is truncated back after each step, so every sample does the
same work). The run measures, side by side in one process and interleaved round by round
(so a machine shared with other work slows both alike):

* ``before_ms`` / ``after_ms``: the step through the decoder layers' own ``forward`` (the
  plain path, ``SpanModel.fast_decode = False``) and through ``span.LeanDecode`` (the default
  for llama-shaped families), p50 wall time; ``*_cpu_ms``: the same in this thread's CPU time,
  which time spent descheduled does not inflate (the figure to compare on a busy machine;
  meaningful with ``threads=1``, where all of a step's work runs on this thread);
  ``native_path``: whether the lean path's steps run in C++ (``layerchain.native``, built
  by ``make install``; the same ops and bits);
* ``identical``: whether both paths gave the same bits at every step (they must);
* ``matmul_share`` / ``attention_share``: the matrix products' and SDPA's own time
  (torch.profiler's self time of those ops) over the profiled steps' wall time (both clocks
  stretch alike on a busy machine); the rest (``other_share``) is the elementwise ops, the
  per-op dispatch and the Python between them. ``aten_calls_per_block`` (nested calls
  included) and ``python_calls_per_block`` count that dispatch, after and ``*_before``: counts
  do not depend on the machine's load, unlike times;
* ``node_extras_ms``: what a node adds around the span each step: the output's commitment,
  the signed receipt (two sha256 and an ECDSA signature) and the wire codec (encode + decode
  of the StepResult);
* ``batch`` (``batch=(1, 2, 4, ...)`` only): per batch size B, the decode step of B
  sessions at once (``model.batched.decode_batch``, each session its own cache of ``context``
  tokens; B = 1 is ``span.forward``, as a node runs a session alone): ``ms_per_step``,
  ``ms_per_token`` (= / B), their CPU times, and ``speedup`` (B = 1's ms per token over B's),
  sizes interleaved round by round;
* ``compile`` (``compile=True`` only): ``torch.compile`` of each block's MLP and norms (the
  parts without KV-cache state) on the plain path (the lean one inlines the norms), its
  compile time, step time and whether the outputs stay bit-identical.

``dtype`` (``bench step --dtype int4``): the span's weights in a compact form
(``model.quant``); its kernels (``_weight_int4pack_mm_for_cpu``, ...) count as matrix
products.

Measurements only: nothing here is asserted in a timed test.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from layerchain.model.spec import DEFAULT_MODEL

MATMUL_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm",
    "aten::_weight_int4pack_mm_for_cpu",
})  # the weight products: a decode step's irreducible work (memory-bound on a CPU)
ATTENTION_PREFIX = "aten::_scaled_dot_product"  # SDPA kernels (flash, math, ...)


def run_step_bench(
    model: str = DEFAULT_MODEL,
    *,
    blocks: int = 10,
    context: int = 128,
    steps: int = 20,
    rounds: int = 10,
    threads: int = 1,
    device: str = "cpu",
    compile: bool = False,
    batch: tuple[int, ...] = (),
    dtype: str = "fp32",
) -> dict[str, Any]:
    """Measure a decode step through ``blocks`` blocks of ``model`` (see the module);
    ``rounds`` rounds of ``steps`` steps per path. ``threads`` torch threads (0: torch's
    default); ``dtype`` the form the span's weights are held in (``model.quant``: e.g. int4,
    whose kernel counts among the matrix products). Returns the JSON object of ``bench step``."""
    from layerchain.model import load_span, resolve_model
    from layerchain.model.device import resolve_device

    if threads:
        torch.set_num_threads(threads)
    place = resolve_device(device)
    spec = resolve_model(model)
    blocks = min(blocks, spec.num_blocks)
    from layerchain.model.quant import check_dtype, resolve_dtype

    form = resolve_dtype(check_dtype(dtype), place)
    span = load_span(spec, 0, blocks, dtype=form, device=place)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, context, spec.hidden_size, generator=generator)
    token = torch.randn(1, 1, spec.hidden_size, generator=generator)
    cache = span.new_cache(max_length=context + 1)
    sync = _synchronizer(place)
    with torch.inference_mode():
        span.forward(prompt, cache)

        def step() -> torch.Tensor:
            out = span.forward(token, cache)
            cache.truncate(context)  # the same work every sample
            return out

        has_lean = span.fast_decode
        samples: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        outputs: dict[bool, torch.Tensor] = {}
        for _ in range(rounds):
            for lean in (False, True):
                span.fast_decode = lean and has_lean
                for _ in range(steps):
                    w0, c0 = time.perf_counter(), time.thread_time()
                    outputs[lean] = step()
                    sync()
                    samples[lean].append((time.perf_counter() - w0, time.thread_time() - c0))
                span.fast_decode = has_lean
        identical = bool(torch.equal(outputs[False], outputs[True]))
        calls = {}  # deterministic, unlike times: Python and aten calls per block and step
        for lean in (False, True):
            span.fast_decode = lean and has_lean
            calls[lean] = (_python_calls(step) / blocks, _profile(step, 1, blocks)[3])
        span.fast_decode = has_lean
        profile = _profile(step, steps, blocks) if place.type == "cpu" else None
        compiled = _compiled(span, step, steps, outputs[True], sync) if compile else None
        batched = _batched(span, batch, context, steps, rounds, sync) if batch else None

    before, after = _p50s(samples[False]), _p50s(samples[True])
    result: dict[str, Any] = {
        "model": spec.name,
        "device": str(place),
        "dtype": form,
        "threads": torch.get_num_threads(),
        "blocks": blocks,
        "context": context,
        "ms_per_step_p50": after[0],
        "cpu_ms_per_step_p50": after[1],
        "before_ms": before[0],
        "after_ms": after[0],
        "before_cpu_ms": before[1],
        "after_cpu_ms": after[1],
        "saved_share": round(1.0 - after[1] / before[1], 3) if before[1] else None,
        "lean_path": has_lean,
        "native_path": span.native_decode,  # the lean path's steps in C++ (layerchain.native)
        "identical": identical,
        "matmul_share": None,
        "attention_share": None,
        "other_share": None,
        "aten_calls_per_block": calls[True][1],
        "aten_calls_per_block_before": calls[False][1],
        "python_calls_per_block": round(calls[True][0]),
        "python_calls_per_block_before": round(calls[False][0]),
        "node_extras_ms": _node_extras(spec.hidden_size),
        "compile": compiled,
        "batch": batched,
    }
    if profile is not None:
        matmul_ms, attention_ms, wall_ms, _ = profile
        result.update(
            matmul_share=round(matmul_ms / wall_ms, 3),
            attention_share=round(attention_ms / wall_ms, 3),
            other_share=round(1.0 - (matmul_ms + attention_ms) / wall_ms, 3),
        )
    return result


def _batched(
    span: Any,
    sizes: tuple[int, ...],
    context: int,
    steps: int,
    rounds: int,
    sync: Callable[[], None],
) -> list[dict[str, Any]]:
    """Per batch size B (see the module): p50 wall and CPU ms of one decode step of B
    sessions, each with ``context`` tokens cached (truncated back after each step)."""
    from layerchain.model.batched import decode_batch

    generator = torch.Generator().manual_seed(1)
    hidden = span.config.hidden_size
    caches = {}
    for size in sizes:  # B sessions of the same context, each its own cache
        caches[size] = [span.new_cache(max_length=context + 1) for _ in range(size)]
        for cache in caches[size]:
            span.forward(torch.randn(1, context, hidden, generator=generator), cache)
    tokens = {size: torch.randn(size, 1, hidden, generator=generator) for size in sizes}

    def step(size: int) -> None:
        if size == 1:
            span.forward(tokens[size], caches[size][0])
        else:
            decode_batch(span, tokens[size], caches[size])
        sync()
        for cache in caches[size]:
            cache.truncate(context)

    samples: dict[int, list[tuple[float, float]]] = {size: [] for size in sizes}
    for size in sizes:
        step(size)  # warm-up
    for _ in range(rounds):
        for size in sizes:
            for _ in range(steps):
                w0, c0 = time.perf_counter(), time.thread_time()
                step(size)
                samples[size].append((time.perf_counter() - w0, time.thread_time() - c0))
    rows: list[dict[str, Any]] = []
    for size in sizes:
        wall, cpu = _p50s(samples[size])
        rows.append({"batch": size, "ms_per_step": wall, "ms_per_token": round(wall / size, 3),
                     "cpu_ms_per_step": cpu, "cpu_ms_per_token": round(cpu / size, 3)})
    alone = next((r for r in rows if r["batch"] == 1), None)
    for row in rows:
        row["speedup"] = (round(alone["ms_per_token"] / row["ms_per_token"], 2)
                          if alone is not None and row["ms_per_token"] else None)
    return rows


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """What makes a step's time include its work: a CUDA step is launched asynchronously."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def _p50s(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """(wall, cpu) p50 in ms."""
    wall = statistics.median(s[0] for s in samples)
    cpu = statistics.median(s[1] for s in samples)
    return round(1000.0 * wall, 3), round(1000.0 * cpu, 3)


def _profile(
    step: Callable[[], torch.Tensor], steps: int, blocks: int
) -> tuple[float, float, float, int]:
    """(matmul ms, attention ms, wall ms, aten calls per block) per step, from torch.profiler's
    self times over ``steps`` steps and their wall time (profiled too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall_ms = 1000.0 * (time.perf_counter() - t0) / steps
    matmul_us = attention_us = 0.0
    calls = 0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        calls += event.count
        if event.key in MATMUL_OPS:
            matmul_us += event.self_cpu_time_total
        elif event.key.startswith(ATTENTION_PREFIX):
            attention_us += event.self_cpu_time_total
    matmul_ms, attention_ms = matmul_us / 1000.0 / steps, attention_us / 1000.0 / steps
    return matmul_ms, attention_ms, max(wall_ms, matmul_ms + attention_ms), round(calls / steps / blocks)


def _python_calls(step: Callable[[], torch.Tensor]) -> int:
    """Python and builtin function calls one step makes (sys.setprofile's call events)."""
    count = 0

    def tally(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(tally)
    try:
        step()
    finally:
        sys.setprofile(None)
    return count


def _node_extras(hidden_size: int, samples: int = 200) -> dict[str, float]:
    """p50 ms of what a node does around the span per one-token step (see the module)."""
    from layerchain.market import Wallet
    from layerchain.market.commitment import commit
    from layerchain.market.receipts import ReceiptSigner
    from layerchain.types import Span
    from layerchain.wire import messages as m
    from layerchain.wire.codec import decode, encode_bytes

    x, out = torch.randn(1, 1, hidden_size), torch.randn(1, 1, hidden_size)
    signer = ReceiptSigner(Wallet.generate(), "bench-step", "0" * 64, Span(0, 1), 1)
    steps = iter(range(1 << 30))

    def receipt() -> None:
        signer.sign_step(next(steps), 1, x, out, b"")

    def codec() -> None:
        decode(encode_bytes(m.StepResult(1, "bench-step", 1, out, b"\0" * 400)))

    def p50(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(samples):
            t0 = time.thread_time()
            fn()
            times.append(time.thread_time() - t0)
        return round(1000.0 * statistics.median(times), 4)

    return {"commit": p50(lambda: commit(out)), "receipt": p50(receipt), "codec": p50(codec)}


def _compiled(
    span: Any,
    step: Callable[[], torch.Tensor],
    steps: int,
    reference: torch.Tensor,
    sync: Callable[[], None],
) -> dict[str, Any]:
    """torch.compile each block's MLP and norms (see the module): compile seconds, p50 ms
    per step, and how far the output moves from the eager one. Restores the eager modules."""
    names = ("mlp", "input_layernorm", "post_attention_layernorm")
    eager = [{name: getattr(layer, name) for name in names} for layer in span.layers]
    lean, span.fast_decode = span.fast_decode, False  # the path that calls these modules
    try:
        for layer in span.layers:
            for name in names:
                setattr(layer, name, torch.compile(getattr(layer, name), dynamic=False))
        t0 = time.perf_counter()
        out = step()
        sync()
        compile_s = time.perf_counter() - t0
        times, cpu_times = [], []
        for _ in range(steps):
            t1, c1 = time.perf_counter(), time.thread_time()
            out = step()
            sync()
            times.append(time.perf_counter() - t1)
            cpu_times.append(time.thread_time() - c1)
    finally:
        span.fast_decode = lean
        for layer, modules in zip(span.layers, eager, strict=True):
            for name, module in modules.items():
                setattr(layer, name, module)
    return {
        "compile_s": round(compile_s, 1),
        "ms_per_step_p50": round(1000.0 * statistics.median(times), 3),
        "cpu_ms_per_step_p50": round(1000.0 * statistics.median(cpu_times), 3),
        "identical": bool(torch.equal(out, reference)),
        "max_abs_diff": float((out.float() - reference.float()).abs().max()),
    }

"""Benchmark: the whole model decoding in one process, per weight form, against llama.cpp.

``layerchain bench compute --json`` prints ``{"rows": [...], "ratio_vs_llamacpp", ...}``: one
row per (runtime, dtype, threads) with the decode time per token, the rate and the bytes of
weights held (span + head), and ``ratio_vs_llamacpp`` = the best layerchain ms/token over
llama.cpp's at the same thread count (the issue's target: <= 1.5). llama.cpp runs through
``llama-cpp-python`` (the optional ``bench`` extra) on the same GGUF file, the same prompt
tokens and the same threads; without it the row is left out, ``ratio_vs_llamacpp`` is null
and ``note`` says how to install it.

Decode time: greedy, a fixed prompt, ``tokens`` steps after the prefill, each step the whole
of what a client and its nodes do for one token in one process (embed, every block, final
norm + LM head, argmax); the best of ``repeats`` runs, since the machine is shared.

Agreement (``agreement_with_fp32``): on each of ``PROMPTS``, fp32 decodes ``AGREEMENT_TOKENS``
greedy tokens; each form then reads the prompt plus that continuation in one pass and scores
the fraction of positions where its own greedy choice is fp32's token (teacher-forced: one early
difference does not count every later token as a miss). ``quant.AGREEMENT_FLOOR`` and
``quant.AUTO_DTYPE`` were set from these figures (docs/BENCHMARKS.md "Compact weights").
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from layerchain.model.spec import DEFAULT_MODEL, ModelSpec

PROMPTS = (  # the fixed prompt set of the agreement figure (chat template applied)
    "What is the capital of France?",
    "Write a short story about a lighthouse keeper.",
    "Explain how a rainbow forms, in two sentences.",
    "List three uses of a paperclip.",
    "Translate 'good morning, my friend' into Spanish.",
    "What is 17 times 23? Show your steps.",
    "Write a haiku about autumn leaves.",
    "Give me a recipe for a simple tomato soup.",
)
AGREEMENT_TOKENS = 32  # greedy tokens per prompt in the agreement figure
TIMING_PROMPT = PROMPTS[1]
LAYERCHAIN_DTYPES = (
    "fp32",
    "bf16",
    "int8",
    "int4",
)  # forms timed by default (fp16: no fast CPU path)
INSTALL_NOTE = (
    "llama.cpp row omitted: llama-cpp-python is not installed; install it with "
    "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install -e '.[bench]' (builds llama.cpp, minutes)"
)


@dataclass(frozen=True)
class ComputeRow:
    """One runtime at one weight form and thread count."""

    runtime: str  # "layerchain" | "llama.cpp" (--baseline: "layerchain-python", "-unfused")
    dtype: str  # layerchain: quant.DTYPES; llama.cpp: the GGUF file's type, e.g. "Q4_1"
    threads: int
    ms_per_token: float  # wall time per decode step, best of the runs
    cpu_ms_per_token: float  # the process's CPU time per decode step, best of the runs
    weights_mb: float  # bytes of weights held / 1e6 (llama.cpp: the file's tensor bytes)
    agreement: float | None  # agreement_with_fp32 (None: not measured)

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.ms_per_token if self.ms_per_token > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "dtype": self.dtype,
            "threads": self.threads,
            "ms_per_token": round(self.ms_per_token, 3),
            "cpu_ms_per_token": round(self.cpu_ms_per_token, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "weights_mb": round(self.weights_mb, 1),
            "agreement": None if self.agreement is None else round(self.agreement, 4),
        }


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (compact forms keep weights in buffers),
    plus the kernels' own packed copies (``packed_bytes``: the FBGEMM head's)."""
    tensors = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    return tensors + sum(int(getattr(m, "packed_bytes", 0)) for m in module.modules())


def prompt_ids(spec: ModelSpec, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids, chat template applied (the tokenizer loaded once)."""
    from layerchain.model.tokenizer import encode_prompt, load_tokenizer

    tokenizer = load_tokenizer(spec)
    return [list(encode_prompt(tokenizer, p)) for p in prompts]


def greedy_continuation(model: Any, ids: Sequence[int], tokens: int) -> list[int]:
    """``tokens`` greedy ids after ``ids`` (EOS not special), with ``model.span`` and ``.head``."""
    span, head = model.span, model.head
    cache = span.new_cache(max_length=len(ids) + tokens)
    out: list[int] = []
    with torch.inference_mode():
        x = head.embed(torch.tensor([list(ids)]))
        for _ in range(tokens):
            token = int(head.logits(span(x, cache)[:, -1:])[0, -1].argmax())
            out.append(token)
            x = head.embed(torch.tensor([[token]]))
    return out


def teacher_forced_agreement(model: Any, ids: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of ``reference`` (a greedy continuation of ``ids``) that ``model`` picks
    greedily at each position, reading ``ids + reference[:-1]`` in one pass."""
    seq = [*ids, *reference[:-1]]
    with torch.inference_mode():
        hidden = model.span(model.head.embed(torch.tensor([seq])), model.span.new_cache())
        picks = model.head.logits(hidden[:, len(ids) - 1 :])[0].argmax(dim=-1)  # [len(ref)]
    return float((picks == torch.tensor(list(reference))).float().mean())


def agreement_with_fp32(
    spec: ModelSpec,
    dtypes: Sequence[str],
    tokens: int = AGREEMENT_TOKENS,
    prompts: Sequence[str] = PROMPTS,
) -> dict[str, float]:
    """dtype -> fraction of fp32's greedy tokens it reproduces over ``prompts``."""
    from layerchain.model.generate import LocalModel

    reference_model = LocalModel(spec)
    encoded = prompt_ids(spec, prompts)
    references = [greedy_continuation(reference_model, ids, tokens) for ids in encoded]
    del reference_model
    result = {}
    for dtype in dtypes:
        model = LocalModel(spec, dtype=dtype)
        scores = [
            teacher_forced_agreement(model, i, r) for i, r in zip(encoded, references, strict=True)
        ]
        result[dtype] = sum(scores) / len(scores)
    return result


def time_decode(
    prefill: Callable[[], int], step: Callable[[int], int], tokens: int, repeats: int
) -> tuple[float, float]:
    """(wall, CPU) ms per decode step, each the best of ``repeats`` runs of ``prefill()`` then
    ``tokens`` calls of ``step(token) -> next token``. CPU time is the process's (all its
    threads): on a shared machine it shows the work done, which waiting for a core does not."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        token = prefill()
        wall_started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(tokens):
            token = step(token)
        wall = min(wall, (time.perf_counter() - wall_started) * 1000 / tokens)
        cpu = min(cpu, (time.process_time() - cpu_started) * 1000 / tokens)
    return wall, cpu


def layerchain_timing(
    model: Any, ids: Sequence[int], tokens: int, repeats: int
) -> tuple[float, float]:
    """``time_decode`` of greedy steps through ``model.span`` and ``model.head``."""
    span, head = model.span, model.head
    cache = span.new_cache(max_length=len(ids) + tokens + 1)

    def prefill() -> int:
        cache.truncate(0)
        hidden = span(head.embed(torch.tensor([list(ids)])), cache)
        return int(head.logits(hidden[:, -1:])[0, -1].argmax())

    def step(token: int) -> int:
        hidden = span(head.embed(torch.tensor([[token]])), cache)
        return int(head.logits(hidden[:, -1:])[0, -1].argmax())

    with torch.inference_mode():
        return time_decode(prefill, step, tokens, repeats)


@contextmanager
def baseline_variant(model: Any, runtime: str) -> Iterator[None]:
    """``model`` computing as ``runtime`` says: "layerchain" as it is, "layerchain-python"
    with the native decode path off (the same bits from Python's torch calls),
    "layerchain-unfused" as before the fused kernels (``unfused``). Restored on exit."""
    if runtime == "layerchain-unfused":
        with unfused(model):
            yield
        return
    native = model.span.native_decode
    model.span.native_decode = native and runtime == "layerchain"
    try:
        yield
    finally:
        model.span.native_decode = native


@contextmanager
def unfused(model: Any) -> Iterator[None]:
    """``model`` (``.span``, ``.head``) as it computed before the fused kernels, for the
    ``--baseline`` rows: each q/k/v and gate/up linear called on its own (the span's
    ``FusedLinears`` set aside) and the LM head's exact int8 kernel over every row (a
    ``RescoredInt8Linear``'s ``Int8Linear`` forward). Restored on exit."""
    from layerchain.model.quant import FUSED, Int8Linear, RescoredInt8Linear

    set_aside = []
    for owner in model.span.modules():
        for name in FUSED:
            if name in owner._modules:
                set_aside.append((owner, name, owner._modules.pop(name)))
    head = model.head
    projection = head.projection
    if isinstance(projection, RescoredInt8Linear):
        head.projection = Int8Linear(projection.codes, projection.scales, projection.bias)
    try:
        yield
    finally:
        for owner, name, module in set_aside:
            owner._modules[name] = module
        head.projection = projection


def llamacpp_row(
    spec: ModelSpec, ids: Sequence[int], tokens: int, threads: int, repeats: int
) -> ComputeRow | None:
    """llama.cpp on ``spec``'s GGUF file, the same prompt ids and greedy steps; None when
    llama-cpp-python is not installed (or the model is not a GGUF file)."""
    try:  # the optional bench extra (no type information)
        llama_cpp: Any = importlib.import_module("llama_cpp")
    except ImportError:
        return None
    if spec.kind != "gguf":
        return None
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(spec.path),
        n_ctx=len(ids) + tokens + 8,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    vocab = llm.n_vocab()

    def last_argmax() -> int:  # the last evaluated token's logits (not kept in llm.scores)
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    def prefill() -> int:
        llm.reset()
        llm.eval(list(ids))
        return last_argmax()

    def step(token: int) -> int:
        llm.eval([token])
        return last_argmax()

    wall, cpu = time_decode(prefill, step, tokens, repeats)
    from gguf import GGMLQuantizationType

    from layerchain.model.gguf_file import GGUFFile

    tensors = GGUFFile(spec.path).tensors
    weights = sum(t.nbytes for t in tensors)
    kinds = {
        GGMLQuantizationType(t.ggml_type).name
        for t in tensors
        if t.name.startswith("blk.") and len(t.shape) == 2
    }
    llm.close()
    kind = "/".join(sorted(kinds)) or "gguf"
    return ComputeRow("llama.cpp", kind, threads, wall, cpu, weights / 1e6, None)


def bench_compute(
    model: str = DEFAULT_MODEL,
    dtypes: Sequence[str] = LAYERCHAIN_DTYPES,
    threads: Sequence[int] = (1,),
    tokens: int = 32,
    repeats: int = 3,
    agreement: bool = True,
    baseline: bool = False,
) -> dict[str, Any]:
    """The ``bench compute`` report (see the module docstring). ``baseline``: each int4/int8
    form is also timed ``unfused`` (runtime "layerchain-unfused", not in the ratios), and each
    form with a native decode path without it ("layerchain-python", not in the ratios), their
    runs alternating with the form's own on the same loaded model, so load drifts hit all."""
    from layerchain.model.generate import LocalModel
    from layerchain.model.native_step import applies as native_applies
    from layerchain.model.quant import check_dtype, resolve_dtype
    from layerchain.model.resolve import resolve_model

    spec = resolve_model(model)
    forms = [resolve_dtype(check_dtype(d), "cpu") for d in dtypes]
    [ids] = prompt_ids(spec, [TIMING_PROMPT])
    agreed = agreement_with_fp32(spec, forms) if agreement else {}
    rows: list[ComputeRow] = []
    previous_threads = torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            for form in forms:
                local = LocalModel(spec, dtype=form)
                weights = module_bytes(local.span) + module_bytes(local.head)
                variants = ["layerchain"]
                if baseline and native_applies(local.span):  # its steps run in C++
                    variants.append("layerchain-python")
                if baseline and form in ("int4", "int8"):
                    variants.append("layerchain-unfused")
                fastest = {v: (float("inf"), float("inf")) for v in variants}
                for _ in range(repeats):  # alternating, so all see the same machine
                    for variant in variants:
                        with baseline_variant(local, variant):
                            timed = layerchain_timing(local, ids, tokens, 1)
                        wall, cpu = fastest[variant]
                        fastest[variant] = (min(wall, timed[0]), min(cpu, timed[1]))
                for runtime, (wall, cpu) in fastest.items():
                    plain = runtime == "layerchain-unfused"
                    packed = sum(int(getattr(m, "packed_bytes", 0)) for m in local.head.modules())
                    held = weights - packed if plain else weights  # unfused: no FBGEMM copy
                    rows.append(ComputeRow(
                        runtime, form, count, wall, cpu, held / 1e6, agreed.get(form)
                    ))
                del local
            reference = llamacpp_row(spec, ids, tokens, count, repeats)
            if reference is not None:
                rows.append(reference)
    finally:
        torch.set_num_threads(previous_threads)
    ratios: dict[str, float] = {}  # threads -> best layerchain ms / llama.cpp ms (wall)
    cpu_ratios: dict[str, float] = {}  # the same on CPU time
    for count in threads:
        ours = [r for r in rows if r.runtime == "layerchain" and r.threads == count]
        theirs = [r for r in rows if r.runtime == "llama.cpp" and r.threads == count]
        if ours and theirs:
            best = min(ours, key=lambda r: r.ms_per_token)
            ratios[str(count)] = round(best.ms_per_token / theirs[0].ms_per_token, 3)
            best_cpu = min(r.cpu_ms_per_token for r in ours)
            cpu_ratios[str(count)] = round(best_cpu / theirs[0].cpu_ms_per_token, 3)
    has_llamacpp = any(r.runtime == "llama.cpp" for r in rows)
    return {
        "model": spec.name,
        "tokens": tokens,
        "prompts": len(PROMPTS) if agreement else 0,
        "rows": [r.to_json() for r in rows],
        "ratio_vs_llamacpp": ratios.get(str(threads[0])),  # at the first thread count
        "ratio_vs_llamacpp_by_threads": ratios,
        "cpu_ratio_vs_llamacpp_by_threads": cpu_ratios,
        "note": None if has_llamacpp else INSTALL_NOTE,
    }

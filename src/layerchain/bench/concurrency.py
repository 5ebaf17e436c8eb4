"""Benchmark: N concurrent greedy streams through one local swarm (issue 16).

One local swarm (``local.swarm_up``, started once) serves every point. One client process
runs the N streams of a point as N asyncio tasks on one ``AsyncSwarm`` (the client's event
loop, through ``Swarm.run``): each task iterates its own ``Generation`` with its own prompt,
so the N sessions are open on every hop at once and their decode steps reach the nodes
together. The client's own compute (embedding, LM head, sampling) of all N streams runs on
that one loop thread; the LM heads of rows that come back in the same loop turn run as one
(``client.heads``). ``client_busy`` is the sum of the streams' client compute over the
point's wall time (a batched head counts once per stream in it: an upper bound);
``head_busy`` the share of the wall time the loop spent in head calls, counted once;
``head_batches`` the head calls made for several streams. ``nodes_cpu_ms_per_token`` (each
node process with its children, in the order of its span) and ``client_cpu_ms_per_token``
(this process): CPU time over the point / its tokens, where the cores went (a figure the
wall time hides on a shared machine).

Per point: ``aggregate_tokens_per_s`` = tokens of all streams / wall time from the moment
the N requests start to the end of the last; ``ttft_s`` = first token - start, per stream
(p50, p99 over streams); ``itl_ms`` = inter-token latency, the gaps between consecutive
tokens of a stream (p50, p99 over every gap of every stream). Stream ``i`` decodes
``PROMPTS[i % len(PROMPTS)]``, so a prompt's tokens can be compared across points:
``identical_tokens`` says whether every stream of a prompt gave the tokens it gave at the
smallest concurrency that ran it (at concurrency 1: one stream alone).

The arithmetic (``percentile``, ``measure_point``) is pure, tested with literals.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import even_spans

if TYPE_CHECKING:
    from layerchain.client import AsyncSwarm

PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Name three rivers in Europe and describe one.",
    "What is the capital of France, and why is it famous?",
    "Give me a recipe for a simple tomato soup.",
    "Describe the water cycle to a ten-year-old.",
    "Why is the sky blue?",
    "List some tips for learning a new language.",
)


@dataclass(frozen=True)
class StreamRun:
    """One stream of a point: its prompt, tokens, and when each token arrived."""

    prompt: str
    token_ids: tuple[int, ...]
    arrivals_s: tuple[float, ...]  # each token's arrival, s after the point's start
    client_ms: tuple[float, ...] = ()  # the client's compute of each decode step, ms
    node_ms: tuple[float, ...] = ()  # the nodes' compute of each decode step (all hops), ms


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated between the
    closest ranks (numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def gaps_ms(arrivals_s: Sequence[float]) -> list[float]:
    """Inter-token latencies of one stream, ms."""
    return [1000.0 * (b - a) for a, b in zip(arrivals_s, arrivals_s[1:])]


def measure_point(concurrency: int, runs: Sequence[StreamRun], wall_s: float) -> dict:
    """One point of the bench from its streams and its wall time (s)."""
    tokens = sum(len(r.arrivals_s) for r in runs)
    ttfts = [r.arrivals_s[0] for r in runs if r.arrivals_s]
    itls = [g for r in runs for g in gaps_ms(r.arrivals_s)]
    client = [ms for r in runs for ms in r.client_ms]
    nodes = [ms for r in runs for ms in r.node_ms]
    return {
        "concurrency": concurrency,
        "aggregate_tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        "ttft_s_p50": round(percentile(ttfts, 50), 3),
        "ttft_s_p99": round(percentile(ttfts, 99), 3),
        "itl_ms_p50": round(percentile(itls, 50), 2),
        "itl_ms_p99": round(percentile(itls, 99), 2),
        "tokens": tokens,
        "wall_s": round(wall_s, 3),
        "client_compute_ms_p50": round(percentile(client, 50), 2),
        "node_compute_ms_p50": round(percentile(nodes, 50), 2),
        # the streams' client compute over the wall time (a batched head counts per stream)
        "client_busy": round(sum(client) / 1000.0 / wall_s, 3) if wall_s > 0 else 0.0,
    }


def cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU time (user + system) of process ``pid`` (with its children, the live ones), s;
    0.0 if it is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *(proc.children(recursive=True) if children else ())]
    except psutil.Error:
        return 0.0
    total = 0.0
    for each in procs:
        try:
            times = each.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def cpu_ms_per_token(before: Sequence[float], after: Sequence[float], tokens: int) -> list[float]:
    """Each process's CPU time between two readings (s) per token, ms."""
    return [round(1000.0 * (b - a) / tokens, 1) if tokens else 0.0
            for a, b in zip(before, after, strict=True)]


def identical_tokens(points: Sequence[Sequence[StreamRun]]) -> bool:
    """Whether every stream of a prompt gave the tokens the first stream of that prompt gave
    (``points`` in order of concurrency)."""
    first: dict[str, tuple[int, ...]] = {}
    same = True
    for runs in points:
        for r in runs:
            same &= first.setdefault(r.prompt, r.token_ids) == r.token_ids
    return same


async def run_streams(
    core: AsyncSwarm, prompts: Sequence[str], max_new_tokens: int
) -> tuple[list[StreamRun], float]:
    """Decode ``prompts`` greedily at once, one task each; their runs and the wall time (s)."""
    from layerchain.model import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens)  # greedy, stop strings off

    async def one(prompt: str) -> StreamRun:
        arrivals: list[float] = []
        gen = core.generate_stream(prompt, params)
        async for _ in gen:
            arrivals.append(time.perf_counter() - t0)
        res = gen.result
        steps = res.timings[1:]  # the first step is the prompt's (prefill)
        return StreamRun(prompt, tuple(res.token_ids), tuple(arrivals),
                         tuple(t.client_ms for t in steps), tuple(t.nodes_ms for t in steps))

    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one(p) for p in prompts))
    return list(runs), time.perf_counter() - t0


def stream_prompts(n: int) -> list[str]:
    """The prompts of ``n`` concurrent streams: stream ``i`` decodes ``PROMPTS[i % 8]``."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def measure_concurrency(
    initial_peers: Sequence[str], levels: Sequence[int], *, model: str = DEFAULT_MODEL,
    max_new_tokens: int = 32, insecure: bool = False, warmup_tokens: int = 4,
    node_pids: Sequence[int] = (),
) -> tuple[list[dict], list[list[StreamRun]]]:
    """Every point of ``levels`` on the swarm at ``initial_peers``, one client for all,
    after a warm-up of max(levels) streams of ``warmup_tokens`` (0: none): the points and
    the runs. The CPU time of ``node_pids`` (local node processes) is read around each point."""
    from layerchain.client import Swarm

    points, all_runs = [], []
    with Swarm(initial_peers, model=model, insecure=insecure) as client:
        if warmup_tokens > 0:  # connections, sessions' first steps, the nodes' batchers
            client.run(run_streams(client.core, stream_prompts(max(levels)), warmup_tokens))
        heads = client.core.heads  # client.heads: the streams' LM heads
        for n in levels:
            batches, seconds = heads.batches, heads.seconds
            cpu0 = [cpu_seconds(os.getpid(), False), *map(cpu_seconds, node_pids)]
            runs, wall = client.run(run_streams(client.core, stream_prompts(n), max_new_tokens))
            cpu1 = [cpu_seconds(os.getpid(), False), *map(cpu_seconds, node_pids)]
            point = measure_point(n, runs, wall)
            per_token = cpu_ms_per_token(cpu0, cpu1, point["tokens"])
            points.append({
                **point,
                # head calls for several streams at once; share of the wall in head calls
                "head_batches": heads.batches - batches,
                "head_busy": round((heads.seconds - seconds) / wall, 3) if wall > 0 else 0.0,
                "client_cpu_ms_per_token": per_token[0],
                "nodes_cpu_ms_per_token": per_token[1:],
            })
            all_runs.append(runs)
    return points, all_runs


def parse_levels(text: str) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8]; ValueError unless every level is a positive integer."""
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise ValueError(f"concurrency levels must be positive integers, got {text!r}")
    return levels


def run_concurrency_bench(
    levels: Sequence[int] = (1, 2, 4, 8), *, model: str = DEFAULT_MODEL, nodes: int = 3,
    max_new_tokens: int = 32, threads: int | None = None, insecure: bool = False,
    batch_window_ms: float | None = None,
) -> dict:
    """All points on one fresh local swarm of ``nodes`` processes (TLS; plaintext with
    ``insecure``), every process with ``threads`` torch threads (None: the cores shared by
    the nodes and the client, as ``swarm_up``),
    the nodes batching decode steps with ``batch_window_ms`` (None: their default; 0: off)."""
    import torch

    from layerchain.local import swarm_down, swarm_up
    from layerchain.local.launcher import shared_threads
    from layerchain.model import resolve_model

    threads = threads or shared_threads(nodes + 1)
    torch.set_num_threads(threads)
    spans = even_spans(resolve_model(model).num_blocks, nodes)
    state = Path(tempfile.mkdtemp(prefix="layerchain-bench-conc-"))
    try:
        node_args = None if batch_window_ms is None else \
            [["--batch-window-ms", str(batch_window_ms)]] * len(spans)
        local = swarm_up(state, spans, model=model, threads=threads, insecure=insecure,
                         node_args=node_args)
        points, runs = measure_concurrency(local.initial_peers, levels, model=model,
                                           max_new_tokens=max_new_tokens, insecure=insecure,
                                           node_pids=[node["pid"] for node in local.nodes])
    finally:
        swarm_down(state, quiet=True)
        shutil.rmtree(state, ignore_errors=True)
    return {
        "points": points,
        "identical_tokens": identical_tokens(runs),
        "nodes": nodes,
        "hops": len(spans),
        "threads": threads,
        "max_new_tokens": max_new_tokens,
        "transport": "tcp" if insecure else "tls",
        "client": "one process, N asyncio tasks on one AsyncSwarm",
        "batch_window_ms": batch_window_ms,
        "load_avg_1m": round(_load(), 2),
    }


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0

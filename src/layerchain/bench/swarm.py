"""Benchmark: the same model decoding in one process and through a local swarm, side by side.

Both runs use the same torch thread count, the same prompt and greedy decoding, so the
ratio ``swarm_tps / single_process_tps`` isolates what the network adds. Per-token times
are measured for both; ``hop_overhead_ms_p50`` is the difference of their medians divided
by the number of hops: the time each hop adds to a decode step.

The swarm's decode tokens are also split (``split_figures``, from the generation's
``timings``, ``layerchain.client.timing``): the client's own compute (embedding, head,
sampling), the nodes' compute (each hop's ``StepResult.compute_ms``, summed over hops) and
what is left, per hop: the wire (codec, TLS, sockets, event-loop turns, the OS scheduler).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import even_spans

if TYPE_CHECKING:
    from layerchain.client.timing import TokenTiming

PROMPT = "Write a short story about a lighthouse keeper."


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def split_figures(timings: list[TokenTiming] | tuple[TokenTiming, ...], hops: int) -> dict:
    """Medians over decode tokens (``timings`` without the prompt's step), ms: the nodes'
    compute (all hops), the client's, the wire per hop ((token - client - nodes) / hops);
    and, to tell the wire from the client's loop, the wire inside the route's wall time per
    hop ((route - nodes) / hops) and the client's time outside both (token - client - route:
    the stream's consumer, a ``Swarm.stream`` hand-over to another thread and back)."""
    per_hop = max(1, hops)
    return {
        "node_compute_ms_p50": round(_p50([t.nodes_ms for t in timings]), 3),
        "client_compute_ms_p50": round(_p50([t.client_ms for t in timings]), 3),
        "wire_ms_per_hop_p50": round(_p50([t.wire_ms(hops) for t in timings]), 3),
        "route_wire_ms_per_hop_p50": round(
            _p50([(t.route_ms - t.nodes_ms) / per_hop for t in timings]), 3),
        "client_loop_ms_p50": round(
            _p50([t.token_ms - t.client_ms - t.route_ms for t in timings]), 3),
    }


def local_token_times(model: str, max_new_tokens: int, threads: int) -> tuple[list[float], list[int]]:
    """Greedy decode in this process through one span [0, L); seconds per decode token."""
    from layerchain.model import encode_prompt, load_head, load_span, load_tokenizer, resolve_model

    torch.set_num_threads(threads)
    spec = resolve_model(model)
    span, head, tok = load_span(spec, 0, spec.num_blocks), load_head(spec), load_tokenizer(spec)
    ids = encode_prompt(tok, PROMPT)
    cache = span.new_cache()
    times, tokens = [], []
    with torch.inference_mode():
        x = head.embed(torch.tensor([ids]))
        for _ in range(max_new_tokens):
            t0 = time.perf_counter()
            hidden = span.forward(x, cache)
            token = int(head.logits(hidden[:, -1:])[0, -1].argmax())
            x = head.embed(torch.tensor([[token]]))
            times.append(time.perf_counter() - t0)
            tokens.append(token)
    return times[1:], tokens  # the first step is the prefill


def swarm_token_times(
    model: str, nodes: int, max_new_tokens: int, threads: int, insecure: bool = False
) -> tuple[list[float], list[int], float, int, tuple[TokenTiming, ...]]:
    """Greedy decode through a fresh local swarm (TLS; plaintext with ``insecure``);
    seconds per decode token, ttft, hops, the decode tokens' timings (client.timing)."""
    from layerchain.client import Swarm
    from layerchain.local import swarm_down, swarm_up
    from layerchain.model import SamplingParams, resolve_model

    torch.set_num_threads(threads)
    spec = resolve_model(model)
    state = Path(tempfile.mkdtemp(prefix="layerchain-bench-"))
    try:
        local = swarm_up(state, even_spans(spec.num_blocks, nodes), model=model, threads=threads,
                         insecure=insecure)
        with Swarm(local.initial_peers, model=model, insecure=insecure) as client:
            stamps: list[float] = []
            # stop strings off, EOS honoured: same tokens as the local loop until EOS
            params = SamplingParams(max_new_tokens=max_new_tokens)
            client.generate("warm up", SamplingParams(max_new_tokens=4))
            gen = client.stream(PROMPT, params)
            for _ in gen:
                stamps.append(time.perf_counter())
        res = gen.result
        times = [b - a for a, b in zip(stamps, stamps[1:])]
        return times, list(res.token_ids), res.ttft_s, len(res.route), res.timings[1:]
    finally:
        swarm_down(state, quiet=True)


def run_swarm_bench(model: str = DEFAULT_MODEL, nodes: int = 3, max_new_tokens: int = 64,
                    threads: int | None = None, insecure: bool = False) -> dict:
    """Single process vs a local swarm; the swarm's links are TLS, plaintext with
    ``insecure`` (``transport`` in the result says which). ``threads`` torch threads in
    every process (None: the cores shared by the nodes and the client, as ``swarm_up``)."""
    from layerchain.local.launcher import shared_threads

    threads = threads or shared_threads(nodes + 1)
    # In a thread that then ends: its OpenMP team goes with it, and the swarm client's decode
    # loop (on its own thread) does not pay for a second live team (see layerchain.node.server).
    with ThreadPoolExecutor(1) as pool:
        local_times, local_tokens = pool.submit(
            local_token_times, model, max_new_tokens, threads).result()
    swarm_times, swarm_tokens, ttft, hops, timings = swarm_token_times(
        model, nodes, max_new_tokens, threads, insecure)
    single_tps = 1.0 / _p50(local_times)
    swarm_tps = 1.0 / _p50(swarm_times)
    n = min(len(local_tokens), len(swarm_tokens))
    return {
        "single_process_tps": round(single_tps, 2),
        "swarm_tps": round(swarm_tps, 2),
        "ratio": round(swarm_tps / single_tps, 3),
        "hop_overhead_ms_p50": round(1000 * (_p50(swarm_times) - _p50(local_times)) / hops, 3),
        "ttft_s": round(ttft, 3),
        "threads": threads,
        "nodes": nodes,
        "hops": hops,
        "tokens": len(swarm_times) + 1,
        "identical_tokens": local_tokens[:n] == swarm_tokens[:n],
        "transport": "tcp" if insecure else "tls",
        **split_figures(timings, hops),
    }

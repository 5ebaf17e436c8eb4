"""Benchmark: route planning time over random swarms (target: p50 <= 50 ms for 10,000
peers x 80 blocks, DESIGN.md "Targets").

The swarms are seeded, so runs are comparable. Each has a backbone of peers tiling the
blocks (so a route exists) and otherwise peers with a random span of 1 to blocks/4 blocks,
compute of 0.2-20 ms per block (log-uniform: laptops to GPUs), RTT 0.2-150 ms
(log-uniform: LAN to another continent) and a price of 0-2 credits per block. Only the
planning call is timed, not building the snapshot.
"""

from __future__ import annotations

import math
import random
import time

from layerchain.routing import RoutePeer, plan_route


def random_swarm(num_peers: int, num_blocks: int, seed: int) -> list[RoutePeer]:
    """A random swarm of ``num_peers`` peers over ``num_blocks`` blocks that has a route."""
    rng = random.Random(seed)

    def log_uniform(low: float, high: float) -> float:
        return math.exp(rng.uniform(math.log(low), math.log(high)))

    def peer(i: int, start: int, end: int) -> RoutePeer:
        return RoutePeer(f"peer{i}", start, end, log_uniform(0.2, 20.0),
                         rng.uniform(0.0, 2.0), log_uniform(0.2, 150.0))

    width = max(1, num_blocks // 4)
    backbone = list(range(0, num_blocks, width)) + [num_blocks]
    peers = [peer(i, a, b) for i, (a, b) in enumerate(zip(backbone, backbone[1:]))]
    for i in range(len(peers), num_peers):
        length = rng.randint(1, width)
        start = rng.randint(0, num_blocks - length)
        peers.append(peer(i, start, start + length))
    return peers


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def run_routing_bench(
    peers: int,
    blocks: int,
    trials: int,
    *,
    alpha: float = 0.5,
    limits: bool = False,
    seed: int = 0,
) -> dict:
    """Plan once over each of ``trials`` random swarms; time each ``plan_route`` call.

    With ``limits``, each call also gets ``max_price`` and ``max_latency_ms`` from a
    reference route planned with a price-heavier alpha (its price, and its latency plus
    10%): the limits can be met, and the price limit binds, so the exact constrained
    search runs (the reference plan is not timed)."""
    times_ms: list[float] = []
    hops: list[int] = []
    for trial in range(trials):
        swarm = random_swarm(peers, blocks, seed + trial)
        max_price = max_latency_ms = None
        if limits:
            reference = plan_route(swarm, blocks, (1 + alpha) / 2)
            max_price, max_latency_ms = reference.price, reference.latency_ms * 1.1
        began = time.perf_counter()
        plan = plan_route(swarm, blocks, alpha, max_price, max_latency_ms)
        times_ms.append((time.perf_counter() - began) * 1000)
        hops.append(len(plan.hops))
    return {
        "plan_ms_p50": round(_percentile(times_ms, 0.5), 3),
        "plan_ms_p99": round(_percentile(times_ms, 0.99), 3),
        "peers": peers,
        "blocks": blocks,
        "trials": trials,
        "alpha": alpha,
        "limits": limits,
        "mean_hops": round(sum(hops) / max(1, len(hops)), 2),
    }

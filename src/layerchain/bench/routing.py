"""Benchmark: route planning time over random swarms (target: p50 <= 50 ms for 10,000
peers x 80 blocks, DESIGN.md "Targets").

The swarms are seeded, so runs are comparable. Each has a backbone of peers tiling the
blocks (so a route exists) and otherwise peers with a random span of 1 to blocks/4 blocks,
compute of 0.2-20 ms per block (log-uniform: laptops to GPUs), RTT 0.2-150 ms
(log-uniform: LAN to another continent) and a price of 0-2 credits per block. Only the
planning call is timed, not building the snapshot. ``run_routing_cases`` times every
case of ``CASES`` (alpha 0, 0.5, 1; binding price; binding latency; both).
"""

from __future__ import annotations

import math
import random
import time

from layerchain.routing import RouteLimits, RoutePeer, plan_route


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


#: What ``limits`` may name: which limits bind, each taken from a reference route planned
#: at another alpha over the same swarm (so they can be met, and bind).
LIMITS = ("none", "price", "latency", "both")

#: The cases ``bench routing`` reports: (name, alpha, limits).
CASES = (
    ("alpha 0", 0.0, "none"),
    ("alpha 0.5", 0.5, "none"),
    ("alpha 1", 1.0, "none"),
    ("binding price", 0.0, "price"),
    ("binding latency", 1.0, "latency"),
    ("binding price and latency", 0.5, "both"),
)

#: Target of DESIGN.md "Targets": p50 planning time at 10,000 peers x 80 blocks, ms.
TARGET_MS = 50.0


def _limits_for(swarm: list[RoutePeer], blocks: int, alpha: float, limits: str
                ) -> tuple[float | None, float | None]:
    """``(max_price, max_latency_ms)`` for a case: "price": the price of the alpha-0.5
    route (binds the fastest route); "latency": that route's latency (binds the cheapest);
    "both": the price of the route at ``(1 + alpha) / 2`` and its latency plus 10%."""
    if limits == "none":
        return None, None
    if limits == "both":
        reference = plan_route(swarm, blocks, RouteLimits((1 + alpha) / 2))
        return reference.price, reference.latency_ms * 1.1
    reference = plan_route(swarm, blocks, RouteLimits(0.5))
    if limits == "price":
        return reference.price, None
    return None, reference.latency_ms


def run_routing_bench(
    peers: int,
    blocks: int,
    trials: int,
    *,
    alpha: float = 0.5,
    limits: bool | str = False,
    seed: int = 0,
) -> dict:
    """Plan once over each of ``trials`` random swarms; time each ``plan_route`` call.

    ``limits`` (one of ``LIMITS``; True means "both", False "none") adds ``max_price``
    and/or ``max_latency_ms`` from a reference route over the same swarm (see
    ``_limits_for``; the reference plan is not timed): they can be met and they bind, so
    the constrained search runs."""
    kind = "both" if limits is True else "none" if limits is False else limits
    if kind not in LIMITS:
        raise ValueError(f"limits must be one of {', '.join(LIMITS)}, not {limits!r}")
    times_ms: list[float] = []
    cpu_ms: list[float] = []  # this process's CPU time: steadier than wall time on a shared host
    hops: list[int] = []
    for trial in range(trials):
        swarm = random_swarm(peers, blocks, seed + trial)
        max_price, max_latency_ms = _limits_for(swarm, blocks, alpha, kind)
        limit = RouteLimits(alpha, max_price, max_latency_ms)
        began, cpu = time.perf_counter(), time.process_time()
        plan = plan_route(swarm, blocks, limit)
        times_ms.append((time.perf_counter() - began) * 1000)
        cpu_ms.append((time.process_time() - cpu) * 1000)
        hops.append(len(plan.hops))
    return {
        "plan_ms_p50": round(_percentile(times_ms, 0.5), 3),
        "plan_ms_p99": round(_percentile(times_ms, 0.99), 3),
        "peers": peers,
        "blocks": blocks,
        "trials": trials,
        "alpha": alpha,
        "limits": limits if isinstance(limits, bool) else kind,
        "mean_hops": round(sum(hops) / max(1, len(hops)), 2),
        "plan_cpu_ms_p50": round(_percentile(cpu_ms, 0.5), 3),
    }


def run_routing_cases(peers: int, blocks: int, trials: int, *, seed: int = 0) -> dict:
    """Every case of ``CASES`` over the same seeded swarms: ``{"cases": [{"case", "alpha",
    "limits", "plan_ms_p50", "plan_ms_p99", "mean_hops", "plan_cpu_ms_p50"}],
    "worst_plan_ms_p50",
    "target_ms_p50", "met"}``, plus the alpha-0.5 case's fields at the top level (the
    keys this command printed before it timed several cases)."""
    cases = []
    for name, alpha, limits in CASES:
        result = run_routing_bench(peers, blocks, trials, alpha=alpha, limits=limits, seed=seed)
        cases.append({"case": name, "alpha": alpha, "limits": limits,
                      "plan_ms_p50": result["plan_ms_p50"],
                      "plan_ms_p99": result["plan_ms_p99"], "mean_hops": result["mean_hops"],
                      "plan_cpu_ms_p50": result["plan_cpu_ms_p50"]})
    base = next(c for c in cases if c["case"] == "alpha 0.5")
    worst = max(c["plan_ms_p50"] for c in cases)
    return {
        "plan_ms_p50": base["plan_ms_p50"],
        "plan_ms_p99": base["plan_ms_p99"],
        "peers": peers,
        "blocks": blocks,
        "trials": trials,
        "alpha": 0.5,
        "limits": False,
        "mean_hops": base["mean_hops"],
        "cases": cases,
        "worst_plan_ms_p50": worst,
        "target_ms_p50": TARGET_MS,
        "met": worst <= TARGET_MS,
    }

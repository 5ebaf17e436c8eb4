"""Benchmark: route planning time over random swarms (target: p50 <= 50 ms for 10,000
peers x 80 blocks, DESIGN.md "Targets").

The swarms are seeded, so runs are comparable. Each has a backbone of peers tiling the
blocks (so a route exists) and otherwise peers with a random span of 1 to blocks/4 blocks,
compute of 0.2-20 ms per block (log-uniform: laptops to GPUs), RTT 0.2-150 ms
(log-uniform: LAN to another continent) and a price of 0-2 credits per block. Only the
planning call is timed, not building the snapshot. ``run_routing_cases`` times every
case of ``CASES`` (alpha 0, 0.5, 1; binding price; binding latency; both), and what a
real client pays per plan (``run_client_bench``: its kept snapshot of the same swarm's
records after a few changes, then the plan over it).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable
from typing import Any

from layerchain.routing import RouteLimits, RoutePeer, plan_route, plan_span


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


#: What changes between two plans of the client case (``run_client_bench``): RTTs
#: measured, one-token steps observed, records re-announced with a new load.
CLIENT_CHANGES = {"rtts": 20, "steps": 8, "records": 4}


def run_client_bench(peers: int, blocks: int, trials: int, *, seed: int = 0,
                     plans: int = 3) -> dict:
    """Snapshot + plan as a client pays them: a ``PeerView`` holding the records of each
    random swarm (same numbers, prices in whole credits) and an RTT for every peer plans
    ``plans`` times at alpha 0.5 (no price cap); before each plan ``CLIENT_CHANGES``
    happen (so the kept snapshot rebuilds those peers) and a session opens on a route
    peer. Times (wall and CPU, ms, p50 over all plans): ``snapshot`` (``snapshot()``),
    ``plan`` (``plan_span`` over it), ``total``; ``first_snapshot`` (a view's first,
    nothing kept) and ``fresh_snapshot`` (``fresh_snapshot()``: 10,000 RoutePeers)."""
    from layerchain.client import ClientConfig
    from layerchain.client.peers import PeerView
    from layerchain.discovery import MemoryDHT, MemoryDiscovery, PeerRecord
    from layerchain.discovery.identity import peer_id_from_public_key
    from layerchain.discovery.records import PeerLoad
    from layerchain.wire import MemoryNetwork, MemoryTransport

    keys = [hashlib.sha256(b"bench-%d" % i).digest() for i in range(peers)]
    ids = [peer_id_from_public_key(key) for key in keys]
    times: dict[str, list[float]] = {}

    def timed(name: str, call: Callable[[], Any]) -> Any:
        began, cpu = time.perf_counter(), time.process_time()
        out = call()
        times.setdefault(name + "_ms", []).append((time.perf_counter() - began) * 1000)
        times.setdefault(name + "_cpu_ms", []).append((time.process_time() - cpu) * 1000)
        return out

    expires = time.time() + 3600
    for trial in range(trials):
        rng = random.Random(seed + trial)
        swarm = random_swarm(peers, blocks, seed + trial)
        view = PeerView(MemoryDiscovery(MemoryDHT()), MemoryTransport(MemoryNetwork()),
                        "bench", blocks, ClientConfig(max_price_multiple=None))
        view.records = {
            ids[i]: PeerRecord(ids[i], keys[i], ("mem://bench",), "bench", p.start, p.end,
                               p.ms_per_block, round(p.price_per_block), 0, "", (), "0",
                               expires)
            for i, p in enumerate(swarm)}
        view.rtt_ms = {ids[i]: p.rtt_ms for i, p in enumerate(swarm)}
        timed("first_snapshot", view.snapshot)
        timed("fresh_snapshot", view.fresh_snapshot)
        for _ in range(plans):
            for i in rng.sample(range(peers), CLIENT_CHANGES["rtts"]):
                view.rtt_ms[ids[i]] *= rng.uniform(0.8, 1.25)
            for i in rng.sample(range(peers), CLIENT_CHANGES["steps"]):
                view.observe_step(ids[i], 1, 1, rng.uniform(0.001, 0.05))
            for i in rng.sample(range(peers), CLIENT_CHANGES["records"]):
                old = view.records[ids[i]]
                view.records[ids[i]] = PeerRecord(
                    old.peer_id, old.public_key, old.endpoints, old.model_id, old.start,
                    old.end, old.ms_per_block, old.price_per_block, 0, "", (), "0", expires,
                    load=PeerLoad(1, rng.uniform(0, 2), rng.uniform(5, 50)))
            began, cpu = time.perf_counter(), time.process_time()
            snap = timed("snapshot", view.snapshot)
            plan = timed("plan", lambda: plan_span(snap, blocks, 0, blocks, RouteLimits(0.5)))
            times.setdefault("total_ms", []).append((time.perf_counter() - began) * 1000)
            times.setdefault("total_cpu_ms", []).append((time.process_time() - cpu) * 1000)
            view.session_opened(plan.peer_ids[0], f"s{trial}")
    out: dict = {"case": "client snapshot + plan", "alpha": 0.5, "limits": "none",
                 "plans": trials * plans, "changes_per_plan": dict(CLIENT_CHANGES)}
    for name in ("snapshot", "plan", "total", "first_snapshot", "fresh_snapshot"):
        out[f"{name}_ms_p50"] = round(_percentile(times[f"{name}_ms"], 0.5), 3)
        out[f"{name}_cpu_ms_p50"] = round(_percentile(times[f"{name}_cpu_ms"], 0.5), 3)
    out["total_ms_p99"] = round(_percentile(times["total_ms"], 0.99), 3)
    return out


def run_routing_cases(peers: int, blocks: int, trials: int, *, seed: int = 0) -> dict:
    """Every case of ``CASES`` over the same seeded swarms: ``{"cases": [{"case", "alpha",
    "limits", "plan_ms_p50", "plan_ms_p99", "mean_hops", "plan_cpu_ms_p50"}],
    "worst_plan_ms_p50",
    "target_ms_p50", "met", "client"}``, plus the alpha-0.5 case's fields at the top level
    (the keys this command printed before it timed several cases). ``"client"`` is
    ``run_client_bench`` (snapshot + plan as a client pays them; not in ``met``)."""
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
        "client": run_client_bench(peers, blocks, trials, seed=seed),
    }

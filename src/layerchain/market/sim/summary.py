"""The simulation's summary: the issue's claims (a)-(e) as numbers, from a ``Trace``.

``summarize(trace)`` returns ``SimSummary``, whose ``to_json()`` is the ``layerchain sim
--json`` object (issue 17's JSON contract, fields exactly)::

    nodes, blocks, rounds
    price_convergence_round   (a) rounds until the price change stays below
                              config.convergence_tol, counted before the churn (the whole
                              run without one); null if it never settles
    final_price_change        (a) the last round's price change: max over blocks of the mean
                              |dp|/p of the block's servers (per layer, no cancellation)
    revenue_vs_cost_spearman  (b) rank correlation of the surviving nodes' compute cost (ms per
                              block) and the revenue clients' routes paid them in the revenue
                              window (the second half of the rounds before the churn: prices
                              settled, swarm whole); the paper predicts it negative; null if
                              either side is constant
    capacity_cv_before        (c) coefficient of variation of per-block capacity with the
    capacity_cv_after             random start spans, and after placement (the round before
                                  the churn; the last round without one)
    throughput_gain           (c) bottleneck (weakest block's tokens/s) after / before; null
                              when a block had no server before (an infinite gain)
    churn_recovery_rounds     (e) rounds after the churn until every block is served and the
                              bottleneck is back to RECOVERY_SHARE of what the survivors'
                              compute allows (the pre-churn bottleneck x the share of compute
                              that survived); null without churn or if it never recovers
    pareto                    (d) [{"alpha", "price", "latency_ms"}] the route the real planner
                              picks for each alpha of PARETO_ALPHAS over one client's candidates
                              in the final swarm (credits and ms per token)
    plots                     the PNG paths (``plots.write_plots``)

``details`` (``details.json`` next to the plots) holds what the docs quote beyond the
contract: the price-vs-cost correlation, revenue per block served, the bottlenecks, the
coverage dip, the dominated routes around the frontier.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from layerchain.errors import NoRoute, RoutingError
from layerchain.market.placement import capacity_cv
from layerchain.market.sim.model import Market, Trace
from layerchain.routing import RouteLimits, RoutePeer, plan_route

#: Alphas of the Pareto sweep (Fig. 2): 0 (fastest) .. 1 (cheapest).
PARETO_ALPHAS = tuple(round(0.1 * k, 1) for k in range(11))
#: Share of what the survivors' compute allows that counts as recovered (churn_recovery_rounds).
RECOVERY_SHARE = 0.9
#: Random routes drawn around the frontier for the Pareto plot (dominated, mostly).
CLOUD_ROUTES = 40


@dataclass(frozen=True)
class ParetoPoint:
    """The route one alpha gets: its price (credits per token) and latency (ms per token)."""

    alpha: float
    price: float
    latency_ms: float


@dataclass(frozen=True)
class SimSummary:
    """The claims as numbers (module docstring for each field)."""

    nodes: int
    blocks: int
    rounds: int
    price_convergence_round: int | None
    final_price_change: float
    revenue_vs_cost_spearman: float | None
    capacity_cv_before: float
    capacity_cv_after: float
    throughput_gain: float | None
    churn_recovery_rounds: int | None
    pareto: tuple[ParetoPoint, ...]
    plots: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object, fields in the contract's order."""
        return {
            "nodes": self.nodes,
            "blocks": self.blocks,
            "rounds": self.rounds,
            "price_convergence_round": self.price_convergence_round,
            "final_price_change": self.final_price_change,
            "revenue_vs_cost_spearman": self.revenue_vs_cost_spearman,
            "capacity_cv_before": self.capacity_cv_before,
            "capacity_cv_after": self.capacity_cv_after,
            "throughput_gain": self.throughput_gain,
            "churn_recovery_rounds": self.churn_recovery_rounds,
            "pareto": [{"alpha": p.alpha, "price": p.price, "latency_ms": p.latency_ms}
                       for p in self.pareto],
            "plots": list(self.plots),
        }


@dataclass(frozen=True)
class Frontier:
    """Fig. 2's data: the alpha sweep and random routes over the same candidates."""

    sweep: tuple[ParetoPoint, ...]
    cloud: tuple[tuple[float, float], ...]  # (price, latency_ms) of random feasible routes
    dominated_sweep_points: int  # sweep points some other route beats on both terms


def spearman(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None if a side is constant or
    there are fewer than 3 pairs."""
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rx, ry = _ranks(x), _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(values.size)
    start = 0
    for end in range(1, values.size + 1):
        if end == values.size or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of start+1 .. end
            start = end
    return ranks


def convergence_round(change: npt.NDArray[np.float64], tol: float, until: int) -> int | None:
    """Rounds until ``change[:until]`` stays below ``tol``: r + 1 for the first 0-based r
    from which every later round (before ``until``) is below it; None if the last is not."""
    window = change[:until]
    if window.size == 0 or window[-1] >= tol:
        return None
    above = np.flatnonzero(window >= tol)
    return 1 if above.size == 0 else int(above[-1]) + 2


def recovery_rounds(trace: Trace) -> int | None:
    """``churn_recovery_rounds`` (module docstring) of a trace."""
    at = trace.config.churn_at
    if at is None:
        return None
    target = RECOVERY_SHARE * trace.survived_compute * float(np.min(trace.capacity[at - 1]))
    for r in range(at, trace.config.rounds):
        if trace.coverage[r] == 1.0 and float(np.min(trace.capacity[r])) >= target:
            return r - at + 1
    return None


def frontier(market: Market, seed: int) -> Frontier:
    """The alpha sweep over one client's candidates in ``market`` (``PARETO_ALPHAS``) and
    ``CLOUD_ROUTES`` random routes over the same candidates (each planned with a random
    alpha over a random half of them: feasible, seldom optimal)."""
    rng = random.Random(seed + 2)
    peers = market.candidates(rng)
    num_blocks = market.config.blocks
    sweep = []
    for alpha in PARETO_ALPHAS:
        try:
            plan = plan_route(peers, num_blocks, RouteLimits(alpha))
        except (NoRoute, RoutingError):
            continue
        sweep.append(ParetoPoint(alpha, float(plan.price), float(plan.latency_ms)))
    cloud = []
    for _ in range(CLOUD_ROUTES):
        half: list[RoutePeer] = [p for p in peers if rng.random() < 0.5]
        try:
            plan = plan_route(half, num_blocks, RouteLimits(rng.random()))
        except (NoRoute, RoutingError):
            continue
        cloud.append((float(plan.price), float(plan.latency_ms)))
    points = [(p.price, p.latency_ms) for p in sweep] + cloud
    eps = 1e-9
    dominated = sum(
        1 for p in sweep
        if any(q[0] <= p.price + eps and q[1] <= p.latency_ms + eps
               and (q[0] < p.price - eps or q[1] < p.latency_ms - eps) for q in points))
    return Frontier(tuple(sweep), tuple(cloud), dominated)


def summarize(trace: Trace, front: Frontier, plots: tuple[str, ...] = ()) -> SimSummary:
    """The contract's summary of ``trace`` (module docstring)."""
    config = trace.config
    at = config.churn_at
    settled = at if at is not None else config.rounds  # rounds of the first equilibrium
    before = trace.capacity_before
    after = trace.capacity[settled - 1]
    gain = None if float(np.min(before)) <= 0 else float(np.min(after) / np.min(before))
    return SimSummary(
        nodes=config.nodes,
        blocks=config.blocks,
        rounds=config.rounds,
        price_convergence_round=convergence_round(trace.price_change, config.convergence_tol,
                                                  settled),
        final_price_change=float(trace.price_change[-1]),
        revenue_vs_cost_spearman=spearman(trace.ms, trace.revenue),
        capacity_cv_before=capacity_cv(before.tolist()),
        capacity_cv_after=capacity_cv(after.tolist()),
        throughput_gain=gain,
        churn_recovery_rounds=recovery_rounds(trace),
        pareto=front.sweep,
        plots=plots,
    )


def details(trace: Trace, front: Frontier) -> dict[str, Any]:
    """What the docs quote beyond the contract (module docstring)."""
    config = trace.config
    alive = trace.alive
    at = config.churn_at
    settled = at if at is not None else config.rounds
    return {
        "config": {name: getattr(config, name) for name in config.__dataclass_fields__},
        "best_response_share": trace.best_response_share,
        "price_vs_cost_spearman": spearman(trace.ms, trace.settled_price),
        "revenue_per_block_vs_cost_spearman": spearman(trace.ms,
                                                       trace.revenue / trace.settled_span),
        "expected_revenue_vs_cost_spearman": spearman(trace.ms, trace.expected_revenue),
        "nodes_without_revenue": float(np.mean(trace.revenue == 0)),
        "by_cost_decile": _deciles(trace),
        "revenue_window": [trace.revenue_from, settled],
        "bottleneck_before": float(np.min(trace.capacity_before)),
        "bottleneck_after_placement": float(np.min(trace.capacity[settled - 1])),
        "bottleneck_final": float(np.min(trace.capacity[-1])),
        "ideal_bottleneck": float(sum(1000.0 / m for m in trace.ms) / config.blocks),
        "capacity_cv_final": capacity_cv(trace.capacity[-1].tolist()),
        "churn_round": at,
        "survived_compute": trace.survived_compute,
        "coverage_after_churn": (float(np.mean(trace.capacity_hit > 0))
                                 if at is not None else None),
        "bottleneck_after_churn": float(np.min(trace.capacity_hit)) if at is not None else None,
        "blocks_below_half_after_churn": (
            np.flatnonzero(trace.capacity_hit < 0.5 * trace.capacity[at - 1]).tolist()
            if at is not None else None),
        "moves": int(np.sum(trace.moves)),
        "moves_per_round": trace.moves.tolist(),
        "requests": int(np.sum(trace.requests)),
        "requests_without_route": int(np.sum(trace.failed)),
        "requests_without_route_after_churn": (int(np.sum(trace.failed[at:]))
                                               if at is not None else None),
        "price_change_per_round": trace.price_change.tolist(),
        "pareto_dominated_points": front.dominated_sweep_points,
        "mean_final_price": float(np.mean(trace.price[alive])),
    }


def _deciles(trace: Trace) -> dict[str, list[float]]:
    """Means per decile of compute cost (fastest first): cost, price before the churn, the
    model's expected revenue, the revenue routes paid."""
    order = np.argsort(trace.ms, kind="stable")
    parts = np.array_split(order, 10)
    columns = {"ms_per_block": trace.ms, "price": trace.settled_price,
               "expected_revenue": trace.expected_revenue, "revenue": trace.revenue}
    return {name: [float(np.mean(values[part])) for part in parts if part.size]
            for name, values in columns.items()}

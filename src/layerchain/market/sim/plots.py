"""The simulation's figures: five PNGs (matplotlib, Agg backend; no display needed).

``write_plots(trace, front, out)`` writes, and returns the paths of:

* ``price_per_layer.png``   (a) mean price of a few blocks' servers per round, and the
                            per-round price change (log scale) against the tolerance;
* ``revenue_vs_cost.png``   (b, paper Fig. 3) against compute cost, one dot per node, binned
                            medians on top: the price before the churn, the pricing model's
                            expected revenue R, and the revenue clients' routes paid;
* ``capacity.png``          (c) tokens/s per block: random start spans, after placement,
                            right after the churn, at the end;
* ``pareto.png``            (d, paper Fig. 2) the alpha sweep's routes (price vs latency)
                            over one client's candidates, with random routes around them;
* ``churn.png``             (e) coverage and bottleneck tokens/s per round, moves, and
                            requests that found no route.

Points are subsampled to at most ``MAX_DOTS`` per scatter so a 10,000-node figure stays small.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from layerchain.market.sim.model import Trace  # noqa: E402
from layerchain.market.sim.summary import Frontier  # noqa: E402

MAX_DOTS = 2500  # dots per scatter plot
DPI = 90


def write_plots(trace: Trace, front: Frontier, out: Path) -> tuple[str, ...]:
    """Write the five figures under ``out`` (created); their paths, in the order above."""
    out.mkdir(parents=True, exist_ok=True)
    writers = (("price_per_layer.png", _prices), ("revenue_vs_cost.png", _revenue),
               ("capacity.png", _capacity), ("pareto.png", _pareto), ("churn.png", _churn))
    paths = []
    for name, draw in writers:
        fig = draw(trace, front)
        path = out / name
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(str(path))
    return tuple(paths)


def _churn_line(ax: plt.Axes, trace: Trace) -> None:
    at = trace.config.churn_at
    if at is not None:
        ax.axvline(at + 0.5, color="grey", linestyle=":", label=f"churn ({trace.config.churn:.0%})")


def _prices(trace: Trace, front: Frontier) -> plt.Figure:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    fig.subplots_adjust(left=0.14, right=0.97, top=0.94, bottom=0.08, hspace=0.08)
    rounds = np.arange(1, trace.config.rounds + 1)
    num_blocks = trace.config.blocks
    for b in sorted(set(np.linspace(0, num_blocks - 1, min(8, num_blocks)).astype(int))):
        top.plot(rounds, trace.block_price[:, b], linewidth=1, label=f"block {b}")
    top.set_ylabel("mean price of its servers\n(credits / block / token)")
    top.set_title("(a) price per layer over rounds")
    _churn_line(top, trace)
    top.legend(fontsize=7, ncol=3)
    bottom.semilogy(rounds, np.maximum(trace.price_change, 1e-8), color="black")
    bottom.axhline(trace.config.convergence_tol, color="tab:red", linestyle="--",
                   label=f"tolerance {trace.config.convergence_tol:g}")
    _churn_line(bottom, trace)
    bottom.set_xlabel("round")
    bottom.set_ylabel("price change per round\n(max over blocks of mean |dp|/p)")
    bottom.legend(fontsize=8)
    return fig


def _sample(n: int, seed: int) -> npt.NDArray[np.int64]:
    idx = np.arange(n)
    if n <= MAX_DOTS:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, MAX_DOTS, replace=False))


def _binned(ax: plt.Axes, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> None:
    """Means of y over 12 quantile bins of x, drawn as a line (means, not medians: most
    nodes earn nothing in a window, the mean is what a node of that cost expects)."""
    if x.size < 12:
        return
    edges = np.quantile(x, np.linspace(0, 1, 13))
    centers, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (x >= lo) & (x <= hi)
        if inside.any():
            centers.append(float(np.median(x[inside])))
            means.append(float(np.mean(y[inside])))
    ax.plot(centers, means, color="tab:red", linewidth=2, label="mean per cost bin")
    ax.legend(fontsize=8)


def _revenue(trace: Trace, front: Frontier) -> plt.Figure:
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4.5))
    fig.subplots_adjust(left=0.06, right=0.98, top=0.9, bottom=0.12, wspace=0.3)
    ms, price, revenue = trace.ms, trace.settled_price, trace.revenue  # before the churn
    settled = trace.config.churn_at or trace.config.rounds
    dots = _sample(ms.size, trace.config.seed)
    panels = (
        (left, price, f"price at round {settled} (credits / block / token)",
         "equilibrium price vs compute cost", "tab:blue"),
        (middle, trace.expected_revenue, "modelled R = p P(w) (credits / block / token)",
         "(b) the pricing model's revenue (Fig. 3)", "tab:purple"),
        (right, revenue, f"revenue paid by routes, rounds {trace.revenue_from + 1}-{settled}",
         "(b) revenue clients' routes paid", "tab:green"),
    )
    for ax, values, ylabel, title, color in panels:
        ax.scatter(ms[dots], values[dots], s=4, alpha=0.4, color=color)
        _binned(ax, ms, values)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("compute cost (ms / block / token)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    return fig


def _capacity(trace: Trace, front: Frontier) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    fig.subplots_adjust(left=0.1, right=0.98, top=0.92, bottom=0.12)
    blocks = np.arange(trace.config.blocks)
    at = trace.config.churn_at
    settled = at if at is not None else trace.config.rounds
    ax.step(blocks, trace.capacity_before, where="mid", label="random spans (before)")
    ax.step(blocks, trace.capacity[settled - 1], where="mid",
            label=f"after placement (round {settled})")
    if at is not None:
        ax.step(blocks, trace.capacity_hit, where="mid", alpha=0.6, label="right after churn")
        ax.step(blocks, trace.capacity[-1], where="mid", linestyle="--",
                label=f"end (round {trace.config.rounds})")
    ax.set_xlabel("block")
    ax.set_ylabel("capacity (tokens/s through the block)")
    ax.set_title("(c) capacity per block before and after placement")
    ax.legend(fontsize=8)
    return fig


def _pareto(trace: Trace, front: Frontier) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 5))
    fig.subplots_adjust(left=0.13, right=0.97, top=0.93, bottom=0.11)
    if front.cloud:
        cloud = np.array(front.cloud)
        ax.scatter(cloud[:, 1], cloud[:, 0], s=10, color="lightgrey",
                   label="routes over random halves of the candidates")
    lat = [p.latency_ms for p in front.sweep]
    price = [p.price for p in front.sweep]
    ax.plot(lat, price, marker="o", color="tab:blue", label="planner's route for alpha")
    labels: dict[tuple[float, float], list[str]] = {}  # alphas that got the same route
    for point in front.sweep:
        labels.setdefault((point.latency_ms, point.price), []).append(f"{point.alpha:g}")
    for (latency, cost), alphas in labels.items():
        ax.annotate(", ".join(alphas), (latency, cost), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("route latency (ms / token)")
    ax.set_ylabel("route price (credits / token)")
    ax.set_title("(d) alpha traces the price-latency frontier (paper Fig. 2)")
    ax.legend(fontsize=8)
    return fig


def _churn(trace: Trace, front: Frontier) -> plt.Figure:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    fig.subplots_adjust(left=0.12, right=0.88, top=0.94, bottom=0.09, hspace=0.08)
    rounds = np.arange(1, trace.config.rounds + 1)
    x = rounds.astype(np.float64)
    bottleneck = np.min(trace.capacity, axis=1)
    coverage = 100 * trace.coverage
    at = trace.config.churn_at
    if at is not None:  # the state the churn left, before any node moved, between rounds
        x = np.insert(x, at, at + 0.5)
        bottleneck = np.insert(bottleneck, at, np.min(trace.capacity_hit))
        coverage = np.insert(coverage, at, 100 * np.mean(trace.capacity_hit > 0))
    top.plot(x, bottleneck, color="black", marker=".", label="bottleneck tokens/s")
    top.set_ylabel("weakest block (tokens/s)")
    top.set_ylim(bottom=0)
    cover = top.twinx()
    cover.plot(x, coverage, color="tab:orange", label="coverage %")
    cover.set_ylabel("blocks served (%)")
    cover.set_ylim(0, 105)
    _churn_line(top, trace)
    top.set_title("(e) coverage and throughput through churn")
    top.legend(loc="lower left", fontsize=8)
    cover.legend(loc="lower right", fontsize=8)
    bottom.bar(rounds, trace.moves, color="tab:blue", label="span moves")
    bottom.set_ylabel("moves per round")
    failed = bottom.twinx()
    failed.plot(rounds, trace.failed, color="tab:red", label="requests without a route")
    failed.set_ylabel("requests without a route")
    failed.set_ylim(bottom=0, top=max(1, int(np.max(trace.failed)) + 1))
    _churn_line(bottom, trace)
    bottom.set_xlabel("round")
    bottom.legend(loc="upper left", fontsize=8)
    failed.legend(loc="upper right", fontsize=8)
    return fig

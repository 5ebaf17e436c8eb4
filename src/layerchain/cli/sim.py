"""CLI: `layerchain sim` — simulate the market and measure the paper's claims (issue 17.4).

`layerchain sim --nodes 10000 --blocks 80 --steps N --out DIR [--json] [--seed S]
[--churn F] [--rtt-ms MS] [--requests R]` runs ``layerchain.market.sim.run_sim``: PNG plots,
``summary.json`` and ``details.json`` under DIR. With ``--json`` stdout is exactly one JSON
object (the summary, issue 17's contract); without, a short table. Progress goes to stderr.
The simulation (simpy, matplotlib) is imported when the command runs, not at CLI start.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table


def sim(
    nodes: int = typer.Option(10_000, "--nodes", min=2, help="Nodes in the swarm at the start."),
    blocks: int = typer.Option(80, "--blocks", min=1, help="Blocks of the simulated model."),
    steps: int = typer.Option(30, "--steps", min=2,
                              help="Rounds to simulate (one re-pricing period of every node)."),
    out: Path = typer.Option(..., "--out", help="Directory for the plots and summary.json."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (the summary)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, same numbers."),
    churn: Optional[float] = typer.Option(
        None, "--churn", min=0.0, max=0.95,
        help="Fraction of nodes leaving at once, 2/3 into the run (default 0.2; 0: none)."),
    rtt_ms: Optional[float] = typer.Option(
        None, "--rtt-ms", min=0.01, help="Median client-node round trip, ms (default 30)."),
    requests: Optional[int] = typer.Option(
        None, "--requests", min=0,
        help="Client requests routed by the planner per round (default 40)."),
) -> None:
    """Simulate thousands of nodes pricing, placing and churning; plot and measure the market."""
    from layerchain.market.sim import SimConfig, run_sim

    config = SimConfig(nodes=nodes, blocks=blocks, rounds=steps, seed=seed)
    if churn is not None:  # unset flags keep SimConfig's defaults (one place for each)
        config = replace(config, churn=churn)
    if rtt_ms is not None:
        config = replace(config, rtt_ms=rtt_ms)
    if requests is not None:
        config = replace(config, requests_per_round=requests)
    result = run_sim(config, out, progress=lambda line: typer.echo(line, err=True))
    summary = result.summary.to_json()
    if as_json:
        typer.echo(json.dumps(summary))
        return
    console = Console()
    console.print(summary_table(summary))
    console.print(f"plots, summary.json and details.json in {out}")


def summary_table(summary: dict[str, Any]) -> Table:
    """The summary (``SimSummary.to_json()``) as a short table: one row per measure."""
    table = Table(title=f"market simulation: {summary['nodes']} nodes, {summary['blocks']} "
                  f"blocks, {summary['rounds']} rounds", title_justify="left")
    table.add_column("claim")
    table.add_column("measure")
    table.add_column("value", justify="right")

    def fmt(value: object) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = [
        ("(a) prices converge", "rounds to converge", summary["price_convergence_round"]),
        ("", "final price change", summary["final_price_change"]),
        ("(b) cheaper compute earns more", "spearman(cost, revenue)",
         summary["revenue_vs_cost_spearman"]),
        ("(c) placement balances", "capacity CV before", summary["capacity_cv_before"]),
        ("", "capacity CV after", summary["capacity_cv_after"]),
        ("", "throughput gain", summary["throughput_gain"]),
        ("(e) churn recovers", "rounds to recover", summary["churn_recovery_rounds"]),
    ]
    for claim, measure, value in rows:
        table.add_row(claim, measure, fmt(value))
    for k, point in enumerate(summary["pareto"]):
        table.add_row("(d) Pareto" if k == 0 else "",
                      f"alpha {point['alpha']:g}: price / latency ms",
                      f"{point['price']:.4g} / {point['latency_ms']:.4g}")
    return table


def register(app: typer.Typer) -> None:
    app.command("sim")(sim)

"""CLI: `layerchain bench` — measurements printed as JSON, never asserted in timed tests.

`layerchain bench [--nodes 3] [--json]` compares one process with a local swarm;
`layerchain bench routing` times the route planner over random swarms.
"""

from __future__ import annotations

import json

import typer

bench_app = typer.Typer(help="Measure layerchain; prints JSON with --json.", invoke_without_command=True)


@bench_app.command("routing")
def bench_routing(
    peers: int = typer.Option(10_000, help="Peers in each random swarm."),
    blocks: int = typer.Option(80, help="Blocks of the model."),
    trials: int = typer.Option(20, help="Random swarms to plan over."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Time route planning over random swarms: plan_ms_p50 / plan_ms_p99."""
    from layerchain.bench.routing import run_routing_bench

    result = run_routing_bench(peers=peers, blocks=blocks, trials=trials)
    typer.echo(json.dumps(result) if as_json else "\n".join(f"{k}: {v}" for k, v in result.items()))


def register(app: typer.Typer) -> None:
    """Add `bench` to the app."""
    app.add_typer(bench_app, name="bench")

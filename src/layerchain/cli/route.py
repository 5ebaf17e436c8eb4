"""CLI: `layerchain route` — plan a chain of peers over a swarm snapshot and explain it.

`layerchain route --snapshot FILE.json [--alpha A] [--max-price P] [--max-latency-ms L]
[--json]` plans over a snapshot file (format in ``layerchain.routing.snapshot``). Exit
code 2 with one line on stderr when no route meets the limits; a malformed file is a
ConfigError (one line, exit 1, from the app's error handler).

``render_plan(plan, pareto, peers)`` and ``plan_json(plan, pareto)`` are the two outputs,
kept apart so the live mode (``--initial-peers ... --explain``) can reuse them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from layerchain.errors import ConfigError, NoRoute, RoutingError
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.routing import (
    RouteLimits,
    RoutePeer,
    RoutePlan,
    Snapshot,
    pareto_front,
    parse_snapshot,
    plan_route,
)


def plan_json(plan: RoutePlan, pareto: Sequence[RoutePlan]) -> dict[str, Any]:
    """The ``--json`` document: route, its terms, and the frontier's (latency, price)."""
    return {
        "route": [{"peer": h.peer_id, "start": h.start, "end": h.end} for h in plan.hops],
        "latency_ms": float(plan.latency_ms),
        "price": float(plan.price),
        "cost": float(plan.cost),
        "pareto": [{"latency_ms": float(p.latency_ms), "price": float(p.price)} for p in pareto],
    }


def render_plan(
    plan: RoutePlan,
    pareto: Sequence[RoutePlan],
    peers: Sequence[RoutePeer],
    console: Console | None = None,
) -> None:
    """Print the chain (per hop: peer, blocks, RTT + queue + compute = latency, price) and the
    Pareto frontier as rich tables. Latency terms are client mode's."""
    console = console or Console()
    by_id = {p.id: p for p in peers}
    hops = Table(title="route", title_justify="left")
    for name in ("peer", "blocks", "rtt ms", "queue ms", "compute ms", "latency ms", "price"):
        hops.add_column(name, justify="left" if name in ("peer", "blocks") else "right")
    for hop in plan.hops:
        peer = by_id[hop.peer_id]
        blocks = hop.end - hop.start
        compute = blocks * peer.ms_per_block
        hops.add_row(Text(hop.peer_id), f"{hop.start}:{hop.end}", f"{peer.rtt_ms:.2f}",  # no markup
                     f"{peer.queue_ms:.2f}", f"{compute:.2f}",
                     f"{peer.rtt_ms + peer.queue_ms + compute:.2f}",
                     f"{blocks * peer.price_per_block:.4g}")
    hops.add_section()
    hops.add_row("total", f"{len(plan.hops)} hops", "", "", "", f"{plan.latency_ms:.2f}",
                 f"{plan.price:.4g}")
    console.print(hops)
    console.print(f"cost {plan.cost:.4g} (alpha-weighted price and latency)")
    front = Table(title="Pareto frontier (latency vs price)", title_justify="left")
    for name in ("latency ms", "price", "hops", ""):
        front.add_column(name, justify="right")
    for point in pareto:
        chosen = (point.latency_ms, point.price) == (plan.latency_ms, plan.price)
        front.add_row(f"{point.latency_ms:.2f}", f"{point.price:.4g}", str(len(point.hops)),
                      "<- chosen" if chosen else "")
    console.print(front)


def _read_snapshot(path: Path) -> Snapshot:
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read snapshot {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"snapshot {path} is not valid JSON: {error}") from None
    return parse_snapshot(data)


async def _live_peers(
    initial_peers: list[str], model: str, insecure: bool = False
) -> tuple[tuple[RoutePeer, ...], int]:
    """The live swarm as planner input: records from the DHT, RTTs measured by pings (over
    TLS; plaintext tcp:// peers too only if ``insecure``)."""
    from layerchain.client import live_snapshot
    from layerchain.discovery import HivemindDiscovery
    from layerchain.model import resolve_model
    from layerchain.wire import Dialer

    spec = resolve_model(model)
    # a reader only: a DHT client, which other hosts never try to dial back
    discovery = await HivemindDiscovery.create(initial_peers=initial_peers, client_mode=True)
    try:
        snap = await live_snapshot(discovery, Dialer(insecure=insecure), spec.model_id,
                                   spec.num_blocks)
        return snap.peers, snap.num_blocks
    finally:
        await discovery.close()


def route(
    snapshot: Optional[Path] = typer.Option(None, "--snapshot", help="Swarm snapshot JSON file."),
    initial_peers: Optional[list[str]] = typer.Option(
        None, "--initial-peers", help="Plan over the live swarm joined through this DHT address."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model reference (live mode)."),
    explain: bool = typer.Option(
        False, "--explain", help="Show the chain's cost terms per hop and the frontier (default "
        "without --json)."),
    alpha: float = typer.Option(0.0, "--alpha", min=0.0, max=1.0,
                                help="Weight of price against latency: 0 fastest, 1 cheapest."),
    max_price: Optional[float] = typer.Option(None, "--max-price",
                                              help="Most credits per token the route may cost."),
    max_latency_ms: Optional[float] = typer.Option(
        None, "--max-latency-ms", help="Most ms per token step the route may take."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    insecure: bool = typer.Option(
        False, "--insecure", help="Live mode: also ping peers serving plaintext tcp://."),
) -> None:
    """Plan the best chain of peers over a snapshot or the live swarm, with the Pareto frontier."""
    if snapshot is not None:
        snap = _read_snapshot(snapshot)
        peers, num_blocks = snap.peers, snap.num_blocks
    elif initial_peers:
        import asyncio

        peers, num_blocks = asyncio.run(_live_peers(list(initial_peers), model, insecure))
    else:
        raise ConfigError("give --snapshot FILE or --initial-peers ADDR")
    limits = RouteLimits(alpha, max_price, max_latency_ms)  # ConfigError: one line
    try:
        plan = plan_route(peers, num_blocks, limits)
    except NoRoute as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    try:
        front = pareto_front(peers, num_blocks, limits)
    except RoutingError as error:  # too large a swarm to enumerate: the plan still stands
        typer.echo(f"warning: no Pareto frontier: {error}", err=True)
        front = []
    if as_json and not explain:
        typer.echo(json.dumps(plan_json(plan, front)))
    else:
        render_plan(plan, front, peers)


def register(app: typer.Typer) -> None:
    """Add `route` to the app."""
    app.command("route")(route)

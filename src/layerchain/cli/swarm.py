"""CLI: `layerchain swarm up|down|status` (a local swarm) and `layerchain demo`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import Span, even_spans

swarm_app = typer.Typer(help="Start, inspect and stop a local swarm on loopback.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def parse_spans(spans: Optional[str], nodes: int, num_blocks: int) -> list[Span]:
    """``"0:10,10:20"`` -> spans checked against the model; None -> an even split."""
    if not spans:
        return even_spans(num_blocks, nodes)
    return [Span.parse(s).check_within(num_blocks) for s in spans.split(",") if s.strip()]


def _num_blocks(model: str) -> int:
    from layerchain.model import resolve_model

    return resolve_model(model).num_blocks


@swarm_app.command("up")
def up(
    nodes: int = typer.Option(3, help="Number of nodes (ignored when --spans is given)."),
    spans: Optional[str] = typer.Option(None, help="Comma-separated spans, e.g. 0:10,10:20,20:30."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    state_dir: Path = typer.Option(..., help="Directory for swarm.json, logs and node data."),
) -> None:
    """Start a DHT bootstrap and the nodes in the background; write STATE_DIR/swarm.json."""
    from layerchain.local import swarm_up

    span_list = parse_spans(spans, nodes, _num_blocks(model))
    swarm = swarm_up(state_dir, span_list, model=model, on_progress=lambda s: err_console.print(s))
    console.print(f"swarm up: {len(swarm.nodes)} nodes; state in {state_dir / 'swarm.json'}")
    for peer in swarm.initial_peers:
        console.print(f"join with: --initial-peers {peer}")


@swarm_app.command("down")
def down(state_dir: Path = typer.Option(..., help="The directory given to `swarm up`.")) -> None:
    """Stop a local swarm started with `swarm up`."""
    from layerchain.local import swarm_down

    count = swarm_down(state_dir)
    console.print(f"stopped {count} processes")


async def _node_infos(endpoints: list[str], timeout: float = 3.0) -> list[object]:
    from layerchain.errors import LayerchainError
    from layerchain.wire import messages as m
    from layerchain.wire.rpc import RpcClient
    from layerchain.wire.transport import transport_for

    async def one(endpoint: str) -> object:
        try:
            conn = await asyncio.wait_for(transport_for(endpoint).connect(endpoint), timeout)
            rpc = RpcClient(conn)
            try:
                return await rpc.call(m.Info(rid=0), timeout=timeout)
            finally:
                await rpc.close()
        except (LayerchainError, OSError, asyncio.TimeoutError) as error:
            return error

    return await asyncio.gather(*(one(e) for e in endpoints))


async def _records(initial_peers: list[str], model: str) -> list[object]:
    from layerchain.discovery import HivemindDiscovery
    from layerchain.model import resolve_model

    spec = resolve_model(model)
    discovery = await HivemindDiscovery.create(initial_peers=initial_peers)
    try:
        return list(await discovery.find(spec.model_id, spec.num_blocks))
    finally:
        await discovery.close()


@swarm_app.command("status")
def status(
    initial_peers: Optional[List[str]] = typer.Option(None, help="DHT multiaddr of the swarm."),
    state_dir: Optional[Path] = typer.Option(None, help="The directory given to `swarm up`."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference (with --initial-peers)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show the swarm's nodes: spans, endpoints, throughput, price and free cache."""
    from layerchain.errors import ConfigError
    from layerchain.local import LocalSwarm

    if state_dir is not None:
        swarm = LocalSwarm.load(state_dir)
        endpoints = [n["endpoint"] for n in swarm.nodes]
    elif initial_peers:
        records = asyncio.run(_records(list(initial_peers), model))
        endpoints = [r.endpoint for r in records]  # type: ignore[attr-defined]
    else:
        raise ConfigError("give --state-dir or --initial-peers")
    infos = asyncio.run(_node_infos(endpoints))
    rows = []
    for endpoint, info in zip(endpoints, infos):
        if isinstance(info, Exception):
            rows.append({"endpoint": endpoint, "error": str(info) or type(info).__name__})
        else:
            rows.append({
                "peer_id": info.peer_id, "start": info.start, "end": info.end, "endpoint": endpoint,
                "ms_per_block": round(info.ms_per_block, 3), "price_per_block": info.price_per_block,
                "free_cache_tokens": info.free_cache_tokens,
            })
    if as_json:
        typer.echo(json.dumps({"nodes": rows}))
        return
    table = Table(title="swarm")
    for col in ("peer", "blocks", "endpoint", "ms/block", "price", "free cache"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row("?", "?", r["endpoint"], "-", "-", f"[red]{r['error']}[/red]")
        else:
            table.add_row(r["peer_id"], f"{r['start']}:{r['end']}", r["endpoint"],
                          f"{r['ms_per_block']:.2f}", str(r["price_per_block"]), str(r["free_cache_tokens"]))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add `swarm` to the app."""
    app.add_typer(swarm_app, name="swarm")

"""CLI: `layerchain swarm up|down|status` (a local swarm).

Everything a peer says (peer ids, endpoints, error messages) reaches the terminal as plain
``rich.text.Text``, never as Rich markup: a record's ``[link=...]`` stays text, and its
``[/bold]`` cannot break the table (``plain``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import Span, even_spans

if TYPE_CHECKING:
    from layerchain.discovery import PeerRecord

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
    insecure: bool = typer.Option(
        False, "--insecure", help="Nodes serve plaintext tcp:// instead of TLS (clients then "
        "need --insecure too)."),
    device: str = typer.Option(
        "cpu", help="Where the nodes compute: cpu, cuda (cuda:N), mps, or auto (cuda if "
        "present, else mps, else cpu)."),
    dtype: str = typer.Option(
        "fp32", metavar="auto|fp32|bf16|fp16|int8|int4",
        help="Form the nodes' weights are held in: fp32 (the exact reference), bf16, fp16, "
        "int8, int4, or auto (the fastest that keeps greedy agreement)."),
) -> None:
    """Start a DHT bootstrap and the nodes in the background; write STATE_DIR/swarm.json."""
    from layerchain.local import swarm_up
    from layerchain.model.device import resolve_device
    from layerchain.model.quant import resolve_dtype

    resolve_device(device)  # an absent GPU fails here, before any process starts
    resolve_dtype(dtype, device)  # so does an unknown dtype (or int4 off CPU)
    span_list = parse_spans(spans, nodes, _num_blocks(model))
    swarm = swarm_up(state_dir, span_list, model=model, insecure=insecure, device=device,
                     dtype=dtype,
                     on_progress=lambda s: err_console.print(plain(s)))
    console.print(plain(f"swarm up: {len(swarm.nodes)} nodes; state in {state_dir / 'swarm.json'}"))
    for peer in swarm.initial_peers:  # on one line, however narrow the terminal: it is copied
        console.print(plain(f"join with: --initial-peers {peer}"), soft_wrap=True)


@swarm_app.command("down")
def down(state_dir: Path = typer.Option(..., help="The directory given to `swarm up`.")) -> None:
    """Stop a local swarm started with `swarm up`."""
    from layerchain.local import swarm_down

    count = swarm_down(state_dir, on_progress=lambda line: err_console.print(plain(line)))
    console.print(f"stopped {count} processes")


def plain(text: object, style: str = "") -> Text:
    """``text`` as literal terminal text: Rich markup in it is shown, not interpreted."""
    return Text(str(text), style=style)


async def _records(initial_peers: list[str], model: str) -> list[PeerRecord]:
    from layerchain.discovery import HivemindDiscovery
    from layerchain.model import resolve_model

    spec = resolve_model(model)
    # a reader only: a DHT client, which other hosts never try to dial back
    discovery = await HivemindDiscovery.create(initial_peers=initial_peers, client_mode=True)
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
    insecure: bool = typer.Option(
        False, "--insecure", help="Also ask nodes serving plaintext tcp://."),
) -> None:
    """Show the swarm's nodes: spans, endpoints, throughput, price and free cache."""
    from layerchain.client import probe_nodes
    from layerchain.errors import ConfigError
    from layerchain.local import LocalSwarm

    if state_dir is not None:
        swarm = LocalSwarm.load(state_dir)
        endpoints = [n["endpoint"] for n in swarm.nodes]
        peer_ids = [n.get("peer_id") or None for n in swarm.nodes]
    elif initial_peers:
        records = asyncio.run(_records(list(initial_peers), model))
        endpoints = [r.endpoint for r in records]
        peer_ids = [r.peer_id for r in records]
    else:
        raise ConfigError("give --state-dir or --initial-peers")
    rows: list[dict[str, object]] = []
    for probe in asyncio.run(probe_nodes(endpoints, peer_ids=peer_ids, insecure=insecure)):
        info = probe.info
        if info is None:
            rows.append({"endpoint": probe.endpoint, "error": probe.error})
        else:
            rows.append({
                "peer_id": info.peer_id, "start": info.start, "end": info.end, "endpoint": probe.endpoint,
                "ms_per_block": round(info.ms_per_block, 3), "price_per_block": info.price_per_block,
                "free_cache_tokens": info.free_cache_tokens,
            })
    if as_json:
        typer.echo(json.dumps({"nodes": rows}))
        return
    table = Table(title="swarm")
    for col in ("peer", "blocks", "endpoint", "ms/block", "price", "free cache"):
        table.add_column(col)
    for r in rows:  # every cell is plain(...): peers choose these strings
        if "error" in r:
            table.add_row("?", "?", plain(r["endpoint"]), "-", "-", plain(r["error"], style="red"))
        else:
            table.add_row(plain(r["peer_id"]), plain(f"{r['start']}:{r['end']}"), plain(r["endpoint"]),
                          plain(f"{r['ms_per_block']:.2f}"), plain(r["price_per_block"]),
                          plain(r["free_cache_tokens"]))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add `swarm` to the app."""
    app.add_typer(swarm_app, name="swarm")

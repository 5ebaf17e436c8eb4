"""CLI: `layerchain models` — the models a swarm serves, from its catalog, with coverage.

`layerchain models --initial-peers ADDR [--json]` joins the DHT as a client (it takes no
requests), reads the catalog and each listed model's peer records
(``discovery.catalog.list_models``) and prints a table, or with ``--json`` one object::

    {"models": [{"model_id", "name", "family", "num_blocks", "hidden_size", "dtype",
                 "servers", "blocks_served", "replicas", "throughput_tokens_per_s"}]}

(``replicas``: servers per block, ``num_blocks`` ints; ``blocks_served``: blocks with at
least one server; ``throughput_tokens_per_s``: the least-served block's capacity, see
``discovery.catalog``). A DHT that cannot be joined or read is one line on stderr, exit 1.
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from layerchain.discovery.catalog import CatalogDiscovery, ModelEntry, list_models
from layerchain.errors import ConfigError


async def join_dht(initial_peers: list[str]) -> CatalogDiscovery:
    """A DHT client joined through ``initial_peers`` (hivemind loads here, not at import)."""
    from layerchain.discovery import HivemindDiscovery

    discovery: CatalogDiscovery = await HivemindDiscovery.create(
        initial_peers=initial_peers, client_mode=True)
    return discovery


async def read_models(initial_peers: list[str]) -> list[ModelEntry]:
    discovery = await join_dht(initial_peers)
    try:
        return await list_models(discovery)
    finally:
        await discovery.close()


def render_models(listed: list[ModelEntry], console: Console | None = None) -> None:
    """The table: one row per model id; names as plain text (never Rich markup)."""
    table = Table(title="models in the swarm", title_justify="left")
    for name in ("name", "model id", "family", "dtype", "blocks served", "servers",
                 "min replicas", "tokens/s"):
        text = name in ("name", "model id", "family", "dtype")
        table.add_column(name, justify="left" if text else "right", no_wrap=text)
    for m in listed:
        cov = m.coverage
        table.add_row(Text(m.name), m.model_id[:16], Text(m.family), m.dtype,
                      f"{cov.blocks_served}/{m.num_blocks}", str(cov.servers),
                      str(min(cov.replicas, default=0)), f"{cov.throughput_tokens_per_s:.1f}")
    (console or Console()).print(table)


def models(
    initial_peers: Optional[list[str]] = typer.Option(
        None, "--initial-peers", help="DHT address of the swarm (printed by a node)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """List the models the swarm serves, with blocks served, replicas and throughput."""
    if not initial_peers:
        raise ConfigError("give --initial-peers ADDR (a DHT address printed by a node)")
    import asyncio

    listed = asyncio.run(read_models(list(initial_peers)))
    if as_json:
        typer.echo(json.dumps({"models": [m.to_json() for m in listed]}))
    elif not listed:
        typer.echo("no model is announced in this swarm's catalog")
    else:
        render_models(listed)


def register(app: typer.Typer) -> None:
    """Add `models` to the app."""
    app.command("models")(models)

"""An in-process gateway for fast tests: two nodes (blocks 0:2, 2:4) of a tiny model over the
memory transport and discovery, a client, the HTTP app, and an httpx client calling it
through ASGI (Host 127.0.0.1:8000, as a local caller would send)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from layerchain.client import AsyncSwarm, ClientConfig
from layerchain.discovery import Identity, MemoryDHT, MemoryDiscovery
from layerchain.gateway import GatewayConfig
from layerchain.gateway.app import Gateway, create_app
from layerchain.model import load_head, load_span, load_tokenizer, resolve_model
from layerchain.node import Node, NodeConfig
from layerchain.wire import MemoryNetwork, MemoryTransport

BASE_URL = "http://127.0.0.1:8000"


@contextlib.asynccontextmanager
async def memory_gateway(
    model: str, tmp_path: Path, *, price: int = 0, node_class: type[Node] = Node, **config: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    """Two in-process nodes at ``price`` (the second one a ``node_class``), a client, the app
    and an httpx client calling it; everything closed on exit. The key store is
    ``tmp_path / "keys.sqlite"`` when that file exists; otherwise the gateway is open."""
    spec = resolve_model(model)
    hub, wire = MemoryDHT(), MemoryNetwork()
    nodes = []
    for (start, end), cls in (((0, 2), Node), ((2, 4), node_class)):
        identity = Identity.generate()
        node = cls(
            NodeConfig(model=model, start=start, end=end, data_dir=tmp_path / f"node{start}",
                       price_per_block=price),
            spec=spec, span=load_span(spec, start, end), transport=MemoryTransport(wire),
            listen_at=f"mem://{identity.peer_id}", discovery=MemoryDiscovery(hub, identity),
            identity=identity,
        )
        await node.start()
        nodes.append(node)
    swarm = AsyncSwarm(
        spec=spec, head=load_head(spec), tokenizer=load_tokenizer(spec),
        discovery=MemoryDiscovery(hub), transport=MemoryTransport(wire),
        config=ClientConfig(discovery_wait_s=1.0),
    )
    if (tmp_path / "keys.sqlite").exists():
        config.setdefault("keys_path", tmp_path / "keys.sqlite")
    config.setdefault("data_dir", tmp_path)  # no gateway-keys.sqlite there: open
    app = create_app(GatewayConfig(model=model, **config), swarm)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL)
    try:
        yield client, app.state.gateway
    finally:
        await client.aclose()
        await app.state.gateway.close()
        await swarm.close()
        for node in nodes:
            with contextlib.suppress(Exception):
                await node.stop(drain_s=0)

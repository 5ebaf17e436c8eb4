"""An in-process swarm over the memory transport and memory discovery, for fast tests.

Nodes and clients run in one event loop; everything but the sockets and the DHT is the
real thing (real spans, sessions, planner, failover, receipts and vouchers).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from layerchain.client import AsyncSwarm, ClientConfig
from layerchain.discovery import Identity, MemoryDiscovery, MemoryDHT
from layerchain.model import load_head, load_span, load_tokenizer, resolve_model
from layerchain.node import Node, NodeConfig
from layerchain.wire import MemoryNetwork
from layerchain.wire import MemoryTransport


class MemorySwarm:
    """Nodes of one model in this event loop, and clients of them."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.spec = resolve_model(model)
        self.hub = MemoryDHT()
        self.wire = MemoryNetwork()
        self.nodes: list[Node] = []

    async def add_node(
        self, start: int, end: int, tmp: Path, *, wallet: Any = None, ledger: Any = None,
        node_class: type[Node] = Node, **config: Any,
    ) -> Node:
        identity = Identity.generate()
        node = node_class(
            NodeConfig(model=self.model, start=start, end=end, data_dir=tmp, **config),
            spec=self.spec,
            span=load_span(self.spec, start, end),
            # its listener proves the node's peer id, as over TLS: clients check it
            transport=MemoryTransport(self.wire, peer_id=identity.peer_id),
            listen_at=f"mem://{identity.peer_id}",
            discovery=MemoryDiscovery(self.hub, identity),
            identity=identity,
            wallet=wallet,
            ledger=ledger,
        )
        await node.start()
        self.nodes.append(node)
        return node

    def client(self, payer: Any = None, **config: Any) -> AsyncSwarm:
        return AsyncSwarm(
            spec=self.spec,
            head=load_head(self.spec),
            tokenizer=load_tokenizer(self.spec),
            discovery=MemoryDiscovery(self.hub),
            transport=MemoryTransport(self.wire),
            config=ClientConfig(discovery_wait_s=1.0, ban_base_s=60.0, **config),
            payer=payer,
        )

    async def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.stop(drain_s=0)

"""Builds a real node (model span, TCP transport, hivemind DHT) and runs it until a signal.

On SIGTERM or SIGINT the node withdraws its DHT records, drains its sessions, and exits.
When it is serving, it writes ``DATA_DIR/node.json`` — ``{"pid", "peer_id", "start",
"end", "endpoint", "dht_addresses"}`` — which ``layerchain swarm up`` waits for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import replace
from typing import Callable

import torch

from layerchain.discovery import HivemindDiscovery, Identity
from layerchain.model import load_span, resolve_model
from layerchain.node.config import NodeConfig
from layerchain.node.server import Node
from layerchain.types import Span
from layerchain.wire.transport import TcpTransport

log = logging.getLogger(__name__)


async def build_node(config: NodeConfig) -> tuple[Node, HivemindDiscovery]:
    """Load the span and join the DHT; the node is not started yet."""
    if config.threads:
        torch.set_num_threads(config.threads)
    spec = await asyncio.to_thread(resolve_model, config.model)
    end = config.end or spec.num_blocks
    span_range = Span(config.start, end).check_within(spec.num_blocks)
    config = replace(config, end=end)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    identity = Identity.load_or_create(config.data_dir)
    span = await asyncio.to_thread(load_span, spec, span_range.start, span_range.end)
    discovery = await HivemindDiscovery.create(
        initial_peers=list(config.initial_peers),
        host=config.host,
        port=config.dht_port,
        new_swarm=config.new_swarm,
        identity=identity,
    )
    node = Node(
        config,
        spec=spec,
        span=span,
        transport=TcpTransport(),
        listen_at=f"tcp://{config.host}:{config.port}",
        discovery=discovery,
        identity=identity,
    )
    return node, discovery


async def run_node(config: NodeConfig, on_ready: Callable[[Node, list[str]], None] | None = None) -> None:
    """Run a node until SIGTERM/SIGINT; then stop it gracefully."""
    node, discovery = await build_node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        addresses = discovery.visible_addresses
        ready = {
            "pid": os.getpid(),
            "peer_id": node.peer_id,
            "start": node.span.start,
            "end": node.span.end,
            "endpoint": node.endpoint,
            "dht_addresses": addresses,
            "ms_per_block": node.ms_per_block,
        }
        tmp = config.data_dir / "node.json.tmp"
        tmp.write_text(json.dumps(ready))
        tmp.replace(config.data_dir / "node.json")
        if on_ready is not None:
            on_ready(node, addresses)
        await stop.wait()
    finally:
        await node.stop()
        await discovery.close()
        (config.data_dir / "node.json").unlink(missing_ok=True)

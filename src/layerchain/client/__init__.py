"""The client: sessions through chains of peers, failover, and the decode loop.

Never imports ``layerchain.node``; talks to nodes only through ``layerchain.wire``.
"""

from layerchain.client.audit import Dispute
from layerchain.client.config import ClientConfig, RouteLimits
from layerchain.client.peers import live_snapshot
from layerchain.client.probe import NodeProbe, probe_nodes
from layerchain.client.session import HopPayment, InferenceSession, Recovery
from layerchain.client.swarm import (
    AsyncSwarm,
    Generation,
    GenerationResult,
    Swarm,
    SyncGeneration,
    TokenEvent,
)

__all__ = [
    "AsyncSwarm",
    "ClientConfig",
    "Dispute",
    "Generation",
    "GenerationResult",
    "HopPayment",
    "InferenceSession",
    "NodeProbe",
    "Recovery",
    "RouteLimits",
    "Swarm",
    "SyncGeneration",
    "TokenEvent",
    "live_snapshot",
    "probe_nodes",
]

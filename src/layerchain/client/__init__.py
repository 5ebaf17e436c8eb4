"""The client: sessions through chains of peers, failover, and the decode loop.

Never imports ``layerchain.node``; talks to nodes only through ``layerchain.wire``.
"""

from layerchain.client.config import ClientConfig, RouteLimits
from layerchain.client.session import InferenceSession, Recovery
from layerchain.client.swarm import AsyncSwarm, GenerationResult, Swarm, TokenEvent

__all__ = [
    "AsyncSwarm",
    "ClientConfig",
    "GenerationResult",
    "InferenceSession",
    "Recovery",
    "RouteLimits",
    "Swarm",
    "TokenEvent",
]

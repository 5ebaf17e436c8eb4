"""What a client knows of its swarm, as one frozen snapshot: for dashboards and gateways.

``swarm_state`` is a pure function of the client's peer view (records, measured RTTs, bans)
and its default routing limits; ``AsyncSwarm.state()`` feeds it. Readers get plain frozen
records, so nothing outside the client reaches into ``PeerView``'s dictionaries or the
client's config. Everything here was announced by the peers themselves (span, speed, price,
free cache), except ``rtt_ms`` and ``banned``, which are the client's own observations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from layerchain.client.config import RouteLimits
from layerchain.discovery import PeerRecord
from layerchain.discovery.records import PeerLoad


@dataclass(frozen=True)
class NodeState:
    """One node as the client sees it."""

    peer_id: str
    start: int  # first block served
    end: int  # one past the last block served
    endpoint: str  # where it takes connections, as announced
    ms_per_block: float  # announced compute time, ms per block per token
    price_per_block: int  # announced price, credits per block per token
    free_cache_tokens: int  # announced KV-cache room for new sessions, tokens
    wallet: str  # payment address, "" if none
    version: str  # announced software version
    rtt_ms: float | None  # the client's smoothed round-trip measurement, ms; None: not yet
    banned: bool  # the client currently leaves it out of routes
    load: PeerLoad | None = None  # announced load (sessions, queued steps, step ms); None:
    # not announced


@dataclass(frozen=True)
class SwarmState:
    """The client's view of the swarm at one moment."""

    model_id: str
    num_blocks: int
    nodes: tuple[NodeState, ...]  # sorted by (start, end, peer_id)
    coverage: tuple[int, ...]  # [num_blocks]: how many known nodes serve each block
    limits: RouteLimits  # the client's default routing limits (a field may be None: no limit)
    private_blocks: int = 0  # blocks [0, private_blocks) the client runs itself: routes,
    # coverage and prices count only the blocks after them

    @property
    def covered(self) -> bool:
        """Every routed block has at least one known node (banned ones included)."""
        return bool(self.nodes) and all(self.coverage[self.private_blocks:])

    @property
    def usable(self) -> bool:
        """Every routed block has at least one node that is not banned: a route may exist."""
        counts = [0] * self.num_blocks
        for n in self.nodes:
            if not n.banned:
                for b in range(n.start, min(n.end, self.num_blocks)):
                    counts[b] += 1
        return all(counts[self.private_blocks:])

    def max_route_price(self) -> float:
        """The most any route over the unbanned nodes can charge per token, credits: per
        routed block, the dearest unbanned node serving it; ``inf`` while a block has none."""
        dearest = [-1] * self.num_blocks
        for n in self.nodes:
            if not n.banned:
                for b in range(n.start, min(n.end, self.num_blocks)):
                    dearest[b] = max(dearest[b], n.price_per_block)
        routed = dearest[self.private_blocks:]
        return math.inf if min(routed, default=0) < 0 else float(sum(routed))


def swarm_state(
    model_id: str,
    num_blocks: int,
    records: Iterable[PeerRecord],
    rtt_ms: Mapping[str, float],
    banned: set[str],
    limits: RouteLimits,
    private_blocks: int = 0,
) -> SwarmState:
    """The snapshot of ``records`` with the client's RTTs, bans and default limits, for a
    client that runs blocks ``[0, private_blocks)`` itself."""
    nodes = tuple(
        NodeState(
            peer_id=r.peer_id, start=r.start, end=r.end, endpoint=r.endpoint,
            ms_per_block=r.ms_per_block, price_per_block=r.price_per_block,
            free_cache_tokens=r.free_cache_tokens, wallet=r.wallet, version=r.version,
            rtt_ms=rtt_ms.get(r.peer_id), banned=r.peer_id in banned, load=r.load,
        )
        for r in sorted(records, key=lambda r: (r.start, r.end, r.peer_id))
    )
    counts = [0] * num_blocks
    for n in nodes:
        for b in range(n.start, min(n.end, num_blocks)):
            counts[b] += 1
    return SwarmState(model_id=model_id, num_blocks=num_blocks, nodes=nodes,
                      coverage=tuple(counts), limits=limits, private_blocks=private_blocks)

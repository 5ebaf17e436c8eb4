"""Routes and their cost terms: the records the planner reads and returns.

A *route* is a tuple of ``Hop(peer_id, start, end)`` that covers a block range
``[start, end)`` (normally ``[0, L)``) contiguously, each hop inside its peer's span (any
sub-range of it), no peer twice. Its cost follows paper §3.2, eq. 1::

    cost = alpha * price + (1 - alpha) * latency_ms

Two latency models, both in milliseconds per token step:

* ``client`` (client-driven, the default): the client sends hidden states to each hop and
  gets them back, so every hop costs one round trip, its queueing and its compute::

      latency = sum over hops of  rtt_ms(peer) + queue_ms(peer) + (end - start) * ms_per_block(peer)

  ``queue_ms`` is how long a step is expected to wait behind other steps at the peer
  (``routing.load``: 0 for an idle peer); a busy peer costs more, it is never left out.

* ``push``: the client sends to the first hop, each hop forwards straight to the next,
  the last returns to the client (N+1 one-way transfers instead of 2N). A one-way transfer
  is half a round trip::

      latency = rtt(first)/2 + sum rtt(hop_i, hop_i+1)/2 + rtt(last)/2 + queueing + compute

  ``rtt(a, b)`` comes from the ``peer_rtts`` mapping (``{(a, b): ms}``, symmetric: either
  key order is read). A missing pair is estimated as a relay through the client,
  ``(rtt_ms(a) + rtt_ms(b)) / 2``, so with no peer-to-peer data push mode costs exactly
  what client mode costs.

price = sum over hops of ``(end - start) * price_per_block`` (credits per token).

Bounds: a ``RoutePeer``'s numbers are finite, >= 0 and below ``MAX_MS_PER_BLOCK``,
``MAX_PRICE_PER_BLOCK`` and ``MAX_RTT_MS``, so every sum the planner forms over at most
``MAX_BLOCKS`` blocks stays finite (no ``inf - inf`` in the relaxed DP). Callers holding
untrusted numbers clamp them first (the client does; records are capped lower still).

This module knows nothing of networks: it scores routes over a snapshot.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from layerchain.errors import ConfigError, InvalidPlan
from layerchain.types import Hop

#: Latency models the planner knows.
MODES = ("client", "push")

#: Two values closer than this are equal when checking limits and dominance (ms, credits).
EPS = 1e-9

#: Planner bounds (see the module docstring): ms per block per token, credits per block per
#: token, ms per round trip, blocks. 1e5 blocks x (1e6 + 1e12) stays far below float max.
MAX_MS_PER_BLOCK = 1e6
MAX_PRICE_PER_BLOCK = 1e12
MAX_RTT_MS = 1e6
MAX_BLOCKS = 100_000
_CAPS = {"ms_per_block": MAX_MS_PER_BLOCK, "price_per_block": MAX_PRICE_PER_BLOCK,
         "rtt_ms": MAX_RTT_MS, "queue_ms": MAX_RTT_MS}

#: The numeric fields of a RoutePeer the planner reads, in the order of its packed row
#: (``RoutePeer._row``) and of ``relaxed.peer_table``'s columns.
COLUMNS = ("start", "end", "rtt_ms", "ms_per_block", "price_per_block", "queue_ms")
_ROW = struct.Struct(f"{len(COLUMNS)}d")  # native float64, as numpy reads it


@dataclass(frozen=True)
class RoutePeer:
    """One peer as the planner sees it: a snapshot, not a live connection."""

    id: str  # peer id
    start: int  # first block served
    end: int  # one past the last block served: the span is [start, end)
    ms_per_block: float  # compute time per block per token step, ms (measured by the node)
    price_per_block: float  # credits per block per token (announced by the node)
    rtt_ms: float  # round trip between the client and this peer, ms (measured by the client)
    queue_ms: float = 0.0  # expected wait of a step behind the peer's other work, ms
    # (routing.load.expected_queue_ms; 0: idle or unknown)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"peer id {self.id!r} must be a non-empty string")
        for name in ("start", "end"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ConfigError(f"peer {self.id} has a {name} that is not an integer")
        if self.start < 0 or self.end <= self.start or self.end > MAX_BLOCKS:
            raise ConfigError(
                f"peer {self.id} has an empty, negative or huge span {self.start}:{self.end}")
        for name, cap in _CAPS.items():
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or not 0 <= value <= cap):
                raise ConfigError(
                    f"peer {self.id} has {name} {value!r}: it must be a number in [0, {cap:g}]")
        # the planner's numbers packed once (not a field: equality, repr and replace()
        # ignore it), so its table of 10,000 peers is one bytes join, not 60,000 reads
        object.__setattr__(self, "_row", _ROW.pack(  # COLUMNS' order
            self.start, self.end, self.rtt_ms, self.ms_per_block, self.price_per_block,
            self.queue_ms))


@dataclass(frozen=True)
class RoutePlan:
    """A route and its cost terms."""

    hops: tuple[Hop, ...]
    latency_ms: float  # per token step, in the plan's latency model
    price: float  # credits per token
    cost: float  # alpha * price + (1 - alpha) * latency_ms

    @property
    def peer_ids(self) -> tuple[str, ...]:
        return tuple(hop.peer_id for hop in self.hops)


def one_way_ms(
    a: RoutePeer, b: RoutePeer, peer_rtts: Mapping[tuple[str, str], float] | None
) -> float:
    """One-way transfer time a -> b in push mode: half the announced RTT, or via the client."""
    if peer_rtts:
        rtt = peer_rtts.get((a.id, b.id))
        if rtt is None:
            rtt = peer_rtts.get((b.id, a.id))
        if rtt is not None:
            return rtt / 2
    return (a.rtt_ms + b.rtt_ms) / 2


def route_terms(
    hops: Sequence[Hop],
    peers: Mapping[str, RoutePeer],
    *,
    mode: str = "client",
    peer_rtts: Mapping[tuple[str, str], float] | None = None,
) -> tuple[float, float]:
    """``(latency_ms, price)`` of a route in the given latency model (see module docstring)."""
    latency = price = 0.0
    for i, hop in enumerate(hops):
        peer = peers[hop.peer_id]
        blocks = hop.end - hop.start
        price += blocks * peer.price_per_block
        latency += blocks * peer.ms_per_block + peer.queue_ms
        if mode == "client":
            latency += peer.rtt_ms
        elif i == 0:
            latency += peer.rtt_ms / 2
        else:
            latency += one_way_ms(peers[hops[i - 1].peer_id], peer, peer_rtts)
    if mode == "push" and hops:
        latency += peers[hops[-1].peer_id].rtt_ms / 2
    return latency, price


def make_plan(
    hops: Sequence[Hop],
    peers: Mapping[str, RoutePeer],
    alpha: float,
    *,
    mode: str = "client",
    peer_rtts: Mapping[tuple[str, str], float] | None = None,
) -> RoutePlan:
    """The plan of a route: its hops with latency, price and cost recomputed from the peers."""
    latency, price = route_terms(hops, peers, mode=mode, peer_rtts=peer_rtts)
    return RoutePlan(tuple(hops), latency, price, alpha * price + (1 - alpha) * latency)


def check_route(hops: Sequence[Hop], peers: Mapping[str, RoutePeer], start: int, end: int) -> None:
    """Raise InvalidPlan unless ``hops`` is a valid route over ``[start, end)``: contiguous
    from ``start`` to ``end``, each hop non-empty and inside its peer's span, no peer twice.

    The planner checks every route it returns with it (O(hops)), so a planner bug is a
    typed error naming the bad hop, never a route that fails at a node."""
    at, seen = start, set()
    for hop in hops:
        peer = peers.get(hop.peer_id)
        if peer is None:
            raise InvalidPlan(f"planner bug: hop {hop} names an unknown peer")
        if hop.peer_id in seen:
            raise InvalidPlan(f"planner bug: peer {hop.peer_id} is used twice")
        if hop.start != at or hop.end <= hop.start:
            raise InvalidPlan(f"planner bug: hop {hop} does not continue the route at block {at}")
        if not (peer.start <= hop.start and hop.end <= peer.end):
            raise InvalidPlan(
                f"planner bug: hop {hop} leaves the span {peer.start}:{peer.end} of its peer")
        seen.add(hop.peer_id)
        at = hop.end
    if at != end:
        raise InvalidPlan(f"planner bug: route ends at block {at}, not {end}")

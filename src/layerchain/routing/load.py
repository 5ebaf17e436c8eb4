"""Load-aware routing (issue 16.2): what a busy peer costs, and how clients spread.

Pure functions over numbers a client holds; no I/O. The planner sees their result as a
peer's ``queue_ms`` (``RoutePeer``), a per-hop latency term like the round trip: a busy
peer is *avoided* (a route elsewhere wins while it is faster), never banned (it still
serves when it is the only one, or still the fastest even after its queue).

Queueing model. A node announces ``queued_steps`` (steps in flight, time-averaged over a
few seconds) and ``step_ms`` (its recent one-token step over its span). Steps run one at
a time on a node, so by Little's law a step arriving at a random moment finds
``queued_steps`` steps ahead of it, each taking about ``step_ms``::

    queue_ms = step_ms * (queued_steps + own_sessions)

``own_sessions`` are the client's own sessions open on that peer: each keeps at most one
step in flight, and announcements come every few seconds, so a client adds what it knows
first-hand (counted twice once the node announces it too: pessimistic for the client's
own load, which is what spreads its concurrent generations). Capped at ``MAX_QUEUE_MS``.

Spreading. Clients starting together read the same records and would all pick the same
fastest peer. Each client scales every peer's latency terms by its own fixed factor in
``[1, 1 + spread)`` (``jitter_factor``: a hash of a per-client seed and the peer id), so
among peers within ``spread`` of each other, different clients prefer different ones, while
a peer clearly faster is still everyone's choice. Deterministic per client: a client
keeps preferring the same peer among equals (its KV caches stay warm there).
"""

from __future__ import annotations

import hashlib
import math

from layerchain.errors import ConfigError
from layerchain.routing.route import MAX_RTT_MS

#: Most queueing a peer is charged, ms (a RoutePeer's bound).
MAX_QUEUE_MS = MAX_RTT_MS


def expected_queue_ms(queued_steps: float, step_ms: float, own_sessions: int) -> float:
    """How long a new step is expected to wait at a peer before it computes, ms (module
    docstring); 0 for an idle peer. Non-finite or negative inputs count as 0."""
    queued = queued_steps if math.isfinite(queued_steps) and queued_steps > 0 else 0.0
    step = step_ms if math.isfinite(step_ms) and step_ms > 0 else 0.0
    return min(MAX_QUEUE_MS, step * (queued + max(0, own_sessions)))


def jitter_factor(seed: bytes, peer_id: str, spread: float) -> float:
    """This client's fixed factor in ``[1, 1 + spread)`` for ``peer_id``'s latency terms:
    ``1 + spread * u`` with ``u`` uniform in [0, 1) from blake2b(seed, peer_id)."""
    if not (math.isfinite(spread) and 0.0 <= spread <= 1.0):
        raise ConfigError(f"route jitter must be in [0, 1], not {spread!r}")
    if spread == 0.0:
        return 1.0
    digest = hashlib.blake2b(peer_id.encode(), key=seed[:64], digest_size=8).digest()
    return 1.0 + spread * (int.from_bytes(digest, "big") / 2.0**64)

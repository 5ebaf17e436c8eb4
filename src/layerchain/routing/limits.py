"""Default routing limits derived from a snapshot: what a client spends when it set no cap.

With no ``max_price`` a client would take the fastest route whatever it costs: one peer
announcing a thousand times the swarm's price on a fast claim took 96,000 credits for a
request whose honest route cost 96. The default cap is relative to what the swarm
charges::

    default_max_price(start, end) = multiple * sum over blocks b in [start, end) of
                                    median price_per_block of the peers serving b

A per-block median (not one median over all peers) keeps a block that only priced peers
serve reachable in a swarm of mostly free peers; a minority of greedy peers cannot move
it. Pure functions over a snapshot, no I/O.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from layerchain.errors import ConfigError
from layerchain.routing.route import RoutePeer


def median_block_prices(peers: Sequence[RoutePeer], num_blocks: int) -> tuple[float, ...]:
    """``[num_blocks]`` median ``price_per_block`` of the peers serving each block (credits
    per block per token); 0.0 for a block nobody serves."""
    prices: list[list[float]] = [[] for _ in range(num_blocks)]
    for peer in peers:
        for b in range(peer.start, min(peer.end, num_blocks)):
            prices[b].append(peer.price_per_block)
    return tuple(statistics.median(p) if p else 0.0 for p in prices)


def default_max_price(
    block_prices: Sequence[float], start: int, end: int, multiple: float
) -> float:
    """The most a route over blocks ``[start, end)`` may cost per token by default:
    ``multiple`` times the sum of those blocks' median prices (``median_block_prices``)."""
    if not (isinstance(multiple, (int, float)) and 1.0 <= multiple < float("inf")):
        raise ConfigError(f"max_price_multiple must be a number >= 1, not {multiple!r}")
    return float(multiple) * float(sum(block_prices[start:end]))

"""Routing limits: the one record of a request's limits, and the default price cap.

``RouteLimits`` (alpha, max_price, max_latency_ms) is what the planner takes as one
argument; the client's config, a generation, the gateway and the CLI hold and pass the
same record (a partial override is ``dataclasses.replace(limits, ...)``, re-validated).

Default cap: what a client spends when it set no cap.

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

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from layerchain.errors import ConfigError
from layerchain.routing.route import RoutePeer


@dataclass(frozen=True)
class RouteLimits:
    """What a route may cost and how it is chosen (paper §3.2, eq. 1). Checked on
    construction: ConfigError naming the bad field."""

    alpha: float = 0.0  # route cost weight: 0 = fastest .. 1 = cheapest
    max_price: float | None = None  # most a route may cost per token, credits (None: no cap
    # given; a client then applies its default cap, ``default_max_price``)
    max_latency_ms: float | None = None  # most a route may take per token step, ms (None: any)

    def __post_init__(self) -> None:
        if not _number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be a number in [0, 1], not {self.alpha!r}",
                              hint="0 picks the fastest route, 1 the cheapest")
        if self.max_price is not None and not (_number(self.max_price) and self.max_price >= 0):
            raise ConfigError(
                f"max_price must be a finite number of credits per token >= 0, not "
                f"{self.max_price!r}")
        if self.max_latency_ms is not None and not (
                _number(self.max_latency_ms) and self.max_latency_ms >= 0):
            raise ConfigError(
                f"max_latency_ms must be a finite number of ms >= 0, not {self.max_latency_ms!r}")


def _number(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


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

"""What a request may cost: the reservation a key must cover before the request runs.

Pure functions over a ``SwarmState``; the key store holds and settles the credits
(``keys.py``), the gateway wires the two (``app.py``).

A request's generation computes ``prompt + max_tokens - 1`` token positions (the prompt's,
then each generated token but the last) through every block, at the route's price per token
(the sum over its hops of blocks x price per block). The reservation is that count at the
request's price limit per token: its ``max_price``, else the client's default (a multiple
of the swarm's median price), capped by the dearest route the unbanned nodes offer now. The generation runs with ``max_cost`` set to
the reservation, so the client stops before paying more (a failover's replay included),
and the key is never debited more than it reserved.
"""

from __future__ import annotations

import math

from layerchain.client.state import SwarmState


def price_cap(requested: float | None, state: SwarmState) -> float:
    """The most a route may charge this request per token, credits: its own ``max_price``,
    else the client's default (``state.limits.max_price``), and never more than the dearest
    route over the unbanned nodes (``inf`` while some block has none), which no route the
    planner picks now can exceed."""
    limit = requested if requested is not None else state.limits.max_price
    dearest = state.max_route_price()
    return dearest if limit is None else min(float(limit), dearest)


def reservation(prompt_tokens: int, max_tokens: int, price_per_token: float) -> int:
    """Credits that cover every position the generation can compute at ``price_per_token``."""
    positions = prompt_tokens + max_tokens - 1
    return math.ceil(positions * price_per_token) if price_per_token > 0 else 0

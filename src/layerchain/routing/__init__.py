"""Route planning: the fastest chain of peers within the client's limits (paper §3.1-3.2).

Pure functions over a snapshot of peers; no I/O, no torch. See ``planner`` for the
algorithms, ``search`` for its exact search, ``route`` for the records, the latency
models and the bounds every cost stays within, ``limits`` for the
``RouteLimits`` record and the default price cap, ``load`` for what a busy peer costs and
how clients spread.
"""

from layerchain.routing.limits import RouteLimits, default_max_price, median_block_prices
from layerchain.routing.planner import pareto_front, plan_route, plan_span
from layerchain.routing.relaxed import RoutePeers
from layerchain.routing.route import MODES, RoutePeer, RoutePlan, check_route, route_terms
from layerchain.routing.snapshot import Snapshot, parse_snapshot

__all__ = [
    "MODES",
    "RouteLimits",
    "RoutePeer",
    "RoutePeers",
    "RoutePlan",
    "Snapshot",
    "check_route",
    "default_max_price",
    "median_block_prices",
    "pareto_front",
    "parse_snapshot",
    "plan_route",
    "plan_span",
    "route_terms",
]

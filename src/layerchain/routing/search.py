"""Exact route search: best-first label setting with the "no peer twice" rule enforced.

A *label* is a partial route from boundary 0 to boundary ``b``: its latency, price, last
peer, and the set ``used`` of its peers whose span still reaches past ``b`` (only those
could be reused later, so only they constrain the rest of the route). Labels are popped
in order of a lower bound of their final value (A*): the relaxed cost-to-go of
``layerchain.routing.relaxed`` is admissible and consistent for every objective here.

Two objectives:

* ``scalar``: the minimum of ``alpha * price + (1 - alpha) * latency`` (paper eq. 1), ties
  broken by latency then price, among routes meeting the optional limits (a
  resource-constrained shortest path). The first complete label popped is optimal.
* ``pareto``: every non-dominated ``(latency, price)`` route (paper §3.2). Complete labels
  pop in order of latency; each one cheaper than all before it is on the frontier.

Dominance: a label at ``b`` is discarded when one popped before at the same ``b`` (and the
same last peer, in push mode, where the next transfer depends on it) is no worse in every
objective and has used a subset of its still-usable peers: whatever completes the second
completes the first at the same cost. Limits prune any label whose lower bounds exceed
them.

Successors are generated lazily: an expanded label sorts all its hops ``(p, b, b')`` by
priority once (numpy) and sits in the heap as a cursor at its next hop, so each heap pop
materialises one label. Worst case exponential (the problem with the "no peer twice" rule
is a rainbow path problem, and with limits a resource-constrained one); ``max_labels``
bounds the work: past it the search returns the best complete route found in branch and
bound mode, else raises RoutingError.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from layerchain.errors import RoutingError
from layerchain.routing.relaxed import PeerArrays
from layerchain.routing.route import EPS

#: Labels popped before the search gives up with a RoutingError.
MAX_LABELS = 100_000


@dataclass(frozen=True)
class Bounds:
    """Lower bounds of the cost-to-go from each boundary ``0..n`` ([n+1] float64 each)."""

    latency: np.ndarray
    price: np.ndarray
    cost: np.ndarray


@dataclass(frozen=True)
class SearchSpec:
    """What to search for."""

    alpha: float
    objective: str = "scalar"  # "scalar" or "pareto"
    mode: str = "client"  # "client" or "push"
    max_price: float | None = None
    max_latency_ms: float | None = None
    # push mode: one-way ms between rows, {row_a: {row_b: ms}}, both directions present
    one_way: Mapping[int, Mapping[int, float]] = field(default_factory=dict)
    max_labels: int = MAX_LABELS
    # scalar objective: the cost of some valid route meeting the limits, if known; partial
    # routes whose lower bound exceeds it are dropped (branch and bound)
    upper_bound: float = float("inf")
    # Lagrangian multipliers (cost per ms over the latency limit, per credit over the price
    # limit). Non-zero: labels are ordered by the Lagrangian lower bound
    #   (1 - alpha + lat_mult) * lat + (alpha + price_mult) * price + h - lat_mult * max_latency_ms
    #   - price_mult * max_price
    # (``Bounds.cost`` must be the cost-to-go for those weights) and the search runs on
    # until that bound passes the best complete route found (branch and bound).
    lat_mult: float = 0.0
    price_mult: float = 0.0


class _Label:
    __slots__ = ("lat", "price", "b", "last", "used", "parent", "hop")

    def __init__(self, lat, price, b, last, used, parent, hop):  # type: ignore[no-untyped-def]
        self.lat = lat  # ms so far (push mode: the return to the client added at b == n)
        self.price = price  # credits so far
        self.b = b  # boundary reached
        self.last = last  # row of the last hop's peer, -1 at the start
        self.used = used  # frozenset of used rows whose span reaches past b
        self.parent = parent
        self.hop = hop  # (row, a, b) of the last hop

    def hops(self) -> list[tuple[int, int, int]]:
        out, label = [], self
        while label.parent is not None:
            out.append(label.hop)
            label = label.parent
        out.reverse()
        return out


class _Cursor:
    """The successors of one label (numpy arrays; ``keys`` is [N, K] priorities), handed
    out in priority order. Sorting is done in chunks of the smallest ``CHUNK`` keys, since
    a search seldom takes more than a few successors of a label."""

    CHUNK = 32
    __slots__ = ("parent", "rows", "ends", "lat", "price", "keys", "order", "pos", "rest")

    def __init__(self, parent, rows, ends, lat, price, keys):  # type: ignore[no-untyped-def]
        self.parent, self.rows, self.ends = parent, rows, ends
        self.lat, self.price, self.keys = lat, price, keys
        self.rest = np.arange(len(rows))  # indices not yet sorted into a chunk
        self.order, self.pos = self.rest[:0], 0
        self._next_chunk()

    def _next_chunk(self) -> None:
        rest = self.rest
        if len(rest) > self.CHUNK:
            first = self.keys[rest, 0]
            cut = np.partition(first, self.CHUNK - 1)[self.CHUNK - 1]
            take = first <= cut  # every key equal to the cut too, so chunks never interleave
            chunk, self.rest = rest[take], rest[~take]
        else:
            chunk, self.rest = rest, rest[:0]
        self.order = chunk[np.lexsort(self.keys[chunk].T[::-1])]
        self.pos = 0

    def peek(self) -> list[float] | None:
        """The priority of the next successor, or None when all are handed out."""
        if self.pos == len(self.order):
            if len(self.rest) == 0:
                return None
            self._next_chunk()
        return self.keys[self.order[self.pos]].tolist()

    def take(self) -> int:
        i = int(self.order[self.pos])
        self.pos += 1
        return i


def search(arr: PeerArrays, spec: SearchSpec, bounds: Bounds) -> list[_Label]:
    """Complete labels: the optimum (``[]`` or one) for ``scalar``, the frontier sorted by
    latency for ``pareto``. Raises RoutingError past ``spec.max_labels`` pops."""
    n, alpha = arr.n, spec.alpha
    lat_w, price_w = 1 - alpha + spec.lat_mult, alpha + spec.price_mult  # priority weights
    lagrangian = spec.lat_mult > 0 or spec.price_mult > 0
    offset = (spec.lat_mult * (spec.max_latency_ms or 0.0)
              + spec.price_mult * (spec.max_price or 0.0))
    push = spec.mode == "push"
    max_lat = np.inf if spec.max_latency_ms is None else spec.max_latency_ms + EPS
    max_price = np.inf if spec.max_price is None else spec.max_price + EPS
    limited = spec.max_latency_ms is not None or spec.max_price is not None
    pareto = spec.objective == "pareto"
    overrides: dict[int, np.ndarray] = {}  # push mode: row -> [P] one-way ms or nan
    best_goal_price = np.inf  # pareto: price of the last frontier point found
    found: list[_Label] = []
    seen: dict[tuple[int, int], list[tuple[float, float, frozenset[int]]]] = {}
    heap: list[tuple] = []
    tick = itertools.count()

    def one_way_from(last: int, rows: np.ndarray) -> np.ndarray:
        if last < 0:
            return arr.rtt[rows] / 2
        base = (arr.rtt[last] + arr.rtt[rows]) / 2
        if last in spec.one_way:
            table = overrides.get(last)
            if table is None:
                table = np.full(len(arr.peers), np.nan)
                for row, ms in spec.one_way[last].items():
                    table[row] = ms
                overrides[last] = table
            known = table[rows]
            base = np.where(np.isnan(known), base, known)
        return base

    fans: dict[int, tuple[np.ndarray, ...]] = {}

    def fan(b: int) -> tuple[np.ndarray, ...]:
        """Every hop from boundary b, as [H] arrays: rows, ends, latency and price added,
        and those plus the bounds at the end. Cached per boundary."""
        if b not in fans:
            rows = arr.active[b]
            span = arr.e[rows] - b  # hops from b can end anywhere in (b, e_p]
            rows = np.repeat(rows, span)
            blocks = np.arange(len(rows)) - np.repeat(np.cumsum(span) - span, span) + 1
            ends = b + blocks
            lat = blocks * arr.ms[rows]
            if push:  # the transfer into the hop depends on the previous peer: added later
                lat += np.where(ends == n, arr.rtt[rows] / 2, 0.0)
            else:
                lat += arr.rtt[rows]
            price = blocks * arr.pr[rows]
            fans[b] = (rows, ends, lat, price, lat + bounds.latency[ends],
                       price + bounds.price[ends],
                       price_w * price + lat_w * lat + bounds.cost[ends])
        return fans[b]

    banned = np.zeros(len(arr.peers), dtype=bool)  # scratch: the expanded label's used rows
    ceiling = spec.upper_bound + EPS * (1 + abs(spec.upper_bound))
    best: _Label | None = None  # lagrangian: the best complete label so far
    best_key = (np.inf, np.inf, np.inf)  # its (cost, latency, price)

    def expand(label: _Label) -> None:
        rows, ends, lat, price, lat_h, price_h, cost_h = fan(label.b)
        if push:
            transfer = one_way_from(label.last, rows)
            lat, lat_h, cost_h = lat + transfer, lat_h + transfer, cost_h + lat_w * transfer
        lat_lb, price_lb = label.lat + lat_h, label.price + price_h
        keep = (lat_lb <= max_lat) & (price_lb <= max_price)
        if pareto:
            keep &= price_lb < best_goal_price - EPS
        else:
            cost_lb = (price_w * label.price + lat_w * label.lat - offset) + cost_h
            keep &= cost_lb <= ceiling
        if label.used:
            used = list(label.used)
            banned[used] = True
            keep &= ~banned[rows]
            banned[used] = False
        idx = np.flatnonzero(keep)
        if len(idx) == 0:
            return
        keys = np.empty((len(idx), 2 if pareto else 3))
        if pareto:
            keys[:, 0], keys[:, 1] = lat_lb[idx], price_lb[idx]
        else:
            keys[:, 0], keys[:, 1], keys[:, 2] = cost_lb[idx], lat_lb[idx], price_lb[idx]
        cursor = _Cursor(label, rows[idx], ends[idx], label.lat + lat[idx],
                         label.price + price[idx], keys)
        heapq.heappush(heap, (*cursor.peek(), next(tick), cursor))

    def dominated(label: _Label) -> bool:
        key = (label.b, label.last if push else -1)
        entries = seen.setdefault(key, [])
        for lat, price, used in entries:
            no_worse = not (limited or pareto) or (lat <= label.lat and price <= label.price)
            if used <= label.used and no_worse:
                return True
        entries.append((label.lat, label.price, label.used))
        return False

    expand(_Label(0.0, 0.0, 0, -1, frozenset(), None, None))
    popped = 0
    while heap:
        if lagrangian and heap[0][0] > ceiling:
            break  # no partial route left can beat the best complete one
        cursor = heapq.heappop(heap)[-1]
        i = cursor.take()
        after = cursor.peek()
        if after is not None:
            heapq.heappush(heap, (*after, next(tick), cursor))
        popped += 1
        if popped > spec.max_labels:
            if best is not None:
                return [best]  # the best found; optimal not proven
            raise RoutingError(
                f"route search gave up after {spec.max_labels} partial routes",
                hint="loosen the limits or exclude some peers",
            )
        parent, row, end = cursor.parent, int(cursor.rows[i]), int(cursor.ends[i])
        if pareto and cursor.keys[i, 1] >= best_goal_price - EPS:
            continue  # a frontier point found meanwhile is as fast and no dearer
        used = frozenset(q for q in parent.used if arr.e[q] > end)
        if arr.e[row] > end:
            used = used | {row}
        label = _Label(float(cursor.lat[i]), float(cursor.price[i]), end, row, used, parent,
                       (row, parent.b, end))
        if end == n:
            if lagrangian:
                key = (alpha * label.price + (1 - alpha) * label.lat, label.lat, label.price)
                if key < best_key:
                    best, best_key = label, key
                    ceiling = min(ceiling, key[0] + EPS * (1 + abs(key[0])))
                continue
            if not pareto:
                return [label]
            found.append(label)
            best_goal_price = label.price
            continue
        if not dominated(label):
            expand(label)
    if lagrangian:
        return [best] if best is not None else []
    return found

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
from typing import Any, cast

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
    # optional [n+1] lower bound of the priority cost of any partial route from boundary 0
    # to each boundary (the relaxed forward DP): with a finite ``upper_bound``, a hop from
    # ``b`` whose ``cost_from[b] + cost_h`` passes it can never be taken, so ``_Fan``
    # leaves it out before materialising it (scalar, non-Lagrangian searches only)
    cost_from: np.ndarray | None = None


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

    def __init__(self, lat: float, price: float, b: int, last: int, used: frozenset[int],
                 parent: _Label | None, hop: tuple[int, int, int] | None) -> None:
        self.lat = lat  # ms so far (push mode: the return to the client added at b == n)
        self.price = price  # credits so far
        self.b = b  # boundary reached
        self.last = last  # row of the last hop's peer, -1 at the start
        self.used = used  # frozenset of used rows whose span reaches past b
        self.parent = parent
        self.hop = hop  # (row, a, b) of the last hop

    def hops(self) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        label = self
        while label.parent is not None and label.hop is not None:
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

    def __init__(self, parent: _Label, rows: np.ndarray, ends: np.ndarray, lat: np.ndarray,
                 price: np.ndarray, keys: np.ndarray) -> None:
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
        return cast(list[float], self.keys[self.order[self.pos]].tolist())

    def take(self) -> int:
        i = int(self.order[self.pos])
        self.pos += 1
        return i


def search(arr: PeerArrays, spec: SearchSpec, bounds: Bounds) -> list[_Label]:
    """Complete labels: the optimum (``[]`` or one) for ``scalar``, the frontier sorted by
    latency for ``pareto``. Raises RoutingError past ``spec.max_labels`` pops."""
    return _Search(arr, spec, bounds).run()


class _Fan:
    """Every hop from one boundary ``b`` worth trying, as ``[H]`` arrays: the peer row, the
    end boundary, the latency and price the hop adds, and those plus the bounds from its
    end (lower bounds of the whole route's latency, price and priority cost through it).
    Hops are in order of row, then end (ties in priority keep that order)."""

    __slots__ = ("rows", "ends", "lat", "price", "lat_h", "price_h", "cost_h")

    def __init__(self, rows: np.ndarray, ends: np.ndarray, lat: np.ndarray,
                 price: np.ndarray, lat_h: np.ndarray, price_h: np.ndarray,
                 cost_h: np.ndarray) -> None:
        self.rows, self.ends, self.lat, self.price = rows, ends, lat, price
        self.lat_h, self.price_h, self.cost_h = lat_h, price_h, cost_h


class _Hops:
    """Every hop ``(b, row, end)`` of the pairs ``(starts[k], rows[k])``, ``end`` in
    ``(b, e_row]``, in pair order then end ascending, with what ``_Fan`` holds (``[H]``
    arrays; ``starts`` is each hop's ``b``)."""

    def __init__(self, arr: PeerArrays, bounds: Bounds, push: bool, lat_w: float,
                 price_w: float, starts: np.ndarray, rows: np.ndarray) -> None:
        span = arr.e[rows] - starts
        rows = np.repeat(rows, span)
        starts = np.repeat(starts, span)
        blocks = np.arange(len(rows)) - np.repeat(np.cumsum(span) - span, span) + 1
        ends = starts + blocks
        lat = blocks * arr.ms[rows] + arr.fixed_ms(push)[rows]
        if push:  # the transfer into the hop depends on the previous peer: added later
            lat += np.where(ends == arr.n, arr.rtt[rows] / 2, 0.0)
        price = blocks * arr.pr[rows]
        self.starts, self.rows, self.ends, self.lat, self.price = starts, rows, ends, lat, price
        self.cost_h = price_w * price + lat_w * lat + bounds.cost[ends]

    def keep(self, mask: np.ndarray) -> None:
        self.starts, self.rows, self.ends = self.starts[mask], self.rows[mask], self.ends[mask]
        self.lat, self.price, self.cost_h = self.lat[mask], self.price[mask], self.cost_h[mask]

    def fan(self, bounds: Bounds, lo: int = 0, hi: int | None = None) -> _Fan:
        """The hops ``[lo:hi]`` as a fan (all of them by default)."""
        cut = slice(lo, hi)
        ends, lat, price = self.ends[cut], self.lat[cut], self.price[cut]
        return _Fan(self.rows[cut], ends, lat, price, lat + bounds.latency[ends],
                    price + bounds.price[ends], self.cost_h[cut])


def _pruned_hops(arr: PeerArrays, bounds: Bounds, push: bool, lat_w: float, price_w: float,
                 ceiling: float) -> tuple[_Hops, list[int]]:
    """The hops from every boundary that may be on a route beating ``ceiling``, grouped
    by boundary (``ptr``: boundary ``b``'s are ``[ptr[b]:ptr[b + 1]]``), all built at once.

    A hop from ``b`` is left out when ``bounds.cost_from[b]`` + its cost + the bound from
    its end passes the ceiling. Before any hop is built, a lower bound of that sum leaves
    out peers (a hop on ``p`` costs at least its one-block hop, every cost term being >= 0,
    and ends at most at ``e_p``, where the bound from its end is at least the least bound
    up to ``e_p``; it starts where the cost-to-come is at least its least from ``s_p``
    on), then the exact least of each (peer, boundary) pair over all its ends
    (``_least_hops``) leaves out pairs: with binding limits ~8,500 pairs (~100,000 hops)
    passed the cruder pair bound for the ~10 hops kept."""
    assert bounds.cost_from is not None
    n = arr.n
    floor = bounds.cost_from  # [n+1]
    to_go = np.minimum.accumulate(bounds.cost)  # [n+1] least bound from any end up to e
    come = np.minimum.accumulate(floor[::-1])[::-1]  # [n+1] least cost-to-come from b on
    first = price_w * arr.pr + lat_w * arr.ms + lat_w * arr.fixed_ms(push)  # [P]
    finite = np.abs(floor[np.isfinite(floor)])
    # the filters add up the same terms in another order: a margin far above rounding
    cap = ceiling + 1e-9 * (1.0 + abs(ceiling) + (float(finite.max()) if len(finite) else 0.0))
    end_bound = first + to_go[arr.e]  # [P]
    rows = np.flatnonzero(come[arr.s] + end_bound <= cap)
    span = arr.e[rows] - arr.s[rows]
    pair_rows = np.repeat(rows, span)  # every (b, row) of those spans, by row then b
    pair_b = np.repeat(arr.s[rows], span) + (
        np.arange(len(pair_rows)) - np.repeat(np.cumsum(span) - span, span))
    if len(pair_rows):
        least, slack = _least_hops(arr, bounds, push, lat_w, price_w, span, pair_rows, pair_b)
        keep = floor[pair_b] + least <= cap + slack
        pair_rows, pair_b = pair_rows[keep], pair_b[keep]
    order = np.argsort(pair_b, kind="stable")  # by boundary, rows still ascending
    hops = _Hops(arr, bounds, push, lat_w, price_w, pair_b[order], pair_rows[order])
    hops.keep(floor[hops.starts] + hops.cost_h <= ceiling)  # the test fans always made
    ptr: list[int] = np.searchsorted(hops.starts, np.arange(n + 1)).tolist()
    return hops, ptr


def _least_hops(arr: PeerArrays, bounds: Bounds, push: bool, lat_w: float, price_w: float,
                span: np.ndarray, pair_rows: np.ndarray, pair_b: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """For every pair ``(b, row)`` (whole spans of rows, by row then ``b`` ascending,
    ``span`` the rows' lengths): the least priority cost of a hop on ``row`` from ``b`` plus
    the bound from its end, over every end in ``(b, e_row]``, without building the hops,
    and a margin for rounding (``[pairs]`` each).

    With ``w`` the row's cost per block and ``fixed`` its cost per hop, a hop ending at
    ``x`` costs ``fixed + (x - b) * w + h[x]`` = ``fixed - b * w + C(x)``, ``C(x) = x * w +
    h[x]``: the minimum over ends is a suffix minimum of ``C`` along the row's ends, taken
    for all rows at once by doubling (``log2(span)`` numpy passes; a min is exact). Push
    mode's last transfer (>= 0) is left out: still a lower bound."""
    w = (price_w * arr.pr + lat_w * arr.ms)[pair_rows]
    fixed = (lat_w * arr.fixed_ms(push))[pair_rows]
    to_go = bounds.cost[pair_b + 1]
    suffix = (pair_b + 1) * w + to_go  # C at the end b + 1 of each pair's one-block hop
    last = np.repeat(np.cumsum(span) - 1, span)  # the index of each row's last pair
    index = np.arange(len(suffix))
    shift, longest = 1, int(span.max())
    while shift < longest:  # suffix[k] = min of C over the ends of pairs k .. k + 2 * shift - 1
        ahead = np.minimum(index + shift, last)
        suffix = np.minimum(suffix, suffix[ahead])
        shift *= 2
    least = fixed + (suffix - pair_b * w)
    # the sums regrouped (x * w - b * w for (x - b) * w): a margin far above their rounding
    finite = to_go[np.isfinite(to_go)]
    slack = 1e-9 * (1.0 + arr.n * w + fixed + (float(np.abs(finite).max()) if len(finite) else 0.0))
    return least, slack


class _Search:
    """One run of the label-setting search (module docstring): the heap of cursors, the
    labels seen per boundary, and the best complete route so far."""

    def __init__(self, arr: PeerArrays, spec: SearchSpec, bounds: Bounds) -> None:
        self.arr, self.spec, self.bounds = arr, spec, bounds
        self.lat_w = 1 - spec.alpha + spec.lat_mult  # priority weights
        self.price_w = spec.alpha + spec.price_mult
        self.lagrangian = spec.lat_mult > 0 or spec.price_mult > 0
        self.offset = (spec.lat_mult * (spec.max_latency_ms or 0.0)
                       + spec.price_mult * (spec.max_price or 0.0))
        self.push = spec.mode == "push"
        self.pareto = spec.objective == "pareto"
        self.limited = spec.max_latency_ms is not None or spec.max_price is not None
        self.max_lat = np.inf if spec.max_latency_ms is None else spec.max_latency_ms + EPS
        self.max_price = np.inf if spec.max_price is None else spec.max_price + EPS
        self.ceiling = spec.upper_bound + EPS * (1 + abs(spec.upper_bound))
        self.heap: list[tuple[Any, ...]] = []  # (*priority, tick, _Cursor)
        self.tick = itertools.count()
        self.fans: dict[int, _Fan] = {}  # per boundary, built on first use
        self.pruned: tuple[_Hops, list[int]] | None = None  # _pruned_hops, when it applies
        self.seen: dict[tuple[int, int], list[tuple[float, float, frozenset[int]]]] = {}
        self.overrides: dict[int, np.ndarray] = {}  # push: row -> [P] one-way ms or nan
        self.used_mask = np.zeros(len(arr.peers), dtype=bool)  # scratch for expand()
        self.found: list[_Label] = []  # pareto: the frontier so far
        self.best_goal_price = np.inf  # pareto: price of the last frontier point found
        self.best: _Label | None = None  # lagrangian: the best complete label so far
        self.best_key = (np.inf, np.inf, np.inf)  # its (cost, latency, price)

    def run(self) -> list[_Label]:
        self.expand(_Label(0.0, 0.0, 0, -1, frozenset(), None, None))
        popped = 0
        while self.heap:
            if self.lagrangian and self.heap[0][0] > self.ceiling:
                break  # no partial route left can beat the best complete one
            popped += 1
            if popped > self.spec.max_labels:
                return self.give_up()
            label = self.pop()
            if label is None:
                continue
            if label.b == self.arr.n:
                if self.complete(label):
                    return [label]
            elif not self.dominated(label):
                self.expand(label)
        if self.lagrangian:
            return [self.best] if self.best is not None else []
        return self.found

    def pop(self) -> _Label | None:
        """The label of the heap's best successor (its cursor goes back in at its next
        one), or None when a frontier point found meanwhile makes it pointless."""
        cursor: _Cursor = heapq.heappop(self.heap)[-1]
        i = cursor.take()
        after = cursor.peek()
        if after is not None:
            heapq.heappush(self.heap, (*after, next(self.tick), cursor))
        parent, row, end = cursor.parent, int(cursor.rows[i]), int(cursor.ends[i])
        if self.pareto and cursor.keys[i, 1] >= self.best_goal_price - EPS:
            return None  # a frontier point found meanwhile is as fast and no dearer
        e = self.arr.e
        used = frozenset(q for q in parent.used if e[q] > end)
        if e[row] > end:
            used = used | {row}
        return _Label(float(cursor.lat[i]), float(cursor.price[i]), end, row, used, parent,
                      (row, parent.b, end))

    def complete(self, label: _Label) -> bool:
        """Record a complete route; True when it is the answer (scalar, not lagrangian)."""
        if self.lagrangian:
            alpha = self.spec.alpha
            key = (alpha * label.price + (1 - alpha) * label.lat, label.lat, label.price)
            if key < self.best_key:
                self.best, self.best_key = label, key
                self.ceiling = min(self.ceiling, key[0] + EPS * (1 + abs(key[0])))
            return False
        if not self.pareto:
            return True
        self.found.append(label)
        self.best_goal_price = label.price
        return False

    def give_up(self) -> list[_Label]:
        """Past ``max_labels`` pops: the best route found (optimal not proven), or
        RoutingError when there is none."""
        if self.best is not None:
            return [self.best]
        raise RoutingError(
            f"route search gave up after {self.spec.max_labels} partial routes",
            hint="loosen the limits or exclude some peers",
        )

    def prunes(self) -> bool:
        """Whether hops that cannot beat the incumbent are left out before they are built
        (``_pruned_hops``): with a cost-to-come bound and a finite ceiling. The ceiling
        only falls (a lagrangian search lowers it as it completes routes): hops kept under
        a higher one are more than needed, never too few."""
        return (self.bounds.cost_from is not None and not self.pareto
                and self.ceiling < np.inf)

    def fan(self, b: int) -> _Fan:
        fan = self.fans.get(b)
        if fan is None:
            if self.prunes():
                if self.pruned is None:
                    self.pruned = _pruned_hops(self.arr, self.bounds, self.push, self.lat_w,
                                               self.price_w, self.ceiling)
                hops, ptr = self.pruned
                fan = hops.fan(self.bounds, ptr[b], ptr[b + 1])
            else:
                rows = self.arr.active[b]
                fan = _Hops(self.arr, self.bounds, self.push, self.lat_w, self.price_w,
                            np.full(len(rows), b), rows).fan(self.bounds)
            self.fans[b] = fan
        return fan

    def one_way_from(self, last: int, rows: np.ndarray) -> np.ndarray:
        """Push mode: the one-way ms from peer row ``last`` (-1: the client) to ``rows``,
        announced peer-to-peer RTTs where known, else relayed through the client."""
        arr = self.arr
        base: np.ndarray
        if last < 0:
            base = arr.rtt[rows] / 2
            return base
        base = (arr.rtt[last] + arr.rtt[rows]) / 2
        if last in self.spec.one_way:
            table = self.overrides.get(last)
            if table is None:
                table = np.full(len(arr.peers), np.nan)
                for row, ms in self.spec.one_way[last].items():
                    table[row] = ms
                self.overrides[last] = table
            known = table[rows]
            base = np.where(np.isnan(known), base, known)
        return base

    def expand(self, label: _Label) -> None:
        """Push a cursor over ``label``'s successors that may still meet the limits and
        beat the incumbent, and use no peer of ``label.used`` again."""
        fan = self.fan(label.b)
        rows, lat, lat_h, cost_h = fan.rows, fan.lat, fan.lat_h, fan.cost_h
        if self.push:
            transfer = self.one_way_from(label.last, rows)
            lat, lat_h, cost_h = lat + transfer, lat_h + transfer, cost_h + self.lat_w * transfer
        lat_lb, price_lb = label.lat + lat_h, label.price + fan.price_h
        keep = (lat_lb <= self.max_lat) & (price_lb <= self.max_price)
        if self.pareto:
            keep &= price_lb < self.best_goal_price - EPS
        else:
            cost_lb = (self.price_w * label.price + self.lat_w * label.lat - self.offset) + cost_h
            keep &= cost_lb <= self.ceiling
        if label.used:
            used, mask = list(label.used), self.used_mask
            mask[used] = True
            keep &= ~mask[rows]
            mask[used] = False
        idx = np.flatnonzero(keep)
        if len(idx) == 0:
            return
        keys = np.empty((len(idx), 2 if self.pareto else 3))
        if self.pareto:
            keys[:, 0], keys[:, 1] = lat_lb[idx], price_lb[idx]
        else:
            keys[:, 0], keys[:, 1], keys[:, 2] = cost_lb[idx], lat_lb[idx], price_lb[idx]
        cursor = _Cursor(label, rows[idx], fan.ends[idx], label.lat + lat[idx],
                         label.price + fan.price[idx], keys)
        heapq.heappush(self.heap, (*cast(list[float], cursor.peek()), next(self.tick), cursor))

    def dominated(self, label: _Label) -> bool:
        """Whether a label seen before at the same boundary (and last peer, in push mode)
        is no worse in every objective and used a subset of its still-usable peers; if
        not, ``label`` is remembered for the labels to come."""
        key = (label.b, label.last if self.push else -1)
        entries = self.seen.setdefault(key, [])
        strict = self.limited or self.pareto
        for lat, price, used in entries:
            no_worse = not strict or (lat <= label.lat and price <= label.price)
            if used <= label.used and no_worse:
                return True
        entries.append((label.lat, label.price, label.used))
        return False

"""The route planner: the best chain of peers over a snapshot (paper §3.1-3.2).

Pure functions, no I/O: the client's background tasks feed them a snapshot of peers
(``RoutePeer``) and get back a ``RoutePlan``. See ``layerchain.routing.route`` for what a
route is and how latency, price and cost are counted.

* ``plan_route``: the minimum-cost route within one ``RouteLimits`` (the client's
  ``alpha``, optionally ``max_price`` and ``max_latency_ms``). Client mode without
  binding limits takes the fast path: the relaxed DP of ``relaxed`` (O(blocks * peers),
  numpy); when its route uses no peer twice and meets the limits, it is optimal.
  Otherwise the exact search of ``search`` decides: A* on the relaxed bound with the
  repaired relaxed route as incumbent (a peer twice), hops that cannot beat it skipped
  before they are built; Lagrangian branch and bound (binding limits: the multipliers
  come from a few relaxed DPs by cutting planes, see ``_Planner.dual``); plain A* (push
  mode). The search is bounded (``search.MAX_LABELS``): past it a limited request gets
  the best route found that meets the limits (not proven optimal), or RoutingError if
  none was found.

Speed (issue 16.5: <= 50 ms p50 at 10,000 peers x 80 blocks in every case): every
relaxed DP runs over the undominated peers only (``PeerArrays.undominated``; the same
relaxed optimum for any weighting, so bounds and the fast path are unchanged), a few
numpy calls per boundary (``relaxed``), and the exact search over all peers, so nothing
is approximated. The dual stops as soon as its bound meets its incumbent, and the search
builds only the hops that may beat the incumbent (``search._pruned_hops``, which first
leaves out every (peer, boundary) pair whose least hop cannot). Where the time goes at
that size: the relaxed DPs (~1-2 ms each on a loaded core), the search (~1-10 ms),
reading the peers (one bytes join of their packed rows; none for ``RoutePeers``, what
the client's kept snapshot gives). ``bench routing`` times each case and
``tests/test_routing.py`` checks the shortcuts against the plain search and brute force.
* ``pareto_front``: every non-dominated (latency, price) route, sorted by latency.
* ``plan_span``: the same over a block range ``[start, end)`` only, used to re-plan the
  span a dead peer held. Banned peers go in ``exclude``; so do the route's other peers if
  the re-planned hops must not reuse them.

Ties: among routes of equal cost the planner prefers the lower latency (for ``alpha = 0``,
the lower price), so the chosen route is always on the Pareto frontier.

Errors: ``NoRoute`` names uncovered blocks ("blocks 12:15 have no peer") or the limit that
cannot be met with the closest achievable values; bad arguments raise ``ConfigError``.
Every returned route is checked (``route.check_route``: contiguous, covers the range, each
hop inside its peer's span, no peer twice); one that is not raises ``InvalidPlan``, a bug
report, instead of reaching a node.
"""

from __future__ import annotations

import math
from dataclasses import replace
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from layerchain.errors import ConfigError, InvalidPlan, NoRoute, RoutingError
from layerchain.routing.limits import RouteLimits
from layerchain.routing.relaxed import (
    PeerArrays,
    RelaxedResult,
    RoutePeers,
    peer_table,
    relaxed_cost_to_go,
    relaxed_forward,
)
from layerchain.routing.route import (
    EPS,
    MAX_RTT_MS,
    MODES,
    RoutePeer,
    RoutePlan,
    check_route,
    make_plan,
)
from layerchain.routing.search import Bounds, SearchSpec, search
from layerchain.types import Hop

PeerRtts = Mapping[tuple[str, str], float]

#: Most relaxed DPs spent raising the Lagrangian dual along one multiplier (``dual``).
DUAL_STEPS = 6


def plan_route(
    peers: Sequence[RoutePeer],
    num_blocks: int,
    limits: RouteLimits | None = None,
    *,
    exclude: Iterable[str] = (),
    mode: str = "client",
    peer_rtts: PeerRtts | None = None,
) -> RoutePlan:
    """The minimum-cost route over blocks ``[0, num_blocks)`` meeting ``limits``
    (default ``RouteLimits()``: the fastest, no caps).

    ``limits.alpha`` in [0, 1] weighs price against latency (0: fastest, 1: cheapest).
    ``mode="push"`` scores latency with peer-to-peer RTTs from ``peer_rtts``
    (``{(peer_a, peer_b): rtt_ms}``). Raises NoRoute when blocks are uncovered or no route
    meets the limits."""
    return plan_span(peers, num_blocks, 0, num_blocks, limits,
                     exclude=exclude, mode=mode, peer_rtts=peer_rtts)


def plan_span(
    peers: Sequence[RoutePeer],
    num_blocks: int,
    start: int,
    end: int,
    limits: RouteLimits | None = None,
    *,
    exclude: Iterable[str] = (),
    mode: str = "client",
    peer_rtts: PeerRtts | None = None,
) -> RoutePlan:
    """``plan_route`` over blocks ``[start, end)`` only; hops use the parts of peers' spans
    inside it. The limits apply to the returned sub-route alone."""
    limits = _limits(limits)
    planner = _Planner(peers, num_blocks, start, end, limits.alpha, exclude, mode, peer_rtts)
    return planner.checked(planner.best(limits.max_price, limits.max_latency_ms))


def pareto_front(
    peers: Sequence[RoutePeer],
    num_blocks: int,
    limits: RouteLimits | None = None,
    *,
    start: int = 0,
    end: int | None = None,
    exclude: Iterable[str] = (),
    mode: str = "client",
    peer_rtts: PeerRtts | None = None,
) -> list[RoutePlan]:
    """Every non-dominated (latency, price) route meeting the limits, sorted by latency
    (so by decreasing price). ``limits.alpha`` only fills each plan's ``cost``. One route
    per distinct (latency, price) point. Raises NoRoute when blocks are uncovered; returns
    ``[]`` when no route meets the limits."""
    limits = _limits(limits)
    end = num_blocks if end is None else end
    planner = _Planner(peers, num_blocks, start, end, limits.alpha, exclude, mode, peer_rtts)
    spec = planner.spec("pareto", limits.max_price, limits.max_latency_ms)
    return [planner.checked(planner.plan(label.hops()))
            for label in search(planner.arr, spec, planner.bounds())]


def _limits(limits: RouteLimits | None) -> RouteLimits:
    """``limits``, or the default; ConfigError for anything else (e.g. a bare alpha)."""
    if limits is None:
        return RouteLimits()
    if not isinstance(limits, RouteLimits):
        raise ConfigError(f"limits must be a RouteLimits, not {limits!r}",
                          hint="pass RouteLimits(alpha=..., max_price=..., max_latency_ms=...)")
    return limits


def _fmt(value: float) -> str:
    """A number for a message: 14, 0.5, 35.25 (at most 6 significant digits)."""
    return f"{value:.6g}"


class _Planner:
    """One planning request: validated inputs, the peer arrays and cached bounds."""

    def __init__(
        self,
        peers: Sequence[RoutePeer],
        num_blocks: int,
        start: int,
        end: int,
        alpha: float,
        exclude: Iterable[str],
        mode: str,
        peer_rtts: PeerRtts | None,
    ) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ConfigError(f"num_blocks must be a positive integer, not {num_blocks!r}")
        if not (0 <= start < end <= num_blocks):
            raise ConfigError(f"block range {start}:{end} is empty or outside 0:{num_blocks}")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ConfigError(f"alpha must be in [0, 1], not {alpha!r}")
        if mode not in MODES:
            raise ConfigError(f"unknown latency mode {mode!r}: use one of {', '.join(MODES)}")
        table = peer_table(peers)  # (ids, [P, 6] numbers): the one pass over the peers
        by_id = peers.by_id if isinstance(peers, RoutePeers) else dict(zip(table[0], peers))
        peers = tuple(peers)
        if len(by_id) != len(peers):
            seen: set[str] = set()
            for peer in peers:
                if peer.id in seen:
                    raise ConfigError(f"peer {peer.id} appears twice in the snapshot")
                seen.add(peer.id)
        if peers and table[1][:, 1].max() > num_blocks:
            peer = next(p for p in peers if p.end > num_blocks)
            raise ConfigError(
                f"peer {peer.id} serves blocks {peer.start}:{peer.end} "
                f"but the model has {num_blocks}"
            )
        self.by_id, self.alpha, self.mode = by_id, float(alpha), mode
        self.peer_rtts = dict(peer_rtts or {})
        for pair, rtt in self.peer_rtts.items():
            if (isinstance(rtt, bool) or not isinstance(rtt, (int, float))
                    or not 0 <= rtt <= MAX_RTT_MS):
                raise ConfigError(f"peer_rtts {pair} is {rtt!r}: it must be in [0, {MAX_RTT_MS:g}]")
        self.excluded = sorted({peer_id for peer_id in exclude if peer_id in by_id})
        self.arr = PeerArrays.build(peers, start, end, self.excluded, table=table)
        # relaxed DPs run over the undominated peers only: same optima, far fewer peers
        self.core = self.arr.subset(self.arr.undominated())
        gaps = self.arr.uncovered()
        if gaps:
            names = ", ".join(f"{a}:{b}" if b - a > 1 else f"{a}" for a, b in gaps)
            word = "blocks" if len(gaps) > 1 or gaps[0][1] - gaps[0][0] > 1 else "block"
            verb = "have" if word == "blocks" else "has"
            k = len(self.excluded)
            note = f" ({k} excluded peer{'s' if k > 1 else ''} not counted)" if k else ""
            raise NoRoute(f"{word} {names} {verb} no peer{note}")
        self._bounds: dict[object, np.ndarray] = {}  # cached cost-to-go arrays
        self.cost_from: dict[float, np.ndarray] = {}  # alpha -> [n+1] relaxed cost-to-come
        self.relaxed: dict[float, RelaxedResult] = {}  # alpha -> fast()'s relaxed DP

    # --- building blocks -------------------------------------------------------------

    def checked(self, plan: RoutePlan) -> RoutePlan:
        """``plan`` if it is a valid route over the range without excluded peers, else
        InvalidPlan (a planner bug)."""
        check_route(plan.hops, self.by_id, self.arr.offset, self.arr.offset + self.arr.n)
        excluded = set(self.excluded) & set(plan.peer_ids)
        if excluded:
            raise InvalidPlan(f"planner bug: the route uses excluded peer {min(excluded)}")
        return plan

    def plan(self, rows_hops: list[tuple[int, int, int]], alpha: float | None = None,
             arr: PeerArrays | None = None) -> RoutePlan:
        """A RoutePlan from hops ``(row, a, b)`` in shifted coordinates, rows of ``arr``
        (default: all peers; ``self.core`` for routes of the relaxed DPs)."""
        arr = self.arr if arr is None else arr
        off, peers = arr.offset, arr.peers
        hops = [Hop(peers[r].id, a + off, b + off) for r, a, b in rows_hops]
        merged: list[Hop] = []  # adjacent hops on one peer are one hop (never costlier)
        for hop in hops:
            if merged and merged[-1].peer_id == hop.peer_id and merged[-1].end == hop.start:
                merged[-1] = Hop(hop.peer_id, merged[-1].start, hop.end)
            else:
                merged.append(hop)
        return make_plan(merged, self.by_id, self.alpha if alpha is None else alpha,
                         mode=self.mode, peer_rtts=self.peer_rtts)

    def bounds(self, alpha: float | None = None, *, cost_only: bool = False,
               lat_weight: float | None = None, price_weight: float | None = None) -> Bounds:
        """Relaxed cost-to-go lower bounds (push mode: compute only, transfers >= 0).

        ``cost`` is for ``price_weight * price + lat_weight * latency``, by default
        ``alpha`` and ``1 - alpha``. ``cost_only``: latency and price bounds are zeros
        (still lower bounds; they only break ties when no limit needs them), saving two
        DP passes."""
        alpha = self.alpha if alpha is None else alpha
        lat_w = 1 - alpha if lat_weight is None else lat_weight
        price_w = alpha if price_weight is None else price_weight
        arr = self.core  # the same cost-to-go as over every peer (PeerArrays.undominated)
        fixed = arr.fixed_ms(push=self.mode == "push")
        zero = np.zeros_like(arr.rtt)
        if ("cost", lat_w, price_w) not in self._bounds:
            self._bounds[("cost", lat_w, price_w)] = relaxed_cost_to_go(
                arr, lat_w * fixed, price_w * arr.pr + lat_w * arr.ms)
        cost = self._bounds[("cost", lat_w, price_w)]
        if cost_only:
            nothing = np.zeros(arr.n + 1)
            return Bounds(latency=nothing, price=nothing, cost=cost)
        if "latency" not in self._bounds:
            self._bounds["latency"] = relaxed_cost_to_go(arr, fixed, arr.ms)
            self._bounds["price"] = relaxed_cost_to_go(arr, zero, arr.pr)
        return Bounds(self._bounds["latency"], self._bounds["price"], cost)

    def spec(self, objective: str, max_price: float | None, max_latency_ms: float | None,
             alpha: float | None = None) -> SearchSpec:
        one_way: dict[int, dict[int, float]] = {}
        if self.mode == "push" and self.peer_rtts:
            row = {p.id: i for i, p in enumerate(self.arr.peers)}
            for (a, b), rtt in self.peer_rtts.items():
                if a in row and b in row:
                    one_way.setdefault(row[a], {})[row[b]] = rtt / 2
                    one_way.setdefault(row[b], {}).setdefault(row[a], rtt / 2)
        return SearchSpec(alpha=self.alpha if alpha is None else alpha, objective=objective,
                          mode=self.mode, max_price=max_price, max_latency_ms=max_latency_ms,
                          one_way=one_way)

    def fast(self, alpha: float) -> tuple[RoutePlan | None, RoutePlan | None]:
        """Client mode: ``(optimum, None)`` when the relaxed optimum uses no peer twice;
        else ``(None, valid)`` with a valid route made from it (an upper bound). The
        forward DP's table is kept (``self.cost_from[alpha]``): a lower bound of the cost
        of any partial route to each boundary, which lets the search skip hops early."""
        if self.mode != "client":
            return None, None
        arr = self.core
        if alpha == 0.0:  # secondary cost (tie-breaker): price when alpha = 0, else latency
            second_fixed, second_w = np.zeros_like(arr.rtt), arr.pr
        else:
            second_fixed, second_w = arr.fixed_ms(push=False), arr.ms
        result = relaxed_forward(arr, (1 - alpha) * arr.fixed_ms(push=False),
                                 alpha * arr.pr + (1 - alpha) * arr.ms,
                                 second_fixed, second_w)
        self.cost_from[alpha] = result.best
        self.relaxed[alpha] = result
        hops = result.hops()
        if len({row for row, _, _ in hops}) == len(hops):
            return self.plan(hops, alpha, arr), None
        return None, self.plan(_repair(hops), alpha, arr)

    def optimum(self, alpha: float, max_price: float | None = None,
                max_latency_ms: float | None = None) -> RoutePlan | None:
        """The exact optimum for ``alpha`` within the limits, or None if none meets them."""
        plan, valid = self.fast(alpha)
        if plan is not None and _meets(plan, max_price, max_latency_ms):
            return plan
        spec = self.spec("scalar", max_price, max_latency_ms, alpha)
        if max_price is None and max_latency_ms is None and valid is not None:
            spec = replace(spec, upper_bound=valid.cost)
            bounds = replace(self.bounds(alpha, cost_only=True), cost_from=self.cost_from[alpha])
            found = search(self.arr, spec, bounds)
        elif self.mode == "client":
            lat_mult, price_mult, incumbent, cost_from = self.dual(alpha, max_price,
                                                                   max_latency_ms, valid)
            spec = replace(spec, lat_mult=lat_mult, price_mult=price_mult,
                           upper_bound=np.inf if incumbent is None else incumbent.cost)
            bounds = replace(self.bounds(alpha, lat_weight=1 - alpha + lat_mult,
                                         price_weight=alpha + price_mult), cost_from=cost_from)
            try:
                found = search(self.arr, spec, bounds)
            except RoutingError:
                if incumbent is None:
                    raise
                found = []  # gave up: the incumbent is the best known (optimal not proven)
            if not found and incumbent is not None:
                return incumbent  # the search only reports routes better than the incumbent
        else:
            found = search(self.arr, spec, self.bounds(alpha))
        return self.plan(found[0].hops(), alpha) if found else None

    def dual(self, alpha: float, max_price: float | None, max_latency_ms: float | None,
             valid: RoutePlan | None
             ) -> tuple[float, float, RoutePlan | None, np.ndarray | None]:
        """Lagrangian multipliers for the limits, the best valid route meeting them met on
        the way (an incumbent for branch and bound), and the relaxed cost-to-come at those
        multipliers less the limits' term (``Bounds.cost_from`` of the search).

        The dual function ``g(lat_mult, price_mult)`` = relaxed min of ``cost + lat_mult *
        (latency - max_latency_ms) + price_mult * (price - max_price)`` is a lower bound of
        the constrained optimum for *any* multipliers >= 0 (weak duality), concave and
        piecewise linear: each relaxed route is a line in each multiplier, of slope its
        overrun of that limit. It is raised one multiplier at a time by cutting planes:
        from a bracket ``[low, high]`` (slopes > 0 and <= 0) the next trial is where the two
        routes' lines cross; when ``g`` there is on both lines, that is the maximum along
        this multiplier. Piecewise linear: a few relaxed DPs (``DUAL_STEPS`` at most per
        multiplier), where bisection took ~20. The multipliers only steer the search; its
        result is exact whatever they are. Each DP's route, repaired, may meet the limits;
        once ``g`` reaches the best such route's cost (weak duality: it cannot pass it),
        the dual stops: that route's cost is the optimum, and the search only has to
        confirm it (ties)."""
        arr = self.core
        incumbent = None
        if valid is not None and _meets(valid, max_price, max_latency_ms):
            incumbent = valid
        limits = (max_latency_ms or 0.0, max_price or 0.0)
        best = (-np.inf, 0.0, 0.0)  # (g, lat_mult, price_mult)
        best_from: np.ndarray | None = None  # the forward DP's table at the best point

        def closed() -> bool:
            """Whether the best ``g`` has reached the incumbent's cost."""
            return incumbent is not None and best[0] >= incumbent.cost - EPS * (
                1 + abs(incumbent.cost))

        def evaluate(mults: list[float]) -> tuple[float, tuple[float, float]]:
            """``g`` at ``mults`` and the relaxed minimiser's overruns (latency, price)."""
            nonlocal incumbent, best, best_from
            lat_w, price_w = 1 - alpha + mults[0], alpha + mults[1]
            result = self.relaxed.get(alpha) if mults == [0.0, 0.0] else None
            if result is None:  # (at no multiplier: fast()'s DP, same weights)
                result = relaxed_forward(arr, lat_w * arr.fixed_ms(push=False),
                                         price_w * arr.pr + lat_w * arr.ms)
            hops = result.hops()
            relaxed = self.plan(hops, alpha, arr)
            g = float(result.best[-1]) - mults[0] * limits[0] - mults[1] * limits[1]
            if g > best[0]:
                best = (g, mults[0], mults[1])
                best_from = result.best - (float(result.best[-1]) - g)  # less the limits' term
            repaired = self.plan(_repair(hops), alpha, arr)
            if _meets(repaired, max_price, max_latency_ms) and (
                    incumbent is None or repaired.cost < incumbent.cost):
                incumbent = repaired
            return g, (relaxed.latency_ms - limits[0], relaxed.price - limits[1])

        mults = [0.0, 0.0]  # [lat_mult, price_mult]
        g, over = evaluate(mults)
        coords = [i for i, limit in enumerate((max_latency_ms, max_price)) if limit is not None]
        for i in coords:
            if closed() or (over[i] <= 0 and mults[i] == 0.0):
                continue  # optimal already, or this limit does not bind here
            # lines g_j(m) = c + m * slope through each evaluated point, along coordinate i
            low = (mults[i], g, over[i])  # (multiplier, g, slope)
            if low[2] <= 0:  # the maximum lies below: bracket from 0
                trial = list(mults)
                trial[i] = 0.0
                g0, over0 = evaluate(trial)
                low, high = (0.0, g0, over0[i]), low
            else:
                high = low
                value = max(1.0, 2 * mults[i])
                while high[2] > 0 and value < 1e9 and not closed():
                    trial = list(mults)
                    trial[i] = value
                    gv, overv = evaluate(trial)
                    low, high = (high if high[2] > 0 else low), (value, gv, overv[i])
                    value *= 8
            for _ in range(DUAL_STEPS):
                if low[2] <= 0 or high[2] > 0 or low[2] == high[2] or closed():
                    break
                # where low's line meets high's line
                c_low, c_high = low[1] - low[0] * low[2], high[1] - high[0] * high[2]
                m = (c_high - c_low) / (low[2] - high[2])
                if not low[0] < m < high[0]:
                    break
                trial = list(mults)
                trial[i] = m
                gm, overm = evaluate(trial)
                if gm >= c_low + m * low[2] - EPS * (1 + abs(gm)):
                    break  # on both lines: the top of the piecewise linear g
                if overm[i] > 0:
                    low = (m, gm, overm[i])
                else:
                    high = (m, gm, overm[i])
            mults = [best[1], best[2]]
            g, over = best[0], over  # the next coordinate starts from the best point
            if len(coords) == 2 and i == coords[0] and not closed():
                g, over = evaluate(mults)
        lat_mult, price_mult = best[1], best[2]
        for factor in (1.0, 2.0, 8.0, 64.0):  # no incumbent yet: exact valid optima, pushed
            if incumbent is not None:  # ever harder towards the limits, until one meets them
                break
            lat_w, price_w = 1 - alpha + factor * lat_mult, alpha + factor * price_mult
            plan = self.optimum(price_w / (lat_w + price_w))
            if plan is not None and _meets(plan, max_price, max_latency_ms):
                incumbent = self.plan(list(self.rows(plan)), alpha)
        return lat_mult, price_mult, incumbent, best_from

    def rows(self, plan: RoutePlan) -> Iterable[tuple[int, int, int]]:
        """A plan's hops back as ``(row, a, b)`` in shifted coordinates."""
        row = {p.id: i for i, p in enumerate(self.arr.peers)}
        for hop in plan.hops:
            yield row[hop.peer_id], hop.start - self.arr.offset, hop.end - self.arr.offset

    # --- the request -------------------------------------------------------------------

    def best(self, max_price: float | None, max_latency_ms: float | None) -> RoutePlan:
        for name, limit in (("max_price", max_price), ("max_latency_ms", max_latency_ms)):
            if limit is not None and not (isinstance(limit, (int, float)) and math.isfinite(limit)):
                raise ConfigError(f"{name} must be a finite number, not {limit!r}")
        plan = self.optimum(self.alpha, max_price, max_latency_ms)
        if plan is not None:
            return plan
        raise NoRoute(self.explain(max_price, max_latency_ms))

    def explain(self, max_price: float | None, max_latency_ms: float | None) -> str:
        """Why no route meets the limits, with the closest achievable values."""
        if max_price is not None:
            cheapest = self.optimum(1.0)
            assert cheapest is not None
            if cheapest.price > max_price + EPS:
                return (f"no route within max_price {_fmt(max_price)}: the cheapest costs "
                        f"{_fmt(cheapest.price)} (latency {_fmt(cheapest.latency_ms)} ms)")
        if max_latency_ms is not None:
            fastest = self.optimum(0.0)
            assert fastest is not None
            if fastest.latency_ms > max_latency_ms + EPS:
                return (f"no route within max_latency_ms {_fmt(max_latency_ms)}: the fastest "
                        f"takes {_fmt(fastest.latency_ms)} ms (price {_fmt(fastest.price)})")
        assert max_price is not None and max_latency_ms is not None
        cheap = self.optimum(1.0, None, max_latency_ms)
        fast = self.optimum(0.0, max_price, None)
        assert cheap is not None and fast is not None
        return (f"no route within both max_price {_fmt(max_price)} and max_latency_ms "
                f"{_fmt(max_latency_ms)}: within the latency limit the cheapest costs "
                f"{_fmt(cheap.price)}; within the price limit the fastest takes "
                f"{_fmt(fast.latency_ms)} ms")


def _meets(plan: RoutePlan, max_price: float | None, max_latency_ms: float | None) -> bool:
    return (max_price is None or plan.price <= max_price + EPS) and (
        max_latency_ms is None or plan.latency_ms <= max_latency_ms + EPS
    )



def _repair(hops: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """A valid route from a relaxed one: while a peer appears twice, its first and last
    hops and everything between become one hop on it (its span is contiguous, so it
    covers them)."""
    hops = list(hops)
    while True:
        first: dict[int, int] = {}
        for j, (row, _, _) in enumerate(hops):
            if row in first:
                i = first[row]
                last = max(k for k in range(j, len(hops)) if hops[k][0] == row)
                hops[i:last + 1] = [(row, hops[i][1], hops[last][2])]
                break
            first[row] = j
        else:
            return hops

"""The route planner against brute-force enumeration over many small random swarms."""

from __future__ import annotations

import random

import pytest

from layerchain.errors import ConfigError, NoRoute
from layerchain.routing import (
    RouteLimits,
    RoutePeer,
    check_route,
    pareto_front,
    plan_route,
    plan_span,
)
from layerchain.types import Hop

TOL = 1e-9


# --- an independent reference: every route, scored by hand ---------------------------


def all_routes(peers, start, end, exclude=()):
    """Every valid route over [start, end): contiguous, inside spans, no peer twice."""
    usable = [p for p in peers if p.id not in set(exclude)]
    out = []

    def walk(at, used, hops):
        if at == end:
            out.append(tuple(hops))
            return
        for p in usable:
            if p.id in used or not (p.start <= at < p.end):
                continue
            for b in range(at + 1, min(p.end, end) + 1):
                walk(b, used | {p.id}, hops + [Hop(p.id, at, b)])

    walk(start, frozenset(), [])
    return out


def score(route, peers, alpha, mode="client", peer_rtts=None):
    """(latency, price, cost), computed without the package's helpers."""
    by_id = {p.id: p for p in peers}
    lat = price = 0.0
    for i, hop in enumerate(route):
        p = by_id[hop.peer_id]
        n = hop.end - hop.start
        lat += n * p.ms_per_block + p.queue_ms
        price += n * p.price_per_block
        if mode == "client":
            lat += p.rtt_ms
        elif i == 0:
            lat += p.rtt_ms / 2
        else:
            q = by_id[route[i - 1].peer_id]
            rtts = peer_rtts or {}
            rtt = rtts.get((q.id, p.id), rtts.get((p.id, q.id), q.rtt_ms + p.rtt_ms))
            lat += rtt / 2
    if mode == "push":
        lat += by_id[route[-1].peer_id].rtt_ms / 2
    return lat, price, alpha * price + (1 - alpha) * lat


def meets(lat, price, max_price, max_lat):
    return (max_price is None or price <= max_price + TOL) and (
        max_lat is None or lat <= max_lat + TOL
    )


def frontier(points):
    """Non-dominated (lat, price) points, sorted by latency."""
    pts = sorted(set(points))
    out, best_price = [], float("inf")
    for lat, price in pts:
        if price < best_price - TOL:
            out.append((lat, price))
            best_price = price
    return out


def random_swarm(rng, covered=True):
    """2-6 peers over 3-8 blocks; values are multiples of 0.5 so sums are exact; some
    peers are busy (a queueing delay per hop)."""
    blocks = rng.randint(3, 8)
    peers = []
    for i in range(rng.randint(2, 6)):
        s = rng.randrange(blocks)
        e = rng.randint(s + 1, blocks)
        peers.append(RoutePeer(f"p{i}", s, e, rng.randint(0, 8) / 2, rng.randint(0, 8) / 2,
                               rng.randint(0, 10) / 2, rng.choice([0.0, 0.0, 0.5, 3.0])))
    if covered and rng.random() < 0.8:  # a long peer so most swarms have a route
        peers.append(RoutePeer("long", 0, blocks, rng.randint(0, 12) / 2, rng.randint(0, 8) / 2,
                               rng.randint(0, 10) / 2))
    return peers, blocks


def random_limits(rng, routes, peers):
    """None, or a limit near an achievable value (sometimes just below it)."""
    def pick(i):
        if rng.random() < 0.4 or not routes:
            return None
        value = score(rng.choice(routes), peers, 0.0)[i]
        return max(0.0, value + rng.choice([0.0, 0.0, -0.5, 0.5, 2.0]))
    return pick(1), pick(0)


# --- the planner agrees with brute force ---------------------------------------------


@pytest.mark.parametrize("mode", ["client", "push"])
def test_plan_route_matches_brute_force(mode):
    rng = random.Random(4 if mode == "client" else 5)
    checked = {"routes": 0, "noroute": 0}
    for _ in range(300 if mode == "client" else 150):
        peers, blocks = random_swarm(rng)
        alpha = rng.choice([0.0, 1.0, 0.5, rng.random()])
        routes = all_routes(peers, 0, blocks)
        peer_rtts = None
        if mode == "push":
            ids = [p.id for p in peers]
            peer_rtts = {(a, b): rng.randint(0, 10) / 2 for a in ids for b in ids
                         if a < b and rng.random() < 0.6}
        max_price, max_lat = random_limits(rng, routes, peers)
        scored = [(score(r, peers, alpha, mode, peer_rtts), r) for r in routes]
        feasible = [(s, r) for s, r in scored if meets(s[0], s[1], max_price, max_lat)]
        if not feasible:
            with pytest.raises(NoRoute):
                plan_route(peers, blocks, RouteLimits(alpha, max_price, max_lat), mode=mode,
                           peer_rtts=peer_rtts)
            checked["noroute"] += 1
            continue
        plan = plan_route(peers, blocks, RouteLimits(alpha, max_price, max_lat), mode=mode,
                           peer_rtts=peer_rtts)
        check_route(plan.hops, {p.id: p for p in peers}, 0, blocks)
        lat, price, cost = score(plan.hops, peers, alpha, mode, peer_rtts)
        terms = (plan.latency_ms, plan.price, plan.cost)
        assert terms == pytest.approx((lat, price, cost), abs=TOL)
        assert meets(lat, price, max_price, max_lat)
        assert cost == pytest.approx(min(s[2] for s, _ in feasible), abs=TOL)
        # ties are broken towards the frontier: no feasible route dominates the plan
        for (l2, p2, _), _r in feasible:
            better = l2 < lat - TOL or p2 < price - TOL
            assert not (l2 <= lat + TOL and p2 <= price + TOL and better)
        checked["routes"] += 1
    assert checked["routes"] > 100 and checked["noroute"] > 5  # both branches exercised


@pytest.mark.parametrize("mode", ["client", "push"])
def test_pareto_front_matches_brute_force(mode):
    rng = random.Random(7)
    for _ in range(200 if mode == "client" else 100):
        peers, blocks = random_swarm(rng)
        routes = all_routes(peers, 0, blocks)
        if not routes:
            continue
        peer_rtts = None
        if mode == "push":
            ids = [p.id for p in peers]
            peer_rtts = {(a, b): rng.randint(0, 10) / 2 for a in ids for b in ids if a < b}
        max_price, max_lat = random_limits(rng, routes, peers)
        points = [score(r, peers, 0.0, mode, peer_rtts)[:2] for r in routes]
        expected = frontier([pt for pt in points if meets(*pt, max_price, max_lat)])
        front = pareto_front(peers, blocks, RouteLimits(0.0, max_price, max_lat), mode=mode,
                             peer_rtts=peer_rtts)
        got = [x for f in front for x in (f.latency_ms, f.price)]
        assert got == pytest.approx([x for pt in expected for x in pt], abs=TOL)
        for plan in front:
            check_route(plan.hops, {p.id: p for p in peers}, 0, blocks)
            assert score(plan.hops, peers, 0.0, mode, peer_rtts)[:2] == pytest.approx(
                (plan.latency_ms, plan.price), abs=TOL)


def test_plan_span_with_exclusions_matches_brute_force():
    rng = random.Random(11)
    for _ in range(150):
        peers, blocks = random_swarm(rng)
        start = rng.randrange(blocks)
        end = rng.randint(start + 1, blocks)
        exclude = [p.id for p in peers if rng.random() < 0.25]
        alpha = rng.random()
        routes = all_routes(peers, start, end, exclude)
        if not routes:
            with pytest.raises(NoRoute):
                plan_span(peers, blocks, start, end, RouteLimits(alpha), exclude=exclude)
            continue
        plan = plan_span(peers, blocks, start, end, RouteLimits(alpha), exclude=exclude)
        check_route(plan.hops, {p.id: p for p in peers}, start, end)
        assert not set(plan.peer_ids) & set(exclude)
        assert plan.cost == pytest.approx(min(score(r, peers, alpha)[2] for r in routes), abs=TOL)


def test_a_peer_twice_would_be_cheaper_but_is_not_allowed():
    # slow p around fast q: the relaxed DP wants p, q, p (latency 22); the answer is p alone
    peers = [RoutePeer("p", 0, 3, 10.0, 0.0, 1.0), RoutePeer("q", 1, 2, 0.0, 0.0, 0.0)]
    plan = plan_route(peers, 3)
    assert plan.hops == (Hop("p", 0, 3),)
    assert plan.latency_ms == 31.0
    # with a third peer covering the tail, p + q + r beats p alone
    peers.append(RoutePeer("r", 2, 3, 1.0, 0.0, 1.0))
    assert plan_route(peers, 3).peer_ids == ("p", "q", "r")


def test_alpha_moves_along_the_frontier():
    peers = [
        RoutePeer("fast", 0, 4, 1.0, 5.0, 1.0),  # latency 5, price 20
        RoutePeer("cheap", 0, 4, 10.0, 0.5, 20.0),  # latency 60, price 2
    ]
    assert plan_route(peers, 4, RouteLimits(alpha=0.0)).peer_ids == ("fast",)
    assert plan_route(peers, 4, RouteLimits(alpha=1.0)).peer_ids == ("cheap",)
    # within 10 credits the fastest mix is one block on "fast", three on "cheap"
    limited = plan_route(peers, 4, RouteLimits(alpha=0.0, max_price=10))
    assert limited.hops == (Hop("fast", 0, 1), Hop("cheap", 1, 4))
    assert (limited.latency_ms, limited.price) == (52.0, 6.5)
    front = [(f.latency_ms, f.price) for f in pareto_front(peers, 4)]
    assert front[0] == (5.0, 20.0) and front[-1] == (60.0, 2.0) and (52.0, 6.5) in front
    assert all(a[0] < b[0] and a[1] > b[1] for a, b in zip(front, front[1:]))


# --- NoRoute and bad input --------------------------------------------------------------


def test_uncovered_blocks_are_named():
    peers = [RoutePeer("a", 0, 12, 1.0, 1.0, 1.0), RoutePeer("b", 15, 30, 1.0, 1.0, 1.0)]
    with pytest.raises(NoRoute, match=r"^blocks 12:15 have no peer$"):
        plan_route(peers, 30)
    with pytest.raises(NoRoute, match=r"^block 29 has no peer$"):
        plan_route([RoutePeer("a", 0, 29, 1.0, 1.0, 1.0)], 30)
    excluded = r"^blocks 0:12 have no peer \(1 excluded peer not counted\)$"
    with pytest.raises(NoRoute, match=excluded):
        plan_route(peers + [RoutePeer("c", 12, 15, 1.0, 1.0, 1.0)], 30, exclude=["a"])


def test_price_limit_too_low_names_the_cheapest():
    peers = [RoutePeer("a", 0, 10, 3.0, 1.4, 5.0), RoutePeer("b", 0, 10, 1.0, 2.0, 1.0)]
    with pytest.raises(NoRoute) as info:
        plan_route(peers, 10, RouteLimits(max_price=10))
    assert str(info.value) == "no route within max_price 10: the cheapest costs 14 (latency 35 ms)"


def test_latency_limit_too_low_names_the_fastest():
    peers = [RoutePeer("a", 0, 10, 3.0, 1.4, 5.0), RoutePeer("b", 0, 10, 1.0, 2.0, 1.0)]
    with pytest.raises(NoRoute) as info:
        plan_route(peers, 10, RouteLimits(max_latency_ms=8))
    assert str(info.value) == "no route within max_latency_ms 8: the fastest takes 11 ms (price 20)"


def test_limits_met_one_at_a_time_but_not_together():
    peers = [RoutePeer("a", 0, 10, 3.0, 1.4, 5.0), RoutePeer("b", 0, 10, 1.0, 2.0, 1.0)]
    with pytest.raises(NoRoute) as info:
        plan_route(peers, 10, RouteLimits(max_price=15, max_latency_ms=20))
    message = str(info.value)
    assert "max_price 15 and max_latency_ms 20" in message
    # mixes: a on 2 blocks + b on 8 (latency 20, price 18.8); b on 1 + a on 9 (34 ms, 15)
    assert "the cheapest costs 18.8" in message and "the fastest takes 34 ms" in message


@pytest.mark.parametrize(
    "call",
    [
        lambda p: plan_route(p, 10, RouteLimits(alpha=1.5)),
        lambda p: plan_route(p, 10, 0.5),  # a bare alpha, not a RouteLimits
        lambda p: plan_route(p, 10, RouteLimits(max_price=-1)),
        lambda p: plan_route(p, 10, RouteLimits(max_latency_ms=float("nan"))),
        lambda p: plan_route(p, 10, RouteLimits(alpha=True)),
        lambda p: plan_route(p, 0),
        lambda p: plan_route(p, 5),  # peer a serves 0:10
        lambda p: plan_route(p + p, 10),
        lambda p: plan_route(p, 10, mode="carrier-pigeon"),
        lambda p: plan_span(p, 10, 4, 4),
    ],
)
def test_bad_arguments_raise_config_error(call):
    with pytest.raises(ConfigError):
        call([RoutePeer("a", 0, 10, 1.0, 1.0, 1.0)])


def test_bad_peer_records_raise_config_error():
    with pytest.raises(ConfigError):
        RoutePeer("a", 5, 5, 1.0, 1.0, 1.0)
    with pytest.raises(ConfigError):
        RoutePeer("a", 0, 5, -1.0, 1.0, 1.0)
    with pytest.raises(ConfigError):
        RoutePeer("a", 0, 5, 1.0, float("nan"), 1.0)


# --- the planner cannot be steered outside the model (issue 12.2) ---------------------


@pytest.mark.parametrize("field,value", [
    ("ms_per_block", 1e308), ("ms_per_block", float("inf")), ("price_per_block", 1e300),
    ("rtt_ms", 1e200), ("ms_per_block", -1.0), ("ms_per_block", True),
])
def test_costs_are_bounded_before_planning(field, value):
    # 1e308 ms per block was finite, so it passed; two blocks of it overflowed to inf and
    # the relaxed DP's inf - inf = NaN planned a route starting at block -1.
    values = dict(id="huge", start=0, end=8, ms_per_block=1.0, price_per_block=1.0, rtt_ms=1.0)
    with pytest.raises(ConfigError, match=field):
        RoutePeer(**{**values, field: value})


def test_peer_to_peer_rtts_are_bounded_too():
    peers = [RoutePeer("a", 0, 4, 1.0, 1.0, 1.0), RoutePeer("b", 4, 8, 1.0, 1.0, 1.0)]
    for rtt in (1e308, float("inf"), float("nan"), -1.0):
        with pytest.raises(ConfigError, match="peer_rtts"):
            plan_route(peers, 8, mode="push", peer_rtts={("a", "b"): rtt})


def test_extreme_but_allowed_costs_plan_a_valid_route():
    from layerchain.routing.route import MAX_MS_PER_BLOCK, MAX_PRICE_PER_BLOCK, MAX_RTT_MS

    blocks = 200
    peers = [RoutePeer("slow", 0, blocks, MAX_MS_PER_BLOCK, MAX_PRICE_PER_BLOCK, MAX_RTT_MS),
             RoutePeer("a", 0, 120, 1.0, 1.0, 1.0), RoutePeer("b", 100, blocks, 1.0, 1.0, 1.0)]
    for alpha in (0.0, 0.5, 1.0):
        plan = plan_route(peers, blocks, RouteLimits(alpha))
        check_route(plan.hops, {p.id: p for p in peers}, 0, blocks)
        assert "slow" not in plan.peer_ids
    only = plan_route(peers[:1], blocks, RouteLimits(0.5))
    assert only.hops == (Hop("slow", 0, blocks),)
    assert only.latency_ms == MAX_RTT_MS + blocks * MAX_MS_PER_BLOCK


def test_a_route_breaking_the_rules_is_a_typed_bug_report_not_a_route(monkeypatch):
    from layerchain.errors import InvalidPlan
    from layerchain.routing import planner
    from layerchain.routing.route import RoutePlan

    peers = [RoutePeer("a", 0, 4, 1.0, 1.0, 1.0), RoutePeer("b", 2, 8, 1.0, 1.0, 1.0)]
    bad_routes = [
        (Hop("a", -1, 4), Hop("b", 4, 8)),  # starts before the model (the NaN route)
        (Hop("a", 0, 3), Hop("b", 4, 8)),  # a gap
        (Hop("a", 0, 5), Hop("b", 5, 8)),  # a hop outside its peer's span
        (Hop("a", 0, 4), Hop("b", 4, 7)),  # stops short of the last block
        (Hop("a", 0, 2), Hop("b", 2, 4), Hop("a", 4, 4)),
    ]
    for hops in bad_routes:
        monkeypatch.setattr(planner._Planner, "best",
                            lambda self, *limits, hops=hops: RoutePlan(hops, 1.0, 1.0, 1.0))
        with pytest.raises(InvalidPlan, match="planner bug"):
            plan_route(peers, 8)


# --- the default price cap (issue 12.15) ----------------------------------------------------


def test_median_block_prices_and_the_default_cap():
    from layerchain.routing import default_max_price, median_block_prices

    peers = [RoutePeer("a", 0, 4, 1.0, 1.0, 1.0), RoutePeer("b", 0, 4, 1.0, 3.0, 1.0),
             RoutePeer("greedy", 0, 6, 0.1, 1000.0, 1.0), RoutePeer("c", 4, 6, 1.0, 2.0, 1.0)]
    prices = median_block_prices(peers, 7)
    assert prices == (3.0, 3.0, 3.0, 3.0, 501.0, 501.0, 0.0)  # block 6: nobody, 0
    assert default_max_price(prices, 0, 4, 4.0) == 4 * 12.0
    assert default_max_price(prices, 2, 3, 2.0) == 6.0
    for bad in (0.5, float("inf"), float("nan"), "4"):
        with pytest.raises(ConfigError, match="max_price_multiple"):
            default_max_price(prices, 0, 4, bad)


# --- planning stays fast: the shortcuts change no answer (issue 16.5) ----------------


def test_undominated_drops_only_peers_with_a_kept_dominator():
    import numpy as np

    from layerchain.bench.routing import random_swarm
    from layerchain.routing.relaxed import PeerArrays, relaxed_forward

    peers = random_swarm(400, 24, seed=1)
    peers += [RoutePeer("twin-" + p.id, p.start, p.end, p.ms_per_block, p.price_per_block,
                        p.rtt_ms) for p in peers[:20]]  # exact ties: one of each pair stays
    arr = PeerArrays.build(peers, 0, 24)
    kept = arr.undominated()
    assert 0 < len(kept) < len(peers) // 2
    kept_set = set(kept.tolist())
    for i in set(range(len(peers))) - kept_set:
        dominators = [j for j in kept_set if arr.s[j] <= arr.s[i] and arr.e[j] >= arr.e[i]
                      and arr.rtt[j] <= arr.rtt[i] and arr.ms[j] <= arr.ms[i]
                      and arr.pr[j] <= arr.pr[i]]
        assert dominators, f"peer {peers[i].id} was dropped with no kept dominator"
    core = arr.subset(kept)
    rng = random.Random(2)
    for _ in range(10):  # any weighting: the same relaxed optimum at every boundary
        lat_w, price_w = rng.random(), rng.random()
        full = relaxed_forward(arr, lat_w * arr.rtt, price_w * arr.pr + lat_w * arr.ms).best
        pruned = relaxed_forward(core, lat_w * core.rtt, price_w * core.pr + lat_w * core.ms).best
        assert np.allclose(full, pruned, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kind", ["none", "price", "latency", "both"])
def test_shortcuts_plan_what_the_plain_exact_search_plans(kind, monkeypatch):
    """Pruned peers, the lean DP, cutting-plane multipliers and fan pruning are exact:
    over mid-sized swarms (too large for brute force) they find routes of the same cost,
    latency and price as the planner with every shortcut turned off."""
    import numpy as np

    from layerchain.bench.routing import _limits_for, random_swarm
    from layerchain.routing import relaxed, search

    cases = []
    for seed in range(6):
        swarm = random_swarm(250, 16, seed=100 + seed)
        for alpha in (0.0, 0.5, 1.0):
            limits = RouteLimits(alpha, *_limits_for(swarm, 16, alpha, kind))
            cases.append((swarm, limits, plan_route(swarm, 16, limits)))
    monkeypatch.setattr(relaxed.PeerArrays, "undominated", lambda self: np.arange(len(self.peers)))
    monkeypatch.setattr(search._Search, "prunes", lambda self: False)
    for swarm, limits, plan in cases:
        plain = plan_route(swarm, 16, limits)
        assert (plan.cost, plan.latency_ms, plan.price) == pytest.approx(
            (plain.cost, plain.latency_ms, plain.price), rel=1e-9, abs=1e-9)


# --- the relaxed DP and the fast search against plain references (issue 16.5) --------


def _float_swarm(rng, peers=6, blocks=6):
    """Random float costs (no accidental ties), some duplicated exactly (real ties)."""
    out = []
    for i in range(rng.randint(2, peers)):
        s = rng.randrange(blocks)
        e = rng.randint(s + 1, blocks)
        out.append(RoutePeer(f"f{i}", s, e, rng.uniform(0, 5), rng.uniform(0, 3),
                             rng.uniform(0, 6), rng.choice([0.0, 0.0, rng.uniform(0, 2)])))
    if rng.random() < 0.3:
        twin = rng.choice(out)
        out.append(RoutePeer("twin", twin.start, twin.end, twin.ms_per_block,
                             twin.price_per_block, twin.rtt_ms, twin.queue_ms))
    out.append(RoutePeer("long", 0, blocks, rng.uniform(0, 6), rng.uniform(0, 3),
                         rng.uniform(0, 6)))
    return out, blocks


def test_relaxed_dp_matches_a_plain_dp_over_every_hop():
    """The flat-layout DP (complex tie-breaker, hop starts found again afterwards) gives
    the minimum of a plain DP over every hop (a, b, p), and a route of exactly that cost."""
    import numpy as np

    from layerchain.routing.relaxed import PeerArrays, relaxed_cost_to_go, relaxed_forward

    rng = random.Random(21)
    for _ in range(150):
        peers, blocks = _float_swarm(rng, peers=9, blocks=8)
        if rng.random() < 0.5:  # half-integer costs: many exact ties
            peers = [RoutePeer(p.id, p.start, p.end, round(p.ms_per_block * 2) / 2,
                               round(p.price_per_block * 2) / 2, round(p.rtt_ms * 2) / 2)
                     for p in peers]
        arr = PeerArrays.build(peers, 0, blocks)
        fixed, w = rng.random() * arr.rtt, rng.random() * arr.pr + rng.random() * arr.ms
        second = (arr.rtt, arr.ms) if rng.random() < 0.5 else (np.zeros_like(arr.rtt), arr.pr)
        plain = [0.0] + [np.inf] * blocks  # min over hops, lexicographic with the second cost
        plain2 = [0.0] + [np.inf] * blocks
        for b in range(1, blocks + 1):
            for p in range(len(peers)):
                for a in range(int(arr.s[p]), min(b, int(arr.e[p]))):
                    if b > arr.e[p]:
                        continue
                    cand = (plain[a] + fixed[p] + (b - a) * w[p],
                            plain2[a] + second[0][p] + (b - a) * second[1][p])
                    if cand < (plain[b], plain2[b]):
                        plain[b], plain2[b] = cand
        for tie_break in (False, True):
            result = (relaxed_forward(arr, fixed, w, *second) if tie_break
                      else relaxed_forward(arr, fixed, w))
            assert result.best == pytest.approx(plain, rel=1e-12, abs=1e-9)
            hops = result.hops()
            at = 0
            cost = cost2 = 0.0
            for p, a, b in hops:  # contiguous, inside spans, summing to the DP's values
                assert a == at and arr.s[p] <= a < b <= arr.e[p]
                cost += fixed[p] + (b - a) * w[p]
                cost2 += second[0][p] + (b - a) * second[1][p]
                at = b
            assert at == blocks and cost == pytest.approx(plain[-1], rel=1e-12, abs=1e-9)
            if tie_break:  # among routes of the least cost, the least secondary cost
                assert cost2 == pytest.approx(plain2[-1], rel=1e-12, abs=1e-9)
        back = [np.inf] * blocks + [0.0]  # the cost-to-go, by a plain backward DP
        for a in range(blocks - 1, -1, -1):
            for p in range(len(peers)):
                if arr.s[p] <= a < arr.e[p]:
                    for b in range(a + 1, int(arr.e[p]) + 1):
                        back[a] = min(back[a], back[b] + fixed[p] + (b - a) * w[p])
        assert relaxed_cost_to_go(arr, fixed, w) == pytest.approx(back, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("where", ["random", "reference"])
def test_plan_route_matches_brute_force_on_float_costs(where):
    """Limits from a random route, or (as ``bench routing`` takes them) from the route
    planned at another alpha, where the dual's bound meets its incumbent and stops early:
    the planner's cost is brute force's, and no feasible route dominates its plan."""
    rng = random.Random(31 if where == "random" else 32)
    planned = 0
    for _ in range(120):
        peers, blocks = _float_swarm(rng)
        routes = all_routes(peers, 0, blocks)
        alpha = rng.choice([0.0, 1.0, 0.5, rng.random()])
        if where == "random":
            pick = score(rng.choice(routes), peers, 0.0)
            max_price = pick[1] if rng.random() < 0.7 else None
            max_lat = pick[0] if max_price is None or rng.random() < 0.4 else None
        else:
            ref = plan_route(peers, blocks, RouteLimits(rng.choice([0.25, 0.5, 0.75])))
            max_price, max_lat = rng.choice([(ref.price, None), (None, ref.latency_ms),
                                             (ref.price, ref.latency_ms * 1.1)])
        feasible = [s for s in (score(r, peers, alpha) for r in routes)
                    if meets(s[0], s[1], max_price, max_lat)]
        plan = plan_route(peers, blocks, RouteLimits(alpha, max_price, max_lat))
        lat, price, cost = score(plan.hops, peers, alpha)
        assert meets(lat, price, max_price, max_lat)
        assert cost == pytest.approx(min(s[2] for s in feasible), rel=1e-9, abs=1e-9)
        for l2, p2, _ in feasible:
            assert not (l2 <= lat - 1e-9 and p2 <= price + 1e-9
                        or l2 <= lat + 1e-9 and p2 <= price - 1e-9)
        planned += 1
    assert planned == 120


def test_least_hop_of_each_pair_is_the_minimum_over_its_ends():
    """``search._least_hops`` (a suffix minimum by doubling, for all rows at once) equals
    the least cost over every end of each (boundary, peer) pair, within its margin."""
    import numpy as np

    from layerchain.routing.relaxed import PeerArrays
    from layerchain.routing.search import Bounds, _least_hops

    rng = random.Random(41)
    for _ in range(40):
        peers, blocks = _float_swarm(rng, peers=12, blocks=rng.randint(1, 19))
        arr = PeerArrays.build(peers, 0, blocks)
        h = np.array(sorted((rng.uniform(0, 50) for _ in range(blocks)), reverse=True) + [0.0])
        bounds = Bounds(latency=h * 0, price=h * 0, cost=h)
        lat_w, price_w, push = rng.random(), rng.random(), rng.random() < 0.5
        rows = np.array(sorted(rng.sample(range(len(peers)), rng.randint(1, len(peers)))))
        span = arr.e[rows] - arr.s[rows]
        pair_rows = np.repeat(rows, span)
        pair_b = np.concatenate([np.arange(arr.s[r], arr.e[r]) for r in rows])
        least, slack = _least_hops(arr, bounds, push, lat_w, price_w, span, pair_rows, pair_b)
        fixed = lat_w * arr.fixed_ms(push)
        w = price_w * arr.pr + lat_w * arr.ms
        for k, (p, b) in enumerate(zip(pair_rows.tolist(), pair_b.tolist())):
            want = min(fixed[p] + (x - b) * w[p] + h[x] for x in range(b + 1, arr.e[p] + 1))
            assert abs(least[k] - want) <= slack[k]
            assert slack[k] < 1e-6

"""The market simulation's world and its SimPy processes (issue 17.4; paper §3.3-3.4).

What is simulated. ``nodes`` servers of a model of ``blocks`` blocks, each with its own
compute cost (ms per block per token, log-normal), round trip to clients (ms, log-normal)
and memory (most blocks it holds: 1/40 .. 1/5 of the model). Time runs in *rounds* (one
re-pricing period of a node; SimPy time unit 1.0). Every node is one SimPy process that
wakes once a round at its own phase (so nodes act one after another, each on the state the
earlier ones left) and

* re-prices with the REAL policy (``layerchain.market.pricing``): ``next_price`` over the
  offers of ``competitors`` peers overlapping its span (what a bounded DHT read of its
  blocks returns; fixed until it or they move or leave), under the clients' ``Demand``;
* every ``rebalance_every`` rounds checks ``layerchain.market.placement.plan_move`` on the
  swarm's per-block capacity (this node included) and moves at once when it says so.

Clients are one SimPy process issuing ``requests_per_round`` requests a round (Poisson
arrivals). Each draws alpha from the demand's distribution (a ``price_capped_share`` of
them also a price cap: the swarm's default cap, ``routing.default_max_price`` at 1x) and is
routed by the REAL planner (``layerchain.routing.plan_route``) over the candidates a DHT
lookup would give it: ``candidates_per_block`` random servers of every block, not all
10,000 nodes. Each hop of the route is paid ``blocks * price * tokens_per_request``.

Churn: at ``churn_round`` (default 2/3 of the run) a fraction ``churn`` of the nodes leaves,
*correlated*: the nodes whose spans sit nearest one random block (a region or a hoster going
down), which leaves blocks with few or no servers; a random 20% would only thin every block
evenly. The
survivors recover coverage through the same ``plan_move`` (an empty block is the largest
share a node can get).

Simplified, on purpose: no queueing (a peer's ``queue_ms`` is 0: load does not push
clients away from the fastest peers), state changes are seen by everyone at once (no DHT
delay), a move takes no time (no weight download, no draining), nodes never fail
mid-route, and the seed fixes everything (same seed, same numbers).

Measures: a monitor process records, at the end of every round, each block's mean price and
capacity, the price change, coverage, moves and requests without a route; revenue is counted
over the second half of the rounds before the churn (prices settled, the swarm whole).

The world is plain mutable state behind ``Market``; ``simulate`` runs the processes and
returns a frozen ``Trace`` of numbers per round; ``layerchain.market.sim.summary`` turns it
into the summary, ``plots`` into the figures.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import simpy

from layerchain.errors import ConfigError, NoRoute, RoutingError
from layerchain.market.placement import block_capacity, plan_move, server_throughput
from layerchain.market.pricing import (
    Demand,
    Offer,
    PricingPolicy,
    expected_revenue,
    pricing_policy,
)
from layerchain.routing import (
    RouteLimits,
    RoutePeer,
    default_max_price,
    median_block_prices,
    plan_route,
)
from layerchain.types import Span

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Progress = Callable[[str], None]

#: When in its round the churn strikes: after the monitor has recorded the round before,
#: before any node acts (nodes act at phases in [0.001, 0.999)).
CHURN_OFFSET = 0.0005


@dataclass(frozen=True)
class SimConfig:
    """One simulation; checked on construction (ConfigError naming the field)."""

    nodes: int = 10_000  # nodes at the start
    blocks: int = 80  # blocks of the model
    rounds: int = 30  # rounds simulated (one re-pricing period each)
    seed: int = 0  # everything random derives from it
    churn: float = 0.2  # fraction of nodes that leave at churn_round (0: no churn)
    churn_round: int | None = None  # round the churn happens (None: 2/3 of the rounds)
    pricing: str = "adaptive"  # nodes' pricing policy (market.pricing.pricing_policy)
    start_price: float = 15.0  # median start price, credits per block per token (x0.5 .. x1.5)
    compute_ms: float = 8.0  # median compute cost, ms per block per token (log-normal, sigma .5)
    rtt_ms: float = 30.0  # median round trip client <-> node, ms (log-normal, sigma .5)
    requests_per_round: int = 40  # client requests routed by the planner per round
    tokens_per_request: int = 32  # tokens each request pays every hop for
    candidates_per_block: int = 4  # servers per block one client's DHT lookup returns
    competitors: int = 16  # peers overlapping its span a node prices against
    rebalance_every: int = 8  # rounds between two placement checks of one node
    move_threshold: float = 0.2  # plan_move's hysteresis: relative gain a move must beat
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # clients' alpha values ...
    alpha_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)  # ... and their shares
    temperature: float = 1.0  # Boltzmann temperature of the demand nodes price against
    price_capped_share: float = 0.25  # share of requests with a price cap
    convergence_tol: float = 0.01  # a round whose price change is below this is "still"

    def __post_init__(self) -> None:
        ints = {"nodes": (2, 1_000_000), "blocks": (1, 10_000), "rounds": (2, 100_000),
                "requests_per_round": (0, 1_000_000), "tokens_per_request": (1, 1_000_000),
                "candidates_per_block": (1, 10_000), "competitors": (1, 10_000),
                "rebalance_every": (1, 100_000)}
        for name, (low, high) in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer in [{low}, {high}], not {value!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise ConfigError(f"seed must be an integer, not {self.seed!r}")
        fractions = ("churn", "price_capped_share", "move_threshold", "convergence_tol")
        for name in fractions:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ConfigError(f"{name} must be a number in [0, 1), not {value!r}")
        for name in ("start_price", "compute_ms", "rtt_ms", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, not {value!r}")
        if self.churn_round is not None and not 1 <= self.churn_round < self.rounds:
            raise ConfigError(f"churn_round must be in [1, {self.rounds}), not {self.churn_round}")
        if (len(self.alphas) != len(self.alpha_weights) or not self.alphas
                or any(not 0.0 <= a <= 1.0 for a in self.alphas)
                or any(w < 0 for w in self.alpha_weights)
                or abs(sum(self.alpha_weights) - 1.0) > 1e-9):
            raise ConfigError("alphas must be in [0, 1] with one weight each, weights summing to 1")

    @property
    def churn_at(self) -> int | None:
        """The round the churn happens, or None without churn."""
        if self.churn == 0:
            return None
        return (2 * self.rounds) // 3 if self.churn_round is None else self.churn_round

    @property
    def demand(self) -> Demand:
        """The client population the nodes price against (the same one the clients are)."""
        return Demand(self.alphas, self.alpha_weights, self.temperature)


class Market:
    """The simulated swarm: per-node state in lists indexed by node, per-block server sets,
    per-block capacity (tokens/s, ``placement.block_capacity``'s unit). Mutated by the
    processes of ``simulate``; nothing here keeps time."""

    def __init__(self, config: SimConfig, policy: PricingPolicy) -> None:
        self.config, self.policy, self.demand = config, policy, config.demand
        n, num_blocks = config.nodes, config.blocks
        self.rng = random.Random(config.seed)
        draw = np.random.default_rng(config.seed)
        # node attributes, [n] each: compute ms per block, client RTT ms, most blocks held
        self.ms = np.clip(config.compute_ms * draw.lognormal(0.0, 0.5, n), 0.5, 1000.0).tolist()
        self.rtt = np.clip(config.rtt_ms * draw.lognormal(0.0, 0.5, n), 1.0, 2000.0).tolist()
        fractions = draw.choice([1 / 40, 1 / 20, 1 / 10, 1 / 5], size=n)
        self.max_blocks = [max(1, min(num_blocks, round(num_blocks * f))) for f in fractions]
        self.price = (config.start_price * draw.uniform(0.5, 1.5, n)).tolist()
        self.phase = draw.uniform(0.001, 0.999, n).tolist()  # when in a round a node acts
        self.alive = [True] * n
        self.start = [0] * n
        self.end = [0] * n
        self.revenue = [0.0] * n  # credits earned since the revenue window opened
        self.offers = [Offer(p, m) for p, m in zip(self.price, self.ms)]
        self.peers: list[RoutePeer | None] = [None] * n  # planner records, None: stale
        self.competitors: list[list[int]] = [[] for _ in range(n)]
        self.capacity = np.zeros(num_blocks)  # [blocks] tokens/s, kept up to date on moves
        self.members: list[list[int]] = [[] for _ in range(num_blocks)]  # servers per block
        self.slot: list[dict[int, int]] = [{} for _ in range(num_blocks)]  # node -> index
        self.moves = 0
        self.requests = self.failed = 0
        self.revenue_open = False
        # the "before" placement: every node picks a random span of its size (as operators
        # giving --blocks by hand do today); blocks near the ends get fewer servers
        for i in range(n):
            length = self.max_blocks[i]
            first = int(draw.integers(0, num_blocks - length + 1))
            self.place(i, Span(first, first + length))

    # -- placement -------------------------------------------------------------------------

    def place(self, i: int, span: Span) -> None:
        """Node ``i`` serves ``span`` (it served nothing)."""
        self.start[i], self.end[i] = span.start, span.end
        self.peers[i] = None
        self.capacity[span.start:span.end] += server_throughput(self.ms[i], span.length)
        for b in range(span.start, span.end):
            self.slot[b][i] = len(self.members[b])
            self.members[b].append(i)

    def unplace(self, i: int) -> None:
        """Node ``i`` stops serving its span (O(span) swap-removes)."""
        s, e = self.start[i], self.end[i]
        self.capacity[s:e] -= server_throughput(self.ms[i], e - s)
        for b in range(s, e):
            members, slot = self.members[b], self.slot[b]
            at, last = slot.pop(i), members.pop()
            if last != i:
                members[at], slot[last] = last, at
        self.competitors[i] = []

    def exact_capacity(self) -> tuple[float, ...]:
        """Per-block capacity recomputed by ``placement.block_capacity`` from every live
        server (the reported figure; also resets the running sums' float drift)."""
        servers = [(Span(self.start[i], self.end[i]), self.ms[i])
                   for i in range(self.config.nodes) if self.alive[i]]
        exact = block_capacity(servers, self.config.blocks)
        self.capacity = np.array(exact, dtype=np.float64)
        return exact

    def rebalance(self, i: int) -> bool:
        """Node ``i`` asks ``plan_move``; moves when told to. True if it moved."""
        current = Span(self.start[i], self.end[i])
        target = plan_move(self.capacity.tolist(), current, self.ms[i], self.max_blocks[i],
                           self.config.move_threshold)
        if target is None or target == current:
            return False
        self.unplace(i)
        self.place(i, target)
        self.moves += 1
        return True

    def leave(self, i: int) -> None:
        self.unplace(i)
        self.alive[i] = False

    # -- pricing ---------------------------------------------------------------------------

    def _refresh_competitors(self, i: int) -> list[int]:
        """Up to ``competitors`` live peers overlapping node ``i``'s span: kept while they
        still overlap, topped up with random servers of its blocks when fewer than half
        remain (a node re-reads the DHT for its blocks)."""
        s, e = self.start[i], self.end[i]
        kept = [j for j in self.competitors[i]
                if self.alive[j] and self.start[j] < e and s < self.end[j]]
        want = self.config.competitors
        if len(kept) * 2 < want:
            seen, tries = set(kept), 0
            seen.add(i)
            while len(kept) < want and tries < 4 * want:
                tries += 1
                members = self.members[self.rng.randrange(s, e)]
                j = members[self.rng.randrange(len(members))]
                if j not in seen:
                    seen.add(j)
                    kept.append(j)
        self.competitors[i] = kept
        return kept

    def reprice(self, i: int) -> None:
        """Node ``i`` sets its next price with the pricing policy over its offers (its own
        first: index 0)."""
        rivals = self._refresh_competitors(i)
        offers = [self.offers[i], *(self.offers[j] for j in rivals)]
        price = self.policy.next_price(0, offers, self.demand)
        if price != self.price[i]:
            self.price[i] = price
            self.offers[i] = Offer(price, self.ms[i])
            self.peers[i] = None

    def best_response(self, i: int, step: float = 0.05) -> bool:
        """Paper eq. 6 for node ``i``: no price ``step`` (a fraction) higher or lower earns
        it more expected revenue against its competitors as they stand."""
        rivals = [self.offers[j] for j in self._refresh_competitors(i)]
        price, ms = self.price[i], self.ms[i]
        here, lower, higher = (
            expected_revenue(0, [Offer(price * f, ms), *rivals], self.demand)
            for f in (1.0, 1.0 - step, 1.0 + step))
        return here >= max(lower, higher)

    def expected_revenue(self, i: int) -> float:
        """The pricing model's ``R`` of node ``i`` against its competitors (eq. 2)."""
        rivals = self._refresh_competitors(i)
        return expected_revenue(0, [self.offers[i], *(self.offers[j] for j in rivals)],
                                self.demand)

    # -- clients ---------------------------------------------------------------------------

    def candidates(self, rng: random.Random) -> list[RoutePeer]:
        """What one client's DHT lookup gives it: up to ``candidates_per_block`` random
        servers of every block, as planner peers."""
        k, chosen = self.config.candidates_per_block, set()
        for members in self.members:
            if len(members) <= k:
                chosen.update(members)
            else:
                chosen.update(rng.sample(members, k))
        return [self.route_peer(j) for j in sorted(chosen)]

    def route_peer(self, j: int) -> RoutePeer:
        """Node ``j``'s record as the planner reads it (built once per price or span)."""
        peer = self.peers[j]
        if peer is None:
            peer = RoutePeer(f"n{j}", self.start[j], self.end[j], self.ms[j], self.price[j],
                             self.rtt[j])
            self.peers[j] = peer
        return peer

    def serve_request(self, rng: random.Random) -> tuple[float, float, float] | None:
        """One client request: plan over a lookup's candidates with a drawn alpha (and a
        price cap for some), pay the hops. ``(alpha, price, latency_ms)`` of the route, or
        None when no route was found (uncovered blocks or a cap no route meets)."""
        config = self.config
        alpha = rng.choices(config.alphas, weights=config.alpha_weights)[0]
        peers = self.candidates(rng)
        max_price = None
        if rng.random() < config.price_capped_share:
            medians = median_block_prices(peers, config.blocks)
            max_price = default_max_price(medians, 0, config.blocks, 1.0)
        self.requests += 1
        try:
            plan = plan_route(peers, config.blocks, RouteLimits(alpha, max_price))
        except (NoRoute, RoutingError):
            self.failed += 1
            return None
        if self.revenue_open:
            for hop in plan.hops:
                j = int(hop.peer_id[1:])
                self.revenue[j] += (hop.end - hop.start) * self.price[j] * config.tokens_per_request
        return alpha, plan.price, plan.latency_ms


@dataclass(frozen=True)
class Trace:
    """What ``simulate`` measured. Round r (0-based) is the state at SimPy time r + 1; the
    "before" figures are the start state. Arrays: [rounds, blocks] or [rounds] or [nodes]."""

    config: SimConfig
    capacity_before: FloatArray  # [blocks] tokens/s with the random start spans
    block_price: FloatArray  # [rounds, blocks] mean price of a block's servers
    price_change: FloatArray  # [rounds] max over blocks of mean |dp|/p of its servers
    capacity: FloatArray  # [rounds, blocks] tokens/s
    coverage: FloatArray  # [rounds] fraction of blocks with >= 1 server
    moves: IntArray  # [rounds] span moves during the round
    failed: IntArray  # [rounds] requests with no route during the round
    requests: IntArray  # [rounds] requests during the round
    ms: FloatArray  # [nodes] compute cost, ms per block per token
    max_blocks: IntArray  # [nodes]
    price: FloatArray  # [nodes] final price
    settled_price: FloatArray  # [nodes] price at the end of the revenue window
    settled_span: IntArray  # [nodes] blocks served at the end of the revenue window
    expected_revenue: FloatArray  # [nodes] the pricing model's R (eq. 2) then, per block per
    # client token, against the node's competitors (what adaptive pricing maximises)
    revenue: FloatArray  # [nodes] credits earned in the revenue window (every node: the
    # window ends before the churn)
    alive: npt.NDArray[np.bool_]  # [nodes] still in the swarm at the end
    best_response_share: float  # of the nodes alive at the end, those whose price is a best
    # response (no 5% move earns more R: ``Market.best_response``)
    survived_compute: float  # share of the start's total tokens/s the churn left
    capacity_hit: FloatArray  # [blocks] tokens/s right after the churn (zeros: no churn)
    revenue_from: int  # revenue window: rounds [revenue_from, churn_at or rounds)
    routes: tuple[tuple[float, float, float], ...] = field(repr=False)  # (alpha, price, ms)
    market: Market = field(repr=False, compare=False)  # the final world (Pareto sweep)


def simulate(config: SimConfig, progress: Progress | None = None) -> Trace:
    """Run the simulation of ``config`` (module docstring) and return its trace.
    ``progress`` gets one line per round. Deterministic for ``config.seed``."""
    policy = pricing_policy(config.pricing)
    market = Market(config, policy)
    env = simpy.Environment()
    before = np.array(market.exact_capacity())
    rounds, num_blocks = config.rounds, config.blocks
    block_price = np.zeros((rounds, num_blocks))
    capacity = np.zeros((rounds, num_blocks))
    change = np.zeros(rounds)
    coverage = np.zeros(rounds)
    moves = np.zeros(rounds, dtype=np.int64)
    failed = np.zeros(rounds, dtype=np.int64)
    requests = np.zeros(rounds, dtype=np.int64)
    routes: list[tuple[float, float, float]] = []
    client_rng = random.Random(config.seed + 1)
    churn_at = config.churn_at
    settled = churn_at if churn_at is not None else rounds  # rounds before the churn
    revenue_from = settled // 2  # revenue is counted over the second half of them
    total_compute = float(np.sum([server_throughput(m, 1) for m in market.ms]))
    survived = [1.0]
    settled_price = np.zeros(config.nodes)  # [nodes] prices at the end of the window
    settled_span = np.ones(config.nodes, dtype=np.int64)  # [nodes] span lengths then
    modelled = np.zeros(config.nodes)  # [nodes] the pricing model's R then
    hit = np.zeros(num_blocks)  # [blocks] tokens/s right after the churn, before any move

    def node(i: int) -> Generator[simpy.Event, object, None]:
        yield env.timeout(market.phase[i])
        offset = market.rng.randrange(config.rebalance_every)
        while market.alive[i]:
            market.reprice(i)
            if int(env.now) % config.rebalance_every == offset:
                market.rebalance(i)
            yield env.timeout(1.0)

    def clients() -> Generator[simpy.Event, object, None]:
        if config.requests_per_round == 0:
            return
        while True:
            yield env.timeout(client_rng.expovariate(config.requests_per_round))
            route = market.serve_request(client_rng)
            if route is not None:
                routes.append(route)

    def churn(at: int) -> Generator[simpy.Event, object, None]:
        # just after round at-1's monitor (the pre-churn state), before any node acts
        yield env.timeout(at + CHURN_OFFSET)
        live = [i for i in range(config.nodes) if market.alive[i]]
        center = market.rng.uniform(0, num_blocks)
        live.sort(key=lambda i: (abs((market.start[i] + market.end[i]) / 2 - center), i))
        for i in live[:round(config.churn * len(live))]:
            market.leave(i)
        left = sum(server_throughput(market.ms[i], 1) for i in range(config.nodes)
                   if market.alive[i])
        survived[0] = float(left / total_compute)
        hit[:] = market.exact_capacity()

    def monitor() -> Generator[simpy.Event, object, None]:
        market.revenue_open = revenue_from == 0
        prev = np.array(market.price)
        last_moves = last_failed = last_requests = 0
        for r in range(rounds):
            yield env.timeout(1.0)
            if r + 1 == revenue_from:
                market.revenue_open = True
            if r + 1 == settled:
                market.revenue_open = False
                settled_price[:] = market.price
                settled_span[:] = np.array(market.end) - np.array(market.start)
                modelled[:] = [market.expected_revenue(i) for i in range(config.nodes)]
            alive = np.array(market.alive)
            price = np.array(market.price)
            starts, ends = np.array(market.start), np.array(market.end)
            rel = np.abs(price - prev) / np.maximum(prev, 1e-12)
            block_price[r] = _per_block_mean(price, starts, ends, alive, num_blocks)
            change[r] = float(np.max(_per_block_mean(rel, starts, ends, alive, num_blocks)))
            capacity[r] = market.exact_capacity()
            coverage[r] = float(np.mean(capacity[r] > 0))
            moves[r], last_moves = market.moves - last_moves, market.moves
            failed[r], last_failed = market.failed - last_failed, market.failed
            requests[r], last_requests = market.requests - last_requests, market.requests
            prev = price
            if progress is not None:
                progress(f"round {r + 1}/{rounds}: price change {change[r]:.4f}, "
                         f"coverage {coverage[r]:.0%}, bottleneck {np.min(capacity[r]):.1f} "
                         f"tokens/s, {moves[r]} moves, {failed[r]}/{requests[r]} requests "
                         "without a route")

    for i in range(config.nodes):
        env.process(node(i))
    env.process(clients())
    if churn_at is not None:
        env.process(churn(churn_at))
    done = env.process(monitor())
    env.run(until=done)
    best_responses = sum(market.best_response(i) for i in range(config.nodes)
                         if market.alive[i])
    return Trace(
        config=config, capacity_before=before, block_price=block_price, price_change=change,
        capacity=capacity, coverage=coverage, moves=moves, failed=failed, requests=requests,
        ms=np.array(market.ms), max_blocks=np.array(market.max_blocks, dtype=np.int64),
        price=np.array(market.price), settled_price=settled_price, settled_span=settled_span,
        expected_revenue=modelled,
        revenue=np.array(market.revenue),
        alive=np.array(market.alive),
        best_response_share=best_responses / max(1, sum(market.alive)),
        survived_compute=survived[0], capacity_hit=hit,
        revenue_from=revenue_from,
        routes=tuple(routes), market=market,
    )


def _per_block_mean(values: FloatArray, starts: IntArray, ends: IntArray,
                    alive: npt.NDArray[np.bool_], num_blocks: int) -> FloatArray:
    """[blocks] mean of ``values`` (one per node) over the live nodes serving each block;
    0 for a block nobody serves. O(nodes + blocks) with difference arrays."""
    total = np.zeros(num_blocks + 1)
    count = np.zeros(num_blocks + 1)
    v = np.where(alive, values, 0.0)
    one = alive.astype(np.float64)
    np.add.at(total, starts, v)
    np.add.at(total, ends, -v)
    np.add.at(count, starts, one)
    np.add.at(count, ends, -one)
    sums, counts = np.cumsum(total)[:num_blocks], np.cumsum(count)[:num_blocks]
    return np.where(counts > 0.5, sums / np.maximum(counts, 1.0), 0.0)

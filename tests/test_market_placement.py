"""market.placement: capacity, choose_span and plan_move against brute force on small swarms."""

from __future__ import annotations

import math
import random

import pytest

from layerchain.errors import ConfigError, SpanError
from layerchain.market.placement import (
    SpanScore,
    block_capacity,
    capacity_cv,
    choose_span,
    plan_move,
    score_span,
    server_throughput,
)
from layerchain.types import Span


def _brute_force(capacity: list[float], ms: float, max_blocks: int) -> Span:
    """Every span of every length <= max_blocks, scored from scratch (module docstring)."""
    n = len(capacity)
    scored = []
    for length in range(1, min(max_blocks, n) + 1):
        t = 1000.0 / (ms * length)
        for start in range(n - length + 1):
            part = capacity[start:start + length]
            uncovered = sum(1 for c in part if c == 0.0)
            share = math.fsum(t / (c + t) for c in part)
            scored.append((uncovered, share, Span(start, start + length)))
    most = max(u for u, _, _ in scored)
    top = max(s for u, s, _ in scored if u == most)
    ties = [span for u, s, span in scored if u == most and s >= top - 1e-9 * max(1.0, top)]
    return min(ties, key=lambda sp: (sorted(capacity[sp.start:sp.end]), sp.start))


def test_throughput_and_capacity():
    assert server_throughput(2.0, 5) == 100.0  # a token passes 5 blocks in 10 ms
    caps = block_capacity([(Span(0, 2), 5.0), (Span(1, 4), 1.0)], 5)
    assert caps == pytest.approx((100.0, 100.0 + 1000 / 3, 1000 / 3, 1000 / 3, 0.0))
    assert caps[4] == 0.0  # exactly: an unserved block is no server, not float noise
    with pytest.raises(SpanError):
        block_capacity([(Span(3, 9), 1.0)], 5)


def test_choose_span_matches_brute_force_on_random_small_swarms():
    rng = random.Random(7)
    for _ in range(150):
        n = rng.randint(1, 9)
        servers = []
        for _ in range(rng.randint(0, 5)):
            start = rng.randrange(n)
            servers.append((Span(start, rng.randint(start + 1, n)), rng.choice([1.0, 2.0, 5.0])))
        capacity = list(block_capacity(servers, n))
        ms, max_blocks = rng.choice([0.5, 1.0, 3.0]), rng.randint(1, n + 1)
        chosen = choose_span(capacity, ms, max_blocks)
        assert chosen == _brute_force(capacity, ms, max_blocks), (capacity, ms, max_blocks)
        assert choose_span(capacity, ms, max_blocks) == chosen  # deterministic


def test_a_joining_node_fills_the_hole_first():
    # 30 blocks, blocks 20:30 served by nobody: a 10-block node takes exactly them
    caps = block_capacity([(Span(0, 10), 1.0), (Span(10, 20), 1.0), (Span(0, 20), 2.0)], 30)
    assert choose_span(caps, 1.0, 10) == Span(20, 30)
    assert choose_span(caps, 1.0, 4) == Span(20, 24)  # the hole first, lowest start on a tie
    assert score_span(caps, Span(20, 30), 1.0) == SpanScore(10, 10.0)
    # an empty swarm: the node serves as much as it can, from block 0
    assert choose_span([0.0] * 8, 2.0, 3) == Span(0, 3)
    # otherwise the weakest blocks: here 4:6
    assert choose_span([50.0, 50.0, 50.0, 50.0, 10.0, 10.0], 1.0, 2) == Span(4, 6)


def test_plan_move_stays_put_in_a_balanced_swarm_and_moves_to_a_lost_block():
    servers = [(Span(0, 3), 1.0), (Span(3, 6), 1.0), (Span(0, 3), 1.0), (Span(3, 6), 1.0)]
    caps = block_capacity(servers, 6)
    assert plan_move(caps, Span(0, 3), 1.0, 3) is None
    # one of 3:6 left: 0:3 has twice its capacity, but A's share would not grow: stay
    assert plan_move(block_capacity(servers[:3], 6), Span(0, 3), 1.0, 3) is None
    # the last server of 3:6 left too: the one of two nodes on 0:3 that checks first moves
    caps = block_capacity([servers[0], servers[2]], 6)
    assert plan_move(caps, Span(0, 3), 1.0, 3) == Span(3, 6)
    # but the only server of 3:6 never leaves it for the same number of lost blocks elsewhere
    caps = block_capacity([(Span(3, 6), 1.0)], 9)
    assert plan_move(caps, Span(3, 6), 1.0, 3) is None


def test_plan_move_hysteresis():
    # node A (1 ms/block) on 0:2 shares it with B; 2:4 has one slower server C
    def caps_with(c_ms: float) -> tuple[float, ...]:
        return block_capacity([(Span(0, 2), 1.0), (Span(0, 2), 1.0), (Span(2, 4), c_ms)], 4)

    # C a bit slower: moving would raise A's share by less than 20%: stay
    assert plan_move(caps_with(1.2), Span(0, 2), 1.0, 2) is None
    assert plan_move(caps_with(1.2), Span(0, 2), 1.0, 2, threshold=0.05) == Span(2, 4)
    # C much slower: the gain passes the threshold: move
    assert plan_move(caps_with(4.0), Span(0, 2), 1.0, 2) == Span(2, 4)
    # after the move the other node sees a balanced swarm and stays (no thrash)
    moved = block_capacity([(Span(0, 2), 1.0), (Span(2, 4), 1.0), (Span(2, 4), 4.0)], 4)
    assert plan_move(moved, Span(0, 2), 1.0, 2) is None
    assert plan_move(moved, Span(2, 4), 1.0, 2) is None


def test_plan_move_never_lowers_the_bottleneck():
    # A (1 ms/block) alone beside a slow server on block 0; block 1 has 1000 tokens/s. Spreading
    # over 0:2 would raise A's share by 33% (0.99 -> 1.31) but halve block 0's capacity, the
    # swarm's weakest (1010 -> 510 tokens/s, below block 1's 1000): it stays
    caps = block_capacity([(Span(0, 1), 1.0), (Span(0, 1), 100.0), (Span(1, 2), 1.0)], 2)
    assert score_span([10.0, 1000.0], Span(0, 2), 1.0).share > 1.3 * score_span(
        [10.0, 1000.0], Span(0, 1), 1.0).share
    assert plan_move(caps, Span(0, 1), 1.0, 2) is None
    # a move that raises the weakest block is taken: A alone on 0:1 beside a second server
    # there, block 1 served slowly (200 + 100 -> 100 | 25 -> 125)
    caps = block_capacity([(Span(0, 1), 10.0), (Span(0, 1), 10.0), (Span(1, 2), 40.0)], 2)
    assert plan_move(caps, Span(0, 1), 10.0, 1) == Span(1, 2)


def test_capacity_cv():
    assert capacity_cv([5.0, 5.0, 5.0]) == 0.0
    assert capacity_cv([0.0, 0.0]) == 0.0
    assert capacity_cv([0.0, 10.0]) == pytest.approx(1.0)


def test_bad_inputs_are_config_errors():
    for make in (lambda: choose_span([], 1.0, 2), lambda: choose_span([1.0], 0.0, 2),
                 lambda: choose_span([1.0], 1.0, 0), lambda: choose_span([-1.0], 1.0, 1),
                 lambda: choose_span([float("nan")], 1.0, 1),
                 lambda: plan_move([1.0, 1.0], Span(0, 1), 1.0, 1, threshold=-0.1),
                 lambda: server_throughput(1.0, 0), lambda: block_capacity([], 0)):
        with pytest.raises(ConfigError):
            make()
    with pytest.raises(SpanError):
        plan_move([1.0, 1.0], Span(0, 3), 1.0, 1)

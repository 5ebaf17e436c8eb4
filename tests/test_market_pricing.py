"""market.pricing: the paper's revenue model (eqs. 1-5) and the adaptive policy, on literals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layerchain.errors import ConfigError
from layerchain.market.pricing import (
    DEFAULT_DEMAND,
    AdaptivePricing,
    Demand,
    FixedPricing,
    Offer,
    choice_probabilities,
    expected_revenue,
    pricing_policy,
    revenue_gradient,
)

ONE_ALPHA = Demand(alphas=(0.5,), weights=(1.0,))


def _with_price(offers: list[Offer], index: int, price: float) -> list[Offer]:
    return [Offer(price, o.latency_ms) if i == index else o for i, o in enumerate(offers)]


def _grid_argmax(index: int, offers: list[Offer], demand: Demand, hi: float) -> float:
    """Brute force: the price on a grid maximising R_index, the others fixed (a coarse grid
    over (0, hi], then a fine one around its best point: steps of hi / 40,000)."""
    lo, step = 0.0, hi / 200
    for _ in range(2):
        grid = lo + step * np.arange(1, 201)
        revenue = [expected_revenue(index, _with_price(offers, index, p), demand) for p in grid]
        best = float(grid[int(np.argmax(revenue))])
        lo, step = max(0.0, best - step), step / 100
    return best


def _run(policy: AdaptivePricing, offers: list[Offer], demand: Demand, rounds: int,
         moving: tuple[int, ...]) -> list[Offer]:
    """Every offer in ``moving`` re-prices each round from the same snapshot."""
    for _ in range(rounds):
        prices = [policy.next_price(i, offers, demand) if i in moving else o.price
                  for i, o in enumerate(offers)]
        offers = [Offer(p, o.latency_ms) for p, o in zip(prices, offers)]
    return offers


def test_choice_is_the_boltzmann_distribution_of_eq_3():
    offers = [Offer(3.0, 10.0), Offer(1.0, 30.0)]
    scale = 20.0  # mean latency
    w = [(0.5 * 3 + 0.5 * 10) / scale, (0.5 * 1 + 0.5 * 30) / scale]
    expected = [math.exp(-x) / sum(math.exp(-y) for y in w) for x in w]
    assert choice_probabilities(offers, ONE_ALPHA) == pytest.approx(expected, rel=1e-12)
    assert expected_revenue(0, offers, ONE_ALPHA) == pytest.approx(3.0 * expected[0])
    # the population is the weighted mean of its alphas' choices
    mixed = Demand(alphas=(0.0, 1.0), weights=(0.3, 0.7))
    blind = choice_probabilities(offers, Demand(alphas=(0.0,), weights=(1.0,)))
    miser = choice_probabilities(offers, Demand(alphas=(1.0,), weights=(1.0,)))
    assert choice_probabilities(offers, mixed) == pytest.approx(
        [0.3 * b + 0.7 * m for b, m in zip(blind, miser)])


def test_the_analytic_gradient_is_the_papers_and_matches_a_central_difference():
    offers = [Offer(30.0, 5.0), Offer(20.0, 10.0), Offer(25.0, 20.0)]
    for demand in (ONE_ALPHA, DEFAULT_DEMAND):
        h = 1e-4
        numeric = (expected_revenue(0, _with_price(offers, 0, 30 + h), demand)
                   - expected_revenue(0, _with_price(offers, 0, 30 - h), demand)) / (2 * h)
        assert revenue_gradient(0, offers, demand) == pytest.approx(numeric, rel=1e-6)
    # the paper's form, dR/dp = P (1 + alpha p' (P - 1)), with p' = p / (S T)
    p_share = choice_probabilities(offers, ONE_ALPHA)[0]
    paper = p_share * (1 + 0.5 * (30.0 / (35.0 / 3)) * (p_share - 1))
    assert revenue_gradient(0, offers, ONE_ALPHA) == pytest.approx(paper, rel=1e-12)


@pytest.mark.parametrize("demand", [ONE_ALPHA, DEFAULT_DEMAND, Demand((0.2, 0.9), (0.5, 0.5), 0.5)])
@pytest.mark.parametrize("start", [1.0, 400.0])
def test_adaptive_converges_to_the_brute_force_argmax_of_revenue(demand, start):
    offers = [Offer(start, 8.0), Offer(25.0, 12.0), Offer(40.0, 30.0)]
    final = _run(AdaptivePricing(), offers, demand, rounds=120, moving=(0,))
    best = _grid_argmax(0, final, demand, hi=200.0)
    assert final[0].price == pytest.approx(best, rel=2e-3)
    assert abs(revenue_gradient(0, final, demand)) < 1e-6  # a stationary point of R


def test_all_adaptive_the_faster_offer_ends_at_the_higher_price_and_revenue():
    offers = [Offer(10.0, 20.0), Offer(10.0, 10.0), Offer(10.0, 5.0)]  # slowest first
    policy = AdaptivePricing()
    final = _run(policy, offers, DEFAULT_DEMAND, rounds=150, moving=(0, 1, 2))
    again = _run(policy, final, DEFAULT_DEMAND, rounds=1, moving=(0, 1, 2))
    assert [o.price for o in again] == pytest.approx([o.price for o in final], rel=1e-6)  # still
    prices = [o.price for o in final]
    revenue = [expected_revenue(i, final, DEFAULT_DEMAND) for i in range(3)]
    assert prices[0] < prices[1] < prices[2]
    assert revenue[0] < revenue[1] < revenue[2]
    for i in range(3):  # a Nash equilibrium (eq. 6): nobody gains by deviating alone
        assert final[i].price == pytest.approx(_grid_argmax(i, final, DEFAULT_DEMAND, 200.0),
                                               rel=2e-3)


def test_a_step_is_bounded_and_the_guard_never_lowers_revenue():
    policy = AdaptivePricing(learning_rate=50.0, max_step=0.25)  # a learning rate far too big
    offers = [Offer(20.0, 1.0), Offer(30.0, 50.0)]  # a near-monopolist: P close to 1
    for _ in range(60):
        price = offers[0].price
        nxt = policy.next_price(0, offers, ONE_ALPHA)
        assert 0.75 * price - 1e-9 <= nxt <= 1.25 * price + 1e-9
        before = expected_revenue(0, offers, ONE_ALPHA)
        offers = _with_price(offers, 0, nxt)
        assert expected_revenue(0, offers, ONE_ALPHA) >= before  # no overshoot to a worse price
    assert offers[0].price == pytest.approx(_grid_argmax(0, offers, ONE_ALPHA, 400.0), rel=2e-3)


def test_bounds_and_a_monopolist():
    policy = AdaptivePricing(min_price=2.0, max_price=50.0)
    assert policy.next_price(0, [Offer(0.0, 5.0), Offer(9.0, 5.0)], ONE_ALPHA) >= 2.0
    alone = [Offer(45.0, 5.0)]  # P = 1: revenue grows with price, up to the bound
    assert policy.next_price(0, alone, ONE_ALPHA) == pytest.approx(49.5)  # + max_step
    assert policy.next_price(0, [Offer(49.9, 5.0)], ONE_ALPHA) == 50.0
    assert policy.next_price(0, [Offer(80.0, 5.0)], ONE_ALPHA) == 50.0


def test_fixed_never_moves():
    offers = [Offer(7.0, 5.0), Offer(1.0, 1.0)]
    assert FixedPricing().next_price(0, offers, DEFAULT_DEMAND) == 7.0
    assert pricing_policy("fixed").next_price(0, offers, ONE_ALPHA) == 7.0


def test_bad_options_and_inputs_are_config_errors():
    assert isinstance(pricing_policy("adaptive", min_price=1.0), AdaptivePricing)
    bad = [lambda: pricing_policy("auction"), lambda: pricing_policy("fixed", min_price=1.0),
           lambda: pricing_policy("adaptive", speed=2.0),
           lambda: pricing_policy("adaptive", min_price=0.0),
           lambda: pricing_policy("adaptive", min_price=5.0, max_price=1.0),
           lambda: pricing_policy("adaptive", max_step=1.0),
           lambda: pricing_policy("adaptive", learning_rate=float("nan")),
           lambda: Offer(-1.0, 5.0), lambda: Offer(1.0, 0.0),
           lambda: Demand((0.5, 1.5), (0.5, 0.5)), lambda: Demand((0.5,), (0.9,)),
           lambda: Demand((0.5,), (1.0,), temperature=0.0), lambda: Demand((), ()),
           lambda: choice_probabilities([], ONE_ALPHA),
           lambda: expected_revenue(3, [Offer(1.0, 1.0)], ONE_ALPHA)]
    for make in bad:
        with pytest.raises(ConfigError):
            make()

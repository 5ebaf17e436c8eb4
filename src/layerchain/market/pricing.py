"""Prices of the nodes serving the same blocks: seed 002 §3.3 (eqs. 1-5), pure functions.

A node competes only with the peers serving the same blocks. Each is an ``Offer`` (its price
and its compute cost); the client population is a ``Demand`` (a distribution of ``alpha``,
the weight routing gives price against latency, and a Boltzmann temperature). Nothing here
does I/O: ``node.rebalance`` builds the offers from the DHT's records and announces the price
a policy returns; ``layerchain sim`` calls the same functions for thousands of nodes.

The model, for offers ``i`` with price ``p_i`` and latency ``c_i``:

* weight (eq. 1, routing's cost per block per token) ``w_i = (alpha * p_i + (1 - alpha) *
  c_i) / S``, with ``S`` the mean latency of the offers (ms). Routing weighs one credit per
  block per token as much as one ms per block per token (``routing.planner``: ``alpha * price
  + (1 - alpha) * latency``); dividing both by ``S`` makes the temperature unit-free ("how
  many typical latencies apart two offers are"). ``S`` depends on latencies only, never on
  prices: a scale taken from the prices would make the choice invariant to scaling every
  price, so a node could always gain by raising (or lowering) prices in step with the others
  and no equilibrium would exist;
* choice (eq. 3, ``k`` dropped) ``P_i(alpha) = exp(-w_i / T) / sum_j exp(-w_j / T)``, and over
  the population ``P_i = sum_k weight_k * P_i(alpha_k)``;
* expected revenue (eq. 2) ``R_i = p_i * P_i``, per client step on these blocks;
* gradient (the paper's ``dR/dp = P (1 + alpha p (P - 1))`` for ``S = T = 1``, one alpha):
  ``dR_i/dp_i = P_i - p_i * sum_k weight_k * alpha_k / (S T) * P_i(alpha_k) (1 - P_i(alpha_k))``.

Adaptive pricing (eqs. 4-5) climbs ``R`` in log-price: ``ln p += learning_rate * e`` with ``e =
p R'(p) / R(p)`` the revenue's price elasticity, computed analytically from the gradient
above. Same maximiser as ``p += eta * dR/dp`` (``ln`` is monotone), but the step is unit-free:
a node charging 2 or 2,000 credits moves at the same relative pace, and ``learning_rate = 0.5``
is about a Newton step near the optimum (``de/dln p`` is about ``-1 / (1 - P)`` there). Bounds:
a step moves the price by at most ``max_step`` (a fraction, up or down) and the result is
clamped to ``[min_price, max_price]``. Oscillation guard (stateless): the step is halved until
it does not lower ``R`` against the competitors as they stand (backtracking line search, at most
``GUARD_HALVINGS`` times, else the price stays), so a node never jumps over its optimum to a
worse price and, competitors fixed, its price converges monotonically in ``R``.

A node alone on its blocks has ``P = 1``: ``R = p`` grows without bound and the adaptive price
climbs by ``max_step`` a round up to ``max_price`` (nothing in the model holds a monopolist
back). A demand with ``alpha = 0`` clients does the same (they never look at prices), which is
why ``DEFAULT_DEMAND`` leaves them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

import numpy as np

from layerchain.errors import ConfigError

GUARD_HALVINGS = 8  # halvings of a step that would lower R before the price stays put
_SUM_TOLERANCE = 1e-6  # Demand.weights must sum to 1 within this


@dataclass(frozen=True)
class Offer:
    """One server of the same blocks, as clients see it (its DHT record)."""

    price: float  # credits per block per token, >= 0
    latency_ms: float  # ms per block per token, > 0 (its compute cost, ``ms_per_block``)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.price) and self.price >= 0):
            raise ConfigError(f"an offer's price must be a finite number >= 0, got {self.price!r}")
        if not (math.isfinite(self.latency_ms) and self.latency_ms > 0):
            raise ConfigError(
                f"an offer's latency_ms must be a finite number > 0, got {self.latency_ms!r}")


@dataclass(frozen=True)
class Demand:
    """The client population choosing among offers."""

    alphas: tuple[float, ...]  # alpha in [0, 1]: weight of price vs latency, as in routing
    weights: tuple[float, ...]  # the share of clients with each alpha, summing to 1
    temperature: float = 1.0  # Boltzmann temperature over the normalized weights w (unit-free;
    # lower: clients pick the best offer more surely)

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.alphas or len(self.alphas) != len(self.weights):
            raise ConfigError("a demand needs one weight per alpha, and at least one alpha")
        if not all(0.0 <= a <= 1.0 for a in self.alphas):
            raise ConfigError(f"every alpha must be in [0, 1], got {self.alphas}")
        if not all(math.isfinite(w) and w >= 0 for w in self.weights) or \
                abs(math.fsum(self.weights) - 1.0) > _SUM_TOLERANCE:
            raise ConfigError(f"demand weights must be >= 0 and sum to 1, got {self.weights}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")


# Clients weighing price a quarter to all of their cost, equally many of each. alpha = 0
# (price-blind clients) is left out: against them revenue grows with price without bound.
DEFAULT_DEMAND = Demand(alphas=(0.25, 0.5, 0.75, 1.0), weights=(0.25, 0.25, 0.25, 0.25))


def _arrays(offers: Sequence[Offer], demand: Demand) -> tuple[np.ndarray, np.ndarray, float]:
    """prices [N], latencies [N] and the latency scale S (ms); ConfigError if no offers."""
    if not offers:
        raise ConfigError("pricing needs at least one offer")
    prices = np.fromiter((o.price for o in offers), dtype=np.float64, count=len(offers))
    latencies = np.fromiter((o.latency_ms for o in offers), dtype=np.float64, count=len(offers))
    return prices, latencies, float(latencies.mean())


def _choice_matrix(prices: np.ndarray, latencies: np.ndarray, scale: float,
                   demand: Demand) -> np.ndarray:
    """[K, N] probability that a client of alpha k picks offer i (eq. 3, row-wise softmax)."""
    alphas = np.asarray(demand.alphas)[:, None]  # [K, 1]
    w = (alphas * prices[None, :] + (1.0 - alphas) * latencies[None, :]) / scale  # [K, N]
    z = -w / demand.temperature
    z -= z.max(axis=1, keepdims=True)  # stable: the best offer of each row has exp(0) = 1
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def choice_probabilities(offers: Sequence[Offer], demand: Demand) -> tuple[float, ...]:
    """``P_i``: the share of the demand each offer gets (sums to 1), eqs. 1 and 3 averaged over
    the demand's alphas (module docstring for the normalization)."""
    prices, latencies, scale = _arrays(offers, demand)
    p = np.asarray(demand.weights) @ _choice_matrix(prices, latencies, scale, demand)
    return tuple(float(x) for x in p)


def expected_revenue(index: int, offers: Sequence[Offer], demand: Demand) -> float:
    """``R_i = price_i * P_i`` (eq. 2): credits per block per client token on these blocks."""
    _check_index(index, offers)
    return offers[index].price * choice_probabilities(offers, demand)[index]


def revenue_gradient(index: int, offers: Sequence[Offer], demand: Demand) -> float:
    """``dR_i / dp_i`` with the others' prices fixed (analytic; module docstring)."""
    _check_index(index, offers)
    prices, latencies, scale = _arrays(offers, demand)
    share, slope = _share_and_slope(index, prices, latencies, scale, demand)
    return share + float(prices[index]) * slope


def _share_and_slope(index: int, prices: np.ndarray, latencies: np.ndarray, scale: float,
                     demand: Demand) -> tuple[float, float]:
    """``P_i`` and ``dP_i / dp_i``."""
    rows = _choice_matrix(prices, latencies, scale, demand)[:, index]  # [K] P_i(alpha_k)
    weights, alphas = np.asarray(demand.weights), np.asarray(demand.alphas)
    share = float(weights @ rows)
    slope = -float(weights @ (alphas * rows * (1.0 - rows))) / (scale * demand.temperature)
    return share, slope


def _check_index(index: int, offers: Sequence[Offer]) -> None:
    if not 0 <= index < len(offers):
        raise ConfigError(f"offer index {index} is out of range for {len(offers)} offers")


class PricingPolicy(Protocol):
    """How a node sets its next price from a snapshot of the offers on its blocks (its own is
    ``offers[index]``, at its current price). A registry entry of ``pricing_policy``."""

    @property
    def name(self) -> str:
        """The policy's registry name ("fixed", "adaptive")."""
        ...

    def next_price(self, index: int, offers: Sequence[Offer], demand: Demand) -> float:
        """The price to announce next, credits per block per token."""
        ...


@dataclass(frozen=True)
class FixedPricing:
    """Today's rule: the configured price, whatever the market does."""

    name: ClassVar[str] = "fixed"

    def next_price(self, index: int, offers: Sequence[Offer], demand: Demand) -> float:
        _check_index(index, offers)
        return offers[index].price


@dataclass(frozen=True)
class AdaptivePricing:
    """Gradient ascent on expected revenue (eqs. 4-5) in log-price, bounded and guarded
    against oscillation (module docstring)."""

    learning_rate: float = 0.5  # log-price moved per unit of revenue elasticity (unit-free)
    min_price: float = 0.01  # credits per block per token; > 0 (the step is in log-price)
    max_price: float = 1e6  # credits per block per token
    max_step: float = 0.1  # a round moves the price by at most this fraction, up or down
    name: ClassVar[str] = "adaptive"

    def __post_init__(self) -> None:
        for field_name in ("learning_rate", "min_price", "max_price", "max_step"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ConfigError(
                    f"adaptive pricing {field_name} must be a number > 0, got {value!r}")
        if self.max_price < self.min_price:
            raise ConfigError(f"adaptive pricing max_price {self.max_price:g} is below "
                              f"min_price {self.min_price:g}")
        if self.max_step >= 1:
            raise ConfigError(f"adaptive pricing max_step must be below 1 (a fraction of the "
                              f"price), got {self.max_step!r}")

    def clamp(self, price: float) -> float:
        return min(self.max_price, max(self.min_price, price))

    def next_price(self, index: int, offers: Sequence[Offer], demand: Demand) -> float:
        _check_index(index, offers)
        prices, latencies, scale = _arrays(offers, demand)
        price = self.clamp(float(prices[index]))  # a price of 0 (fixed before) starts at min
        prices[index] = price
        share, slope = _share_and_slope(index, prices, latencies, scale, demand)
        # elasticity e = p R' / R = 1 + p P' / P; P underflowing to 0 means far too dear
        elasticity = 1.0 + price * slope / share if share > 0 else -math.inf
        bound = math.log1p(self.max_step)  # |ln(p_next / p)| <= ln(1 + max_step)
        bound_down = -math.log1p(-self.max_step)  # down to (1 - max_step) p at most
        log_step = min(bound, max(-bound_down, self.learning_rate * elasticity))
        revenue = price * share
        for _ in range(GUARD_HALVINGS):
            candidate = self.clamp(price * math.exp(log_step))
            if candidate == price:
                return price
            prices[index] = candidate
            p_new, _ = _share_and_slope(index, prices, latencies, scale, demand)
            if candidate * p_new >= revenue:
                return candidate
            log_step /= 2
        return price


_POLICIES = {"fixed": FixedPricing, "adaptive": AdaptivePricing}
POLICIES = tuple(_POLICIES)  # the names ``pricing_policy`` and ``node start --pricing`` accept


def pricing_policy(name: str, **options: float) -> PricingPolicy:
    """The policy called ``name`` ("fixed" | "adaptive") with ``options`` (``AdaptivePricing``'s
    fields; none for fixed); ConfigError for an unknown name, option or value."""
    if name not in _POLICIES:
        raise ConfigError(f"unknown pricing policy {name!r}", hint=f"use one of {', '.join(POLICIES)}")
    if name == "fixed":
        if options:
            raise ConfigError(f"fixed pricing takes no options, got {', '.join(sorted(options))}")
        return FixedPricing()
    known = {"learning_rate", "min_price", "max_price", "max_step"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"adaptive pricing has no option {', '.join(unknown)}",
                          hint=f"its options are {', '.join(sorted(known))}")
    return replace(AdaptivePricing(), **options)  # its __post_init__ checks the values

"""Where a node serves: seed 002 §3.4 (eqs. 7-8), pure functions over per-block capacity.

Throughput is tokens per second. A server computing ``ms_per_block`` ms per block per token
over a span of ``n`` blocks passes ``1000 / (ms_per_block * n)`` tokens/s through its span,
and adds that to the capacity of every block of it (``server_throughput``); a block's
capacity is the sum over its servers (``block_capacity``), and the swarm's throughput is
bounded by its weakest block.

A node of throughput ``t`` on block ``b`` of capacity ``cap_b`` (the others') holds the share
``s_b = t / (cap_b + t)`` of that block's compute: eq. 7, the reciprocal norm of compute
costs, since ``t`` is the reciprocal of a cost. Eq. 8 picks the layer maximising it; for a span
the node maximises, in order (``SpanScore``, compared as a tuple):

1. ``uncovered``: blocks nobody else serves (``cap_b == 0``, where ``s_b = 1``) that the span
   covers: until they are served no route exists, whatever anything else earns;
2. ``share``: ``sum_b s_b`` over the span (eq. 7 summed), the node's expected share of the
   work it can do (its revenue at equal prices and equal demand per block);
3. the weakest blocks first (Petals' rule): the span's capacities sorted ascending, smaller
   first; then the lower start.

Every span of length ``1..max_blocks`` is a candidate (a shorter span runs faster per block:
a crowded block can be worth leaving out). Shares within ``SHARE_TOLERANCE`` (relative)
count as equal, so ties break on rule 3 the same way whatever the float rounding.

``plan_move`` is the same choice for a node already serving: its own throughput is taken out
of the capacity first, and it moves only for more uncovered blocks, or for a share larger by
more than ``threshold`` (hysteresis) that does not lower the swarm's weakest block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from layerchain.errors import ConfigError
from layerchain.types import Span

SHARE_TOLERANCE = 1e-9  # shares this close (relative) are a tie
_ZERO = 1e-9  # of a node's own throughput: what its subtraction leaves below this is noise


@dataclass(frozen=True, order=True)
class SpanScore:
    """How good a span is for a node (module docstring); larger is better."""

    uncovered: int  # blocks of the span nobody else serves
    share: float  # sum over the span of the node's share of each block's compute (eq. 7)


def server_throughput(ms_per_block: float, span_len: int) -> float:
    """Tokens/s a server adds to each block of its span: one token passes its ``span_len``
    blocks in ``ms_per_block * span_len`` ms."""
    _check_cost(ms_per_block)
    if type(span_len) is not int or span_len < 1:
        raise ConfigError(f"a span has at least one block, got {span_len!r}")
    return 1000.0 / (ms_per_block * span_len)


def block_capacity(servers: Iterable[tuple[Span, float]], num_blocks: int) -> tuple[float, ...]:
    """Tokens/s per block ``[num_blocks]``: the sum of ``server_throughput`` over the servers
    ``(span, ms_per_block)`` covering it. SpanError for a span beyond ``num_blocks``."""
    if type(num_blocks) is not int or num_blocks < 1:
        raise ConfigError(f"a model has at least one block, got {num_blocks!r}")
    caps = np.zeros(num_blocks)
    for span, ms_per_block in servers:
        span.check_within(num_blocks)
        # added block by block (not a running sum of +t/-t): a block no server covers is 0.0
        caps[span.start:span.end] += server_throughput(ms_per_block, span.length)
    return tuple(float(c) for c in caps)


def score_span(capacity: Sequence[float] | np.ndarray, span: Span, ms_per_block: float) -> SpanScore:
    """The score of serving ``span`` for a node of ``ms_per_block`` on blocks whose capacity
    without it is ``capacity`` [num_blocks] tokens/s."""
    caps = _capacities(capacity)
    span.check_within(len(caps))
    t = server_throughput(ms_per_block, span.length)
    part = caps[span.start:span.end]
    return SpanScore(int(np.count_nonzero(part == 0.0)), math.fsum(t / (part + t)))


def choose_span(capacity: Sequence[float], ms_per_block: float, max_blocks: int) -> Span:
    """The span a joining node of ``ms_per_block`` serving at most ``max_blocks`` blocks
    should take, given ``capacity`` [num_blocks] tokens/s of the others (module docstring's
    order; deterministic)."""
    return _best(_capacities(capacity), ms_per_block, max_blocks)[0]


def plan_move(capacity: Sequence[float], current: Span, ms_per_block: float, max_blocks: int,
              threshold: float = 0.2) -> Span | None:
    """Where a node serving ``current`` should move, or None to stay. ``capacity`` includes
    this node. It moves to ``choose_span`` of the capacity without it when that covers more
    blocks nobody else serves, or (as many) when its share (eq. 7 summed) beats the current
    one's by more than ``threshold`` (a fraction) and the swarm's weakest block is not
    weakened. A block whose last other server left has capacity 0: a node able to cover it
    moves there (unless it is itself the last server of as many blocks)."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ConfigError(f"a move threshold must be a number >= 0, got {threshold!r}")
    caps = _capacities(capacity)
    current.check_within(len(caps))
    own = server_throughput(ms_per_block, current.length)
    others = caps.copy()
    others[current.start:current.end] -= own
    others[others < _ZERO * own] = 0.0  # float noise: this node was their only server
    target, best = _best(others, ms_per_block, max_blocks)
    if target == current:
        return None
    now = score_span(others, current, ms_per_block)
    if best.uncovered > now.uncovered:
        return target
    if best.uncovered < now.uncovered or best.share <= (1.0 + threshold) * now.share:
        return None
    after = others.copy()
    after[target.start:target.end] += server_throughput(ms_per_block, target.length)
    if after.min() < caps.min() * (1.0 - SHARE_TOLERANCE):
        return None  # it would earn more but the swarm's bottleneck would drop
    return target


def capacity_cv(capacity: Sequence[float]) -> float:
    """Coefficient of variation (population std / mean) of per-block capacity: 0 when every
    block has the same; 0 for a swarm with no capacity at all."""
    caps = _capacities(capacity)
    mean = float(caps.mean())
    return 0.0 if mean <= 0 else float(caps.std()) / mean


def _best(caps: np.ndarray, ms_per_block: float, max_blocks: int) -> tuple[Span, SpanScore]:
    """The best span and its score (module docstring), vectorised per span length."""
    _check_cost(ms_per_block)
    if type(max_blocks) is not int or max_blocks < 1:
        raise ConfigError(f"max_blocks must be a positive integer, got {max_blocks!r}")
    n = len(caps)
    zero_sums = np.concatenate(([0], np.cumsum(caps == 0.0)))
    by_length = []  # (length, uncovered [n-L+1], shares [n-L+1])
    for length in range(1, min(max_blocks, n) + 1):
        t = server_throughput(ms_per_block, length)
        share_sums = np.concatenate(([0.0], np.cumsum(t / (caps + t))))
        by_length.append((length, zero_sums[length:] - zero_sums[:-length],
                          share_sums[length:] - share_sums[:-length]))
    most = max(int(u.max()) for _, u, _ in by_length)
    top = max(float(s[u == most].max()) for _, u, s in by_length if (u == most).any())
    floor = top - SHARE_TOLERANCE * max(1.0, abs(top))
    candidates = [Span(int(start), int(start) + length)
                  for length, u, s in by_length
                  for start in np.flatnonzero((u == most) & (s >= floor))]
    # the cumulative sums above only shortlist; the exact score decides among the shortlist
    scored = [(span, score_span(caps, span, ms_per_block)) for span in candidates]
    top_exact = max(score.share for _, score in scored)
    floor = top_exact - SHARE_TOLERANCE * max(1.0, abs(top_exact))
    span, score = min(
        ((span, score) for span, score in scored if score.share >= floor),
        key=lambda item: (sorted(caps[item[0].start:item[0].end].tolist()), item[0].start),
    )
    return span, score


def _capacities(capacity: Sequence[float] | np.ndarray) -> np.ndarray:
    caps = np.asarray(capacity, dtype=np.float64)
    if caps.ndim != 1 or caps.size == 0:
        raise ConfigError("capacity must list tokens/s for at least one block")
    if not np.all(np.isfinite(caps)) or (caps < 0).any():
        raise ConfigError("capacity must be finite tokens/s >= 0 for every block")
    return caps


def _check_cost(ms_per_block: float) -> None:
    if not (isinstance(ms_per_block, (int, float)) and math.isfinite(ms_per_block)
            and ms_per_block > 0):
        raise ConfigError(f"ms_per_block must be a finite number > 0, got {ms_per_block!r}")

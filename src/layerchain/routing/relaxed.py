"""The peer table as arrays, and the relaxed shortest path over block boundaries (numpy).

*Relaxed* means one rule of a route is dropped: a peer may appear twice. With that rule
gone, the best route is a DP over the DAG of block boundaries ``0..n`` in topological
order (paper §3.1)::

    best[b] = min over peers p with s_p < b <= e_p, over a in [s_p, b) of
              best[a] + fixed_p + (b - a) * w_p

Hops may be any sub-range of a span, so the naive edge set is O(peers * span^2). The
inner minimum is restructured as a running minimum per peer,
``M_p(b) = min_{s_p <= a < b} (best[a] - a * w_p)``, updated once per boundary, so
``best[b] = min_p (fixed_p + b * w_p + M_p(b))``: O(n * peers) work, vectorised over the
peers active at each boundary.

The relaxed optimum is a lower bound of the true one. When its route uses no peer twice it
*is* the answer (the planner's fast path); otherwise its cost-to-go serves as the
admissible heuristic of the exact search (``layerchain.routing.search``). A peer used twice
can really be cheaper (a slow peer on both sides of a fast one), so that case is not rare
enough to ignore.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from layerchain.routing.route import RoutePeer


@dataclass(frozen=True)
class PeerArrays:
    """The usable peers for the block range ``[offset, offset + n)``, spans clipped to it
    and shifted so the range reads ``[0, n)``. Row ``i`` is ``peers[i]``."""

    peers: tuple[RoutePeer, ...]
    n: int  # blocks in the range
    offset: int  # block number of boundary 0
    s: np.ndarray  # [P] int64, clipped and shifted span starts
    e: np.ndarray  # [P] int64, clipped and shifted span ends
    rtt: np.ndarray  # [P] float64, ms
    wait: np.ndarray  # [P] float64, expected queueing per hop, ms (RoutePeer.queue_ms)
    ms: np.ndarray  # [P] float64, ms per block
    pr: np.ndarray  # [P] float64, credits per block
    active: tuple[np.ndarray, ...]  # [n] peer rows i with s_i <= b < e_i, for each boundary b

    @classmethod
    def build(
        cls, peers: Sequence[RoutePeer], start: int, end: int, exclude: Iterable[str] = ()
    ) -> PeerArrays:
        banned = set(exclude)
        peers = list(peers)
        count = len(peers)
        # one numpy column per field ([P] float64: planning 10,000 peers starts here)
        cols = [np.fromiter(map(attrgetter(name), peers), np.float64, count=count)
                for name in ("start", "end", "rtt_ms", "ms_per_block", "price_per_block",
                             "queue_ms")]
        usable = (cols[0] < end) & (cols[1] > start)
        if banned:
            usable &= np.fromiter((p.id not in banned for p in peers), bool, count=count)
        rows = np.flatnonzero(usable)
        kept = tuple(peers) if len(rows) == count else tuple(peers[i] for i in rows)
        n = end - start
        s = np.maximum(cols[0][rows].astype(np.int64), start) - start
        e = np.minimum(cols[1][rows].astype(np.int64), end) - start
        return cls(peers=kept, n=n, offset=start, s=s, e=e, rtt=cols[2][rows],
                   wait=cols[5][rows], ms=cols[3][rows], pr=cols[4][rows],
                   active=_active(s, e, n))

    def fixed_ms(self, push: bool) -> np.ndarray:
        """``[P]`` latency every hop on a peer costs whatever its length, ms: queueing, and
        in client mode the round trip (push mode adds its transfers per pair of hops)."""
        return self.wait if push else self.rtt + self.wait

    def subset(self, rows: np.ndarray) -> PeerArrays:
        """The same range over the peers of ``rows`` only (row ``i`` of the result is
        ``rows[i]`` here)."""
        s, e = self.s[rows], self.e[rows]
        return PeerArrays(peers=tuple(self.peers[int(i)] for i in rows), n=self.n,
                          offset=self.offset, s=s, e=e, rtt=self.rtt[rows],
                          wait=self.wait[rows], ms=self.ms[rows],
                          pr=self.pr[rows], active=_active(s, e, self.n))

    def undominated(self) -> np.ndarray:
        """Rows of the peers no other peer *dominates* (sorted): a dominator's clipped span
        contains the peer's, and its rtt, queueing, ms per block and price per block are
        each no higher. A dominated peer's every hop has a hop on its dominator over the same
        blocks no worse in latency and price, so relaxed routes (a peer may appear twice)
        over the undominated peers reach exactly the relaxed optima of all peers, for every
        weighting of latency and price (see ``relaxed_forward``).

        A sound subset of the dominated peers is found in O(P log P + n^2) per key: for
        each of a few monotone keys (a dominator's key is never higher), the lowest-key
        peer whose span contains each span ``[s, e)`` (a prefix minimum over the grid of
        spans) is tested against every peer of that span. Not every dominated peer is
        found (that takes O(P^2)); each one dropped has a kept dominator (ties: the lower
        row is kept), which is all exactness needs. Random 10,000-peer swarms keep ~15%."""
        count = len(self.peers)
        if count < 64:
            return np.arange(count)
        fixed = self.rtt + self.wait
        scale = [max(float(np.median(v)), 1e-9) for v in (fixed, self.ms, self.pr)]
        r, m, p = fixed / scale[0], self.ms / scale[1], self.pr / scale[2]
        dropped = np.zeros(count, dtype=bool)
        width = self.n + 1
        cell = self.s * width + self.e
        for key in (r + m + p, m + p, r + m):
            order = np.argsort(key, kind="stable")  # a dominator sorts first (ties: by row)
            rank = np.empty(count, dtype=np.int64)
            rank[order] = np.arange(count)
            grid = np.full(width * width, count, dtype=np.int64)
            np.minimum.at(grid, cell, rank)  # lowest rank per span
            grid2 = grid.reshape(width, width)  # [s, e]
            grid2 = np.minimum.accumulate(grid2[:, ::-1], axis=1)[:, ::-1]  # spans ending later
            grid2 = np.minimum.accumulate(grid2, axis=0)  # and starting earlier
            best = grid2[self.s, self.e]
            champion = order[np.minimum(best, count - 1)]
            dropped |= ((best < rank) & (self.rtt[champion] <= self.rtt)
                        & (self.wait[champion] <= self.wait)
                        & (self.ms[champion] <= self.ms) & (self.pr[champion] <= self.pr))
        return np.flatnonzero(~dropped)

    def uncovered(self) -> list[tuple[int, int]]:
        """Block ranges ``[a, b)`` (absolute block numbers) that no usable peer serves."""
        gaps: list[tuple[int, int]] = []
        for b in range(self.n):
            if len(self.active[b]) == 0:
                if gaps and gaps[-1][1] == b + self.offset:
                    gaps[-1] = (gaps[-1][0], b + self.offset + 1)
                else:
                    gaps.append((b + self.offset, b + self.offset + 1))
        return gaps


def _active(s: np.ndarray, e: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """``[n]`` arrays of the rows ``i`` with ``s_i <= b < e_i``, for each block ``b``."""
    return tuple(np.flatnonzero((s <= b) & (e > b)) for b in range(n))


@dataclass(frozen=True)
class RelaxedResult:
    """Forward DP tables over boundaries ``0..n``."""

    best: np.ndarray  # [n+1] min primary cost of covering [0, b); inf when impossible
    second: np.ndarray  # [n+1] secondary cost of that route (the tie-breaker)
    back_peer: np.ndarray  # [n+1] row of the last hop's peer, -1 at 0 or when impossible
    back_start: np.ndarray  # [n+1] first block of that last hop

    def hops(self) -> list[tuple[int, int, int]]:
        """The optimal relaxed route to boundary n as ``(row, a, b)``, in order."""
        out, b = [], len(self.best) - 1
        while b > 0:
            p, a = int(self.back_peer[b]), int(self.back_start[b])
            out.append((p, a, b))
            b = a
        out.reverse()
        return out


def relaxed_forward(
    arr: PeerArrays,
    fixed: np.ndarray,
    w: np.ndarray,
    second_fixed: np.ndarray | None = None,
    second_w: np.ndarray | None = None,
) -> RelaxedResult:
    """Min over relaxed routes of sum(fixed_p + blocks * w_p), ties broken by the secondary
    cost sum(second_fixed_p + blocks * second_w_p) when given (else by the lowest row).
    All inputs are ``[P]`` float64, >= 0."""
    if second_fixed is None or second_w is None:
        return _forward_lean(arr, fixed, w)
    n, num = arr.n, len(arr.peers)
    best = np.full(n + 1, np.inf)
    second = np.full(n + 1, np.inf)
    best[0] = second[0] = 0.0
    back_peer = np.full(n + 1, -1, dtype=np.int64)
    back_start = np.full(n + 1, -1, dtype=np.int64)
    run = np.full(num, np.inf)  # M_p: min over a seen so far of best[a] - a * w_p
    run2 = np.full(num, np.inf)  # the secondary cost of the same a
    run_a = np.full(num, -1, dtype=np.int64)  # that a
    for b in range(1, n + 1):
        a = b - 1
        idx = arr.active[a]  # peers that can start a hop at a are those that can end one at b
        if len(idx) == 0:
            continue
        if best[a] < np.inf:
            cand = best[a] - a * w[idx]
            cand2 = second[a] - a * second_w[idx]
            cur, cur2 = run[idx], run2[idx]
            better = (cand < cur) | ((cand == cur) & (cand2 < cur2))
            run[idx] = np.where(better, cand, cur)
            run2[idx] = np.where(better, cand2, cur2)
            run_a[idx] = np.where(better, a, run_a[idx])
        val = fixed[idx] + b * w[idx] + run[idx]
        j = int(np.argmin(val))
        if not val[j] < np.inf:
            continue
        val2 = second_fixed[idx] + b * second_w[idx] + run2[idx]
        ties = np.flatnonzero(val == val[j])
        if len(ties) > 1:
            j = int(ties[np.argmin(val2[ties])])
        best[b], second[b] = val[j], val2[j]
        back_peer[b], back_start[b] = idx[j], run_a[idx[j]]
    return RelaxedResult(best, second, back_peer, back_start)


def _forward_lean(arr: PeerArrays, fixed: np.ndarray, w: np.ndarray) -> RelaxedResult:
    """``relaxed_forward`` without a secondary cost (``second`` is all zeros): the same
    recurrence in fewer numpy calls per boundary, since the Lagrangian dual and the
    cost-to-go bounds run it many times per plan."""
    n, num = arr.n, len(arr.peers)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    back_peer = np.full(n + 1, -1, dtype=np.int64)
    back_start = np.full(n + 1, -1, dtype=np.int64)
    run = np.full(num, np.inf)
    run_a = np.full(num, -1, dtype=np.int64)
    for b in range(1, n + 1):
        a = b - 1
        idx = arr.active[a]
        if len(idx) == 0:
            continue
        w_idx = w[idx]
        cur = run[idx]
        if best[a] < np.inf:
            cand = best[a] - a * w_idx
            better = cand < cur
            cur = np.where(better, cand, cur)
            run[idx] = cur
            run_a[idx[better]] = a
        val = fixed[idx] + b * w_idx + cur
        j = int(np.argmin(val))
        if not val[j] < np.inf:
            continue
        best[b] = val[j]
        back_peer[b], back_start[b] = idx[j], run_a[idx[j]]
    return RelaxedResult(best, np.zeros(n + 1), back_peer, back_start)


def relaxed_cost_to_go(arr: PeerArrays, fixed: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``h[b]`` = min relaxed cost of covering ``[b, n)``, for ``b`` in ``0..n`` ([n+1]).

    The same DP run on the mirrored range; it is a consistent lower bound of the true
    cost-to-go for every edge whose cost is at least ``fixed_p + blocks * w_p``."""
    n = arr.n
    mirrored = PeerArrays(
        peers=arr.peers,
        n=n,
        offset=0,
        s=n - arr.e,
        e=n - arr.s,
        rtt=arr.rtt,
        wait=arr.wait,
        ms=arr.ms,
        pr=arr.pr,
        active=tuple(arr.active[n - 1 - b] for b in range(n)),
    )
    cost_to_go: np.ndarray = relaxed_forward(mirrored, fixed, w).best[::-1].copy()
    return cost_to_go

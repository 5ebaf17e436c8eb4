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

Speed: the DP is a Python loop over boundaries with a few numpy calls each over the peers
active there (~100-200 undominated peers for 10,000 random ones), so call overhead, not
arithmetic, sets its time. Hence: every per-pair term is gathered once per DP into the
flat ``Layout`` (one slice per boundary instead of fancy indexing); a secondary cost (the
tie-breaker) rides along as the imaginary part of complex numbers, which numpy orders
lexicographically (real part first), so ties cost no extra calls; and
``relaxed_forward_many`` / ``relaxed_cost_to_go_many`` run K weightings in one loop
(``[pairs, K]`` arrays) for about the price of two.

The relaxed optimum is a lower bound of the true one. When its route uses no peer twice it
*is* the answer (the planner's fast path); otherwise its cost-to-go serves as the
admissible heuristic of the exact search (``layerchain.routing.search``). A peer used twice
can really be cheaper (a slow peer on both sides of a fast one), so that case is not rare
enough to ignore.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter

import numpy as np

from layerchain.routing.route import COLUMNS, RoutePeer

def peer_table(peers: Sequence[RoutePeer]) -> tuple[Sequence[str], np.ndarray]:
    """``(ids, [P, 6] float64 columns of COLUMNS)``: one pass over the peers, or none for
    ``RoutePeers`` (which carry theirs).

    Each RoutePeer packs its numbers once when made (``RoutePeer._row``), so the table is
    one bytes join read by numpy (reading the fields of 10,000 peers one by one took ~7
    ms on a loaded core, most of it fetching cache-cold objects)."""
    if isinstance(peers, RoutePeers):
        return peers.ids, peers.cols
    count = len(peers)
    ids = list(map(attrgetter("id"), peers))
    try:
        flat = np.frombuffer(b"".join(map(attrgetter("_row"), peers)), np.float64)
    except AttributeError:  # objects made without __post_init__: field by field
        flat = np.stack([np.fromiter(map(attrgetter(name), peers), np.float64, count=count)
                         for name in COLUMNS], axis=1)
    return ids, flat.reshape(count, len(COLUMNS))


class RoutePeers(tuple[RoutePeer, ...]):
    """An immutable snapshot of peers that carries the planner's table of them
    (``peer_table``: ids and ``[P, 6]`` numbers) and an id -> peer map, so planning over
    it reads no peer object. A client keeps one and rebuilds only what changed between
    plans (``client.peers.PeerView.snapshot``). ``cols`` is read-only and must be the rows
    of the peers, ``ids`` their ids (``RoutePeers(peers)`` computes both; a caller passing
    its own vouches for them: tests check the client's against a fresh table)."""

    ids: tuple[str, ...]
    cols: np.ndarray

    def __new__(cls, peers: Iterable[RoutePeer] = (), cols: np.ndarray | None = None,
                ids: tuple[str, ...] | None = None) -> RoutePeers:
        self = super().__new__(cls, peers)
        self.ids = tuple(map(attrgetter("id"), self)) if ids is None else ids
        if len(self.ids) != len(self):
            raise ValueError(f"{len(self.ids)} ids for {len(self)} peers")
        if cols is None:
            cols = peer_table(tuple(self))[1]
        if cols.shape != (len(self), len(COLUMNS)):
            raise ValueError(f"a table of shape {cols.shape} for {len(self)} peers")
        if cols.flags.writeable:
            cols = cols.copy()
            cols.flags.writeable = False
        self.cols = cols
        return self

    @cached_property
    def by_id(self) -> dict[str, RoutePeer]:
        """``{id: peer}`` (the last of a repeated id, as ``dict(zip(...))`` gives)."""
        return dict(zip(self.ids, self))


@dataclass(frozen=True)
class Layout:
    """The (block, peer) pairs of a PeerArrays, flattened: the rows active at block ``b``
    are ``rows[ptr[b]:ptr[b + 1]]`` (ascending), ``block[k]`` the block of pair ``k``."""

    rows: np.ndarray  # [T] int64, T = sum of the clipped span lengths
    ptr: list[int]  # [n + 1] offsets (Python ints: slicing with them is cheapest)
    block: np.ndarray  # [T] float64


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

    @classmethod
    def build(
        cls, peers: Sequence[RoutePeer], start: int, end: int, exclude: Iterable[str] = (),
        *, table: tuple[Sequence[str], np.ndarray] | None = None,
    ) -> PeerArrays:
        """The arrays of ``peers`` over ``[start, end)`` without the ids of ``exclude``.
        ``table``: ``peer_table(peers)`` if the caller has it already."""
        banned = set(exclude)
        peers = tuple(peers)
        count = len(peers)
        ids, cols = peer_table(peers) if table is None else table
        usable = (cols[:, 0] < end) & (cols[:, 1] > start)
        if banned:
            usable &= np.fromiter((i not in banned for i in ids), bool, count=count)
        rows = np.flatnonzero(usable)
        kept = peers if len(rows) == count else tuple(peers[i] for i in rows.tolist())
        n = end - start
        s = np.maximum(cols[rows, 0].astype(np.int64), start) - start
        e = np.minimum(cols[rows, 1].astype(np.int64), end) - start
        return cls(peers=kept, n=n, offset=start, s=s, e=e, rtt=cols[rows, 2],
                   wait=cols[rows, 5], ms=cols[rows, 3], pr=cols[rows, 4])

    @cached_property
    def active(self) -> tuple[np.ndarray, ...]:
        """``[n]`` arrays of the rows ``i`` with ``s_i <= b < e_i`` (ascending), for each
        block ``b`` (the layout's slices: the exact search reads it)."""
        lay = self.layout
        return tuple(lay.rows[lay.ptr[b]:lay.ptr[b + 1]] for b in range(self.n))

    @cached_property
    def layout(self) -> Layout:
        """Every (block, row) pair, by block then row, as the relaxed DPs read it: built
        at once (one pass per block took ~80 x 4 numpy calls per DP range)."""
        span = self.e - self.s
        count = int(span.sum())
        rows = np.repeat(np.arange(len(span)), span)
        block = np.repeat(self.s, span) + (np.arange(count) - np.repeat(np.cumsum(span) - span,
                                                                        span))
        order = np.argsort(block, kind="stable")  # rows stay ascending within a block
        rows, block = rows[order], block[order]
        ptr: list[int] = np.searchsorted(block, np.arange(self.n + 1)).tolist()
        return Layout(rows, ptr, block.astype(np.float64))

    @cached_property
    def mirrored(self) -> PeerArrays:
        """The same peers over the mirrored range (block ``b`` reads ``n - 1 - b``): the
        cost-to-go is the forward DP run on it."""
        return PeerArrays(peers=self.peers, n=self.n, offset=0, s=self.n - self.e,
                          e=self.n - self.s, rtt=self.rtt, wait=self.wait, ms=self.ms,
                          pr=self.pr)

    def fixed_ms(self, push: bool) -> np.ndarray:
        """``[P]`` latency every hop on a peer costs whatever its length, ms: queueing, and
        in client mode the round trip (push mode adds its transfers per pair of hops)."""
        return self.wait if push else self.round_trip_and_wait

    @cached_property
    def round_trip_and_wait(self) -> np.ndarray:
        """``[P]`` rtt + queueing, ms (``fixed_ms`` in client mode; read per search fan)."""
        total: np.ndarray = self.rtt + self.wait
        return total

    def subset(self, rows: np.ndarray) -> PeerArrays:
        """The same range over the peers of ``rows`` only (row ``i`` of the result is
        ``rows[i]`` here)."""
        peers = self.peers
        return PeerArrays(peers=tuple([peers[i] for i in rows.tolist()]), n=self.n,
                          offset=self.offset, s=self.s[rows], e=self.e[rows],
                          rtt=self.rtt[rows], wait=self.wait[rows], ms=self.ms[rows],
                          pr=self.pr[rows])

    def undominated(self) -> np.ndarray:
        """Rows of the peers no other peer *dominates* (sorted): a dominator's clipped span
        contains the peer's, and its rtt, queueing, ms per block and price per block are
        each no higher. A dominated peer's every hop has a hop on its dominator over the same
        blocks no worse in latency and price, so relaxed routes (a peer may appear twice)
        over the undominated peers reach exactly the relaxed optima of all peers, for every
        weighting of latency and price (see ``relaxed_forward``).

        A sound subset of the dominated peers is found in O(P log P + n^2): with a key
        monotone in the four costs (a dominator's key is never higher), the lowest-key
        peer whose span contains each span ``[s, e)`` (a prefix minimum over the grid of
        spans) is tested against every peer of that span. Not every dominated peer is
        found (that takes O(P^2)); each one dropped has a dominator with a lower key, or
        the same key and a lower row, so following dominators ends at a kept one, which
        is all exactness needs. Random 10,000-peer swarms keep ~20-25% (more keys keep
        fewer but cost more than the smaller core saves)."""
        count = len(self.peers)
        if count < 64:
            return np.arange(count)
        fixed = self.rtt + self.wait
        half = count // 2
        key = np.zeros(count)
        for values in (fixed, self.ms, self.pr):  # each cost over its median: one scale
            key += values / max(float(np.partition(values, half)[half]), 1e-9)
        order = np.argsort(key)  # equal keys in any order: ties are broken by row below
        rank = np.empty(count, dtype=np.int64)
        rank[order] = np.arange(count)
        width = self.n + 1
        grid = np.full(width * width, count, dtype=np.int64)
        np.minimum.at(grid, self.s * width + self.e, rank)  # lowest rank per span
        grid2 = grid.reshape(width, width)  # [s, e]
        grid2 = np.minimum.accumulate(grid2[:, ::-1], axis=1)[:, ::-1]  # spans ending later
        grid2 = np.minimum.accumulate(grid2, axis=0)  # and starting earlier
        best = grid2[self.s, self.e]
        champion = order[np.minimum(best, count - 1)]
        dropped = ((best < rank) & ((key[champion] < key) | (champion < np.arange(count)))
                   & (self.rtt[champion] <= self.rtt) & (self.wait[champion] <= self.wait)
                   & (self.ms[champion] <= self.ms) & (self.pr[champion] <= self.pr))
        return np.flatnonzero(~dropped)

    def uncovered(self) -> list[tuple[int, int]]:
        """Block ranges ``[a, b)`` (absolute block numbers) that no usable peer serves."""
        n = self.n
        cover = np.cumsum(np.bincount(self.s, minlength=n + 1)
                          - np.bincount(self.e, minlength=n + 1))[:n]
        gaps: list[tuple[int, int]] = []
        for b in np.flatnonzero(cover == 0).tolist():
            if gaps and gaps[-1][1] == b + self.offset:
                gaps[-1] = (gaps[-1][0], b + self.offset + 1)
            else:
                gaps.append((b + self.offset, b + self.offset + 1))
        return gaps


@dataclass(frozen=True)
class RelaxedResult:
    """Forward DP tables over boundaries ``0..n``, and what recovers the route's hops."""

    best: np.ndarray  # [n+1] min primary cost of covering [0, b); inf when impossible
    second: np.ndarray  # [n+1] secondary cost of that route (the tie-breaker), else zeros
    back_peer: np.ndarray  # [n+1] row of the last hop's peer, -1 at 0 or when impossible
    s: np.ndarray  # [P] span starts of the rows
    w: np.ndarray  # [P] primary cost per block of the rows
    second_w: np.ndarray | None  # [P] secondary cost per block, when ties were broken by it

    def hops(self) -> list[tuple[int, int, int]]:
        """The optimal relaxed route to boundary n as ``(row, a, b)``, in order.

        The DP keeps only each boundary's last peer; where its hop starts is found again
        here: the earliest ``a`` minimising ``best[a] - a * w_p`` (the DP's running
        minimum, same arithmetic, same ties), for the route's few hops only."""
        out, b = [], len(self.best) - 1
        back_peer = self.back_peer.tolist()
        while b > 0:
            p = back_peer[b]
            a0 = int(self.s[p])
            steps = np.arange(a0, b, dtype=np.float64)
            cand = self.best[a0:b] - steps * self.w[p]
            if self.second_w is not None:
                both = np.empty(len(cand), np.complex128)
                both.real, both.imag = cand, self.second[a0:b] - steps * self.second_w[p]
                a = a0 + int(both.argmin())
            else:
                a = a0 + int(cand.argmin())
            out.append((p, a, b))
            b = a
        out.reverse()
        return out


def _sweep(lay: Layout, num: int, aw: np.ndarray, base: np.ndarray, track: bool
           ) -> tuple[np.ndarray, np.ndarray]:
    """The DP loop. ``aw`` and ``base`` are ``[T]`` per pair (``a * w_p`` and ``fixed_p +
    b * w_p`` for the pair's ``a = b - 1``), real or complex (secondary cost as the
    imaginary part). Returns ``best`` ``[n+1]`` and, when ``track``, ``back_peer``
    ``[n+1]`` (else an empty array). Several weightings run one after another: a loop
    over ``[pairs, K]`` arrays was slower than K loops (numpy's 2-D gathers)."""
    n = len(lay.ptr) - 1
    unset = complex(np.inf, np.inf) if aw.dtype.kind == "c" else np.inf
    best = np.full(n + 1, unset, aw.dtype)
    best[0] = 0.0
    back_peer = np.full(n + 1 if track else 0, -1, dtype=np.int64)
    run = np.full(num, unset, aw.dtype)  # M_p: min over a so far of best[a] - a * w_p
    rows, ptr = lay.rows, lay.ptr
    for b in range(1, n + 1):
        lo, hi = ptr[b - 1], ptr[b]
        if lo == hi:
            continue
        idx = rows[lo:hi]  # peers that can start a hop at b - 1 are those ending one at b
        cur = np.minimum(run[idx], best[b - 1] - aw[lo:hi])  # inf if b - 1 is unreachable
        run[idx] = cur
        val = base[lo:hi] + cur
        j = int(val.argmin())
        value = val[j]
        if value.real < np.inf:
            best[b] = value
            if track:
                back_peer[b] = idx[j]
    return best, back_peer


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
    lay = arr.layout
    rows, block = lay.rows, lay.block
    wf = w[rows]
    n = arr.n
    if second_fixed is None or second_w is None:
        best, back_peer = _sweep(lay, len(arr.peers), block * wf,
                                 fixed[rows] + (block + 1) * wf, True)
        return RelaxedResult(best, np.zeros(n + 1), back_peer, arr.s, w, None)
    # (primary, secondary) as complex numbers: numpy orders them lexicographically
    wf2 = second_w[rows]
    aw = np.empty(len(rows), np.complex128)
    base = np.empty(len(rows), np.complex128)
    aw.real, aw.imag = block * wf, block * wf2
    base.real = fixed[rows] + (block + 1) * wf
    base.imag = second_fixed[rows] + (block + 1) * wf2
    both, back_peer = _sweep(lay, len(arr.peers), aw, base, True)
    return RelaxedResult(both.real.copy(), both.imag.copy(), back_peer, arr.s, w, second_w)


def relaxed_cost_to_go(arr: PeerArrays, fixed: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``h[b]`` = min relaxed cost of covering ``[b, n)``, for ``b`` in ``0..n`` ([n+1]).

    The same DP run on the mirrored range; it is a consistent lower bound of the true
    cost-to-go for every edge whose cost is at least ``fixed_p + blocks * w_p``."""
    mirror = arr.mirrored
    lay = mirror.layout
    rows, block = lay.rows, lay.block
    wf = w[rows]
    best, _ = _sweep(lay, len(mirror.peers), block * wf, fixed[rows] + (block + 1) * wf, False)
    cost_to_go: np.ndarray = best[::-1].copy()
    return cost_to_go

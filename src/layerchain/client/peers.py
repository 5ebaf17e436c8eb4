"""The client's view of the swarm: records, measured RTTs and speeds, bans and connections.

Feeds the pure planner (layerchain.routing) with snapshots; holds no routing logic itself.
Nothing a peer says is taken on its word:

* Records come from ``Discovery.find`` (signed and range-checked by ``discovery.records``)
  and are checked again here (``usable_record``): this model, a span inside it, not a
  tombstone, expiring neither in the past nor more than ``MAX_RECORD_TTL_S`` ahead.
* Speed: a record's ``ms_per_block`` is a claim. ``observe_step`` turns each completed
  one-token step of a hop into a measured ms per block (the step's wall time less the
  peer's RTT, per block; ``measured_ms_per_block``), averaged; once a peer has
  ``speed_samples`` of them, routes use the measurement instead of the claim
  (``routing_ms_per_block``). A peer that claims 0 ms and delivers 50 ms is routed as the
  50 ms peer it is. A measurement not renewed for ``speed_memory_s`` is forgotten.
* Bans: a peer that fails is banned for ``ban_base_s * 2**(failures-1)`` seconds, capped
  at ``ban_max_s``. A ban sticks to the identity, the peer id *and* its wallet: coming
  back at a new endpoint, or under a new peer id paid to the same wallet, lifts nothing
  (a node that took a payment and failed cannot launder its ban). Failures are forgiven
  ``ban_max_s`` after the last ban ends.
* ``avoid(peer_id, seconds, reason)``: left out of plans for a while without a ban and
  without a failure (a "busy" answer, or a request too large for that peer).
* Bounded state: at most ``max_peers`` records (known peers stay first), ``max_pings`` new
  peers pinged per refresh, ``max_connections`` open connections (one per peer id; the
  least recently used idle ones close first; one whose peer left or moved closes at the
  next refresh). RTTs and speeds of departed peers are dropped.
* Connections: a record lists up to 4 endpoints, best first (a node's LAN address, then its
  other interfaces, then a relay). ``dial_first`` tries them in that order, starting the
  next one ``ENDPOINT_STAGGER_S`` after the previous (or at once when it fails: RFC 8305's
  "happy eyeballs"), keeps the first that answers and closes the others; every dial asks
  the other end to prove the record's peer id (``PeerAuthFailed`` otherwise). RTTs are
  measured on the connection kept. The endpoint that answered is tried first the next
  time (``preferred_order``), so a reconnection does not wait on a dead one again.
* Spending: with no ``max_price``, a route may cost at most ``max_price_multiple`` times
  the swarm's median price per block (``routing.default_max_price``).
* Load (``routing.load``): a peer's announced load (steps in flight x step time) plus this
  client's own sessions open on it become its ``queue_ms``, and its latency terms are
  scaled by this client's fixed jitter factor (``route_jitter``), so concurrent
  generations and concurrent clients spread over equivalent peers. Busy is avoided, not
  banned.

Churn: records are re-read when older than ``refresh_s``, and at once whenever the usable
peers leave a block uncovered, so a node that joined since the last read is found by the
very failover that needs it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import os
import random
import time
from collections import OrderedDict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from itertools import repeat
from typing import cast

import numpy as np

from layerchain.client.config import ClientConfig, RouteLimits
from layerchain.discovery import Discovery, PeerRecord, check_fresh
from layerchain.errors import (
    ConfigError,
    LayerchainError,
    NoRoute,
    PeerAuthFailed,
    PeerError,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
)
from layerchain.routing import (
    RoutePeer,
    RoutePeers,
    RoutePlan,
    Snapshot,
    default_max_price,
    median_block_prices,
    plan_span,
)
from layerchain.routing.load import MAX_QUEUE_MS, expected_queue_ms, jitter_factor
from layerchain.routing.route import COLUMNS, MAX_MS_PER_BLOCK, MAX_RTT_MS
from layerchain.wire import messages as m
from layerchain.wire.rpc import RpcClient
from layerchain.wire.transport import Connection, Transport

log = logging.getLogger(__name__)

UNKNOWN_RTT_MS = 1000.0  # the planner's guess for a peer not pinged yet
ENDPOINT_STAGGER_S = 0.25  # a peer's next endpoint is dialled this long after the previous
# one if that has not answered yet (RFC 8305 suggests 0.25 s)
SESSION_IDLE_S = 30.0  # a connection used by a session may close this long after its last use


# ---------------------------------------------------------------- pure rules


def usable_record(record: PeerRecord, model_id: str, num_blocks: int, now: float) -> bool:
    """Whether a client may plan with ``record`` at ``now`` (unix s): of ``model_id``, a
    span inside ``[0, num_blocks)``, not a tombstone, fresh and not too far ahead."""
    if record.model_id != model_id or record.end > num_blocks or not record.endpoints:
        return False
    try:
        check_fresh(record, now)
    except ProtocolError:
        return False
    return True


@dataclass(frozen=True)
class MeasuredSpeed:
    """What a client measured of one peer's steps."""

    ms_per_block: float  # mean of the samples (then moving average), ms per block per token
    samples: int  # one-token steps measured
    at: float  # monotonic time of the last one, s


def measured_ms_per_block(seconds: float, rtt_ms: float, blocks: int) -> float:
    """One step's compute time per block: its wall time (``seconds``) less the round trip
    the planner counts separately, per block; clamped to ``[0, MAX_MS_PER_BLOCK]``."""
    return min(MAX_MS_PER_BLOCK, max(0.0, (1000.0 * seconds - rtt_ms) / blocks))


def add_sample(old: MeasuredSpeed | None, sample: float, now: float, config: ClientConfig
               ) -> MeasuredSpeed:
    """``old`` with one more sample: the mean of the first ones, then a moving average of
    weight ``speed_smoothing``; a measurement older than ``speed_memory_s`` starts over."""
    if old is None or now - old.at > config.speed_memory_s:
        return MeasuredSpeed(sample, 1, now)
    n = old.samples + 1
    w = max(config.speed_smoothing, 1.0 / n)
    return MeasuredSpeed((1 - w) * old.ms_per_block + w * sample, n, now)


def routing_ms_per_block(claimed: float, measured: MeasuredSpeed | None, now: float,
                         config: ClientConfig) -> float:
    """The ms per block a route is planned with: the measurement once it has
    ``speed_samples`` samples and is younger than ``speed_memory_s``, else the claim."""
    if (measured is None or measured.samples < config.speed_samples
            or now - measured.at > config.speed_memory_s):
        return min(claimed, MAX_MS_PER_BLOCK)
    return measured.ms_per_block


async def dial_first(
    transport: Transport,
    peer_id: str,
    endpoints: tuple[str, ...],
    timeout_s: float,
    stagger_s: float = ENDPOINT_STAGGER_S,
) -> tuple[str, Connection]:
    """``(endpoint, connection)``: the first of ``endpoints`` (best first) whose other end
    answers and proves ``peer_id``; the others are cancelled or closed.

    Endpoint ``i + 1`` is dialled ``stagger_s`` after endpoint ``i`` or as soon as it
    fails, whichever comes first; of those answering in the same instant the earliest in
    the list wins. Raises, once all failed or ``timeout_s`` passed: ``PeerAuthFailed`` if
    any endpoint answered with another key (someone in the middle, or another node),
    ``PeerTimeout`` if some were still dialling, else ``PeerUnreachable`` naming each
    endpoint's error.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    dials: dict[asyncio.Task[Connection], int] = {}  # dial -> index in endpoints
    errors: dict[int, BaseException] = {}
    won: tuple[int, Connection] | None = None
    started = 0
    try:
        while won is None:
            if started < len(endpoints):
                dials[loop.create_task(transport.connect(endpoints[started], peer_id=peer_id))] \
                    = started
                started += 1
            if not dials:
                break
            left = deadline - loop.time()
            if left <= 0:
                break
            wait_s = min(stagger_s, left) if started < len(endpoints) else left
            done, _ = await asyncio.wait(dials, timeout=wait_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=dials.__getitem__):
                index = dials.pop(task)
                error = task.exception()
                if error is not None:
                    errors[index] = error
                elif won is None:
                    won = (index, task.result())
                else:
                    _close_in_background(task.result())
    finally:
        for task in dials:  # still dialling: cancel, and close one that connects anyway
            task.cancel()
            task.add_done_callback(_close_late_connection)
    if won is not None:
        for index, error in errors.items():  # someone else's key: worth a warning
            log.log(logging.WARNING if isinstance(error, PeerAuthFailed) else logging.INFO,
                    "peer %s: endpoint %s failed (%s); using %s", peer_id, endpoints[index],
                    error, endpoints[won[0]])
        return endpoints[won[0]], won[1]
    for error in errors.values():  # a bug, not a network failure: let it show
        if not isinstance(error, (OSError, LayerchainError, asyncio.TimeoutError)):
            raise error
    auth = [e for e in errors.values() if isinstance(e, PeerAuthFailed)]
    if auth:
        raise auth[0]
    if dials:
        raise PeerTimeout(f"peer {peer_id} did not accept a connection within {timeout_s:g} s")
    hints = [e.hint for e in errors.values() if isinstance(e, LayerchainError) and e.hint]
    raise PeerUnreachable(
        f"peer {peer_id}: " + "; ".join(f"{endpoints[i]}: {_reason(e)}"
                                        for i, e in sorted(errors.items())),
        hint=hints[0] if hints else None,
    )


def preferred_order(endpoints: tuple[str, ...], reached: str | None) -> tuple[str, ...]:
    """Pure: ``endpoints`` (the record's order) with ``reached``, the one that answered
    last time, moved to the front if the record still lists it."""
    if reached is None or reached not in endpoints or endpoints[0] == reached:
        return endpoints
    return (reached, *(e for e in endpoints if e != reached))


def _reason(error: BaseException) -> str:
    return error.message if isinstance(error, LayerchainError) else str(error) or type(error).__name__


_CLOSING: set[asyncio.Task[None]] = set()  # closes of dials that lost (the loop holds
# tasks only weakly)


def _close_in_background(conn: Connection) -> None:
    task = asyncio.get_running_loop().create_task(conn.close())
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


def _close_late_connection(task: asyncio.Task[Connection]) -> None:
    if not task.cancelled() and task.exception() is None:
        _close_in_background(task.result())


@dataclass
class _Connection:
    endpoint: str  # the endpoint it was opened to (a record that drops it closes it)
    rpc: RpcClient
    used_at: float  # monotonic time a session last asked for it, s
    probe: bool  # opened for a ping and not handed to a session since


class _RouteCache:
    """What ``PeerView.snapshot`` keeps between calls for one order of record ids: each
    record's numbers as arrays, the last RoutePeers and their table."""

    def __init__(self, ids: list[str], config: ClientConfig, old: _RouteCache | None) -> None:
        count = len(ids)
        self.ids, self.config = ids, config
        self.index = {peer_id: i for i, peer_id in enumerate(ids)}
        self.records: list[PeerRecord | None] = [None] * count  # the records last read
        self.start, self.end = np.zeros(count), np.zeros(count)
        self.span, self.price = np.zeros(count), np.zeros(count)
        self.claimed = np.zeros(count)  # min(record ms_per_block, MAX_MS_PER_BLOCK)
        self.queued = np.zeros(count)  # announced steps in flight, sanitised (0 if none)
        self.step = np.zeros(count)  # announced step ms, NaN when none (span x speed then)
        self.peers: list[RoutePeer | None] = [None] * count
        self.cols = np.full((count, len(COLUMNS)), np.nan)
        self.snapshot: RoutePeers | None = None
        if old is not None:  # RoutePeers of peers still there may be reused
            rows = [old.index.get(peer_id, -1) for peer_id in ids]
            for i, j in enumerate(rows):
                if j >= 0:
                    self.peers[i] = old.peers[j]
            kept = np.array(rows, dtype=np.int64)
            known = kept >= 0
            self.cols[known] = old.cols[kept[known]]

    def read(self, i: int, record: PeerRecord) -> None:
        """Row ``i``'s numbers from its record (a new one, or re-read)."""
        self.records[i] = record
        self.start[i], self.end[i] = record.start, record.end
        self.span[i] = record.end - record.start
        self.price[i] = float(record.price_per_block)
        self.claimed[i] = min(record.ms_per_block, MAX_MS_PER_BLOCK)
        load = record.load
        queued = load.queued_steps if load is not None else 0.0
        self.queued[i] = queued if math.isfinite(queued) and queued > 0 else 0.0
        self.step[i] = load.step_ms if load is not None and load.step_ms > 0 else math.nan

    def peers_for(self, cols: np.ndarray, records: list[PeerRecord]) -> RoutePeers:
        """The RoutePeers of ``cols``: the last ones where their row is unchanged."""
        changed = np.flatnonzero((cols != self.cols).any(axis=1))
        if len(changed) == 0 and self.snapshot is not None:
            return self.snapshot
        peers = self.peers
        for i in changed.tolist():
            record, row = records[i], cols[i].tolist()
            peers[i] = RoutePeer(id=record.peer_id, start=record.start, end=record.end,
                                 ms_per_block=row[3], price_per_block=row[4], rtt_ms=row[2],
                                 queue_ms=row[5])
        self.cols = cols
        cols.flags.writeable = False
        self.snapshot = RoutePeers(cast(list[RoutePeer], peers), cols=cols,
                                   ids=tuple(self.ids))
        return self.snapshot


# ---------------------------------------------------------------- the view


class PeerView:
    """Records, RTTs, measured speeds, bans and one connection per peer, for one model."""

    def __init__(
        self,
        discovery: Discovery,
        transport: Transport,
        model_id: str,
        num_blocks: int,
        config: ClientConfig,
    ) -> None:
        self.discovery = discovery
        self.transport = transport
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.config = config
        self.records: dict[str, PeerRecord] = {}
        self.rtt_ms: dict[str, float] = {}  # peer id -> smoothed ping RTT, ms
        self._speed: dict[str, MeasuredSpeed] = {}  # peer id -> measured speed
        self._failures: dict[str, int] = {}  # peer id -> failures not yet forgiven
        self._banned_until: dict[str, float] = {}  # peer id -> monotonic s
        self._wallet_failures: dict[str, int] = {}  # lower-case wallet -> failures
        self._wallet_banned_until: dict[str, float] = {}  # lower-case wallet -> monotonic s
        self._avoid_until: dict[str, float] = {}  # peer id -> monotonic s
        self._clients: OrderedDict[str, _Connection] = OrderedDict()  # peer id, LRU first
        self._reached: dict[str, str] = {}  # peer id -> the endpoint that answered last
        self._closing: set[asyncio.Task[None]] = set()
        self._prices: tuple[dict[str, PeerRecord], tuple[float, ...]] | None = None
        self._random = random.Random()
        self._sessions: dict[str, set[str]] = {}  # peer id -> this client's open session ids
        self._jitter_seed = os.urandom(16)  # this client's own jitter (routing.load)
        self._jitter: dict[str, float] = {}  # peer id -> its factor (a hash: kept)
        self._refreshed_at = 0.0
        self._lock = asyncio.Lock()
        self._route_cache: _RouteCache | None = None  # what snapshot() keeps between plans
        self._skipped: tuple[RoutePeers, frozenset[str], RoutePeers] | None = None

    # ---------------------------------------------------------------- records

    async def refresh(self, force: bool = False) -> None:
        """Re-read the records when forced, stale (older than ``refresh_s``), or when the
        usable peers leave a gap (a failover needs a peer we may not know of yet)."""
        async with self._lock:
            fresh = time.monotonic() - self._refreshed_at < self.config.refresh_s
            if not force and fresh and not self.uncovered(self.unavailable()):
                return
            found = await self.discovery.find(self.model_id, self.num_blocks)
            now = time.time()
            usable = [r for r in found if usable_record(r, self.model_id, self.num_blocks, now)]
            if len(usable) < len(found):
                log.warning("ignored %d unusable peer records", len(found) - len(usable))
            old, self.records = self.records, {r.peer_id: r for r in self._capped(usable)}
            self._refreshed_at = time.monotonic()
            for peer_id, record in self.records.items():  # a round trip is an endpoint's:
                if peer_id in old and old[peer_id].endpoints != record.endpoints:  # re-ping
                    self.rtt_ms.pop(peer_id, None)  # (a measured speed is the peer's: kept)
            self._prune()
            new = [p for p in self.records if p not in self.rtt_ms]
            if len(new) > self.config.max_pings:
                new = self._random.sample(new, self.config.max_pings)
            # connect to every new peer first, then ping each twice: a ping timed while this
            # loop runs other peers' TLS handshakes would read their CPU time as distance
            room = max(0, self.config.max_connections - len(self._clients))  # (none trimmed)
            await asyncio.gather(*(self._connection(p, probe=True) for p in new[:room]),
                                 return_exceptions=True)  # (a failure is measure_rtt's ban)
            await asyncio.gather(*(self.measure_rtt(p, pings=2) for p in new))

    def _capped(self, records: list[PeerRecord]) -> list[PeerRecord]:
        """At most ``max_peers`` records: those already known first, then a random sample
        (so a flood of fresh identities cannot choose which honest peers drop out)."""
        if len(records) <= self.config.max_peers:
            return records
        log.warning("%d peer records, keeping %d", len(records), self.config.max_peers)
        known = [r for r in records if r.peer_id in self.records]
        new = [r for r in records if r.peer_id not in self.records]
        self._random.shuffle(new)
        return (known + new)[: self.config.max_peers]

    def _prune(self) -> None:
        """Drop the state of peers that left or moved, and bans long forgiven."""
        for peer_id, conn in list(self._clients.items()):
            record = self.records.get(peer_id)
            if record is None or conn.endpoint not in record.endpoints:
                self._drop_connection(peer_id)
        for peer_id in [p for p in self.rtt_ms if p not in self.records]:
            del self.rtt_ms[peer_id]
        for peer_id in [p for p in self._speed if p not in self.records]:
            del self._speed[peer_id]
        for peer_id in [p for p in self._reached if p not in self.records]:
            del self._reached[peer_id]
        for peer_id in [p for p in self._jitter if p not in self.records]:
            del self._jitter[peer_id]
        now = time.monotonic()
        forgiven = now - self.config.ban_max_s
        cap = 4 * self.config.max_peers  # ban entries kept at most, per kind
        for until, failures in ((self._banned_until, self._failures),
                                (self._wallet_banned_until, self._wallet_failures)):
            stale = [k for k, t in until.items() if t < forgiven]
            if len(until) - len(stale) > cap:  # the soonest to end go first
                stale += sorted((k for k in until if until[k] >= forgiven),
                                key=until.__getitem__)[: len(until) - len(stale) - cap]
            for key in stale:
                del until[key]
            for key in [k for k in failures if k not in until]:
                del failures[key]
        for peer_id in [p for p, t in self._avoid_until.items() if t <= now]:
            del self._avoid_until[peer_id]

    async def wait_for_coverage(self) -> None:
        """Refresh until every block has a peer, or raise NoRoute after ``discovery_wait_s``."""
        deadline = time.monotonic() + self.config.discovery_wait_s
        while True:
            await self.refresh(force=True)
            missing = self.uncovered()
            if not missing:
                return
            if time.monotonic() > deadline:
                raise NoRoute(
                    f"blocks {missing} of model {self.model_id[:12]} have no peer in the swarm",
                    hint="start nodes serving them or check --initial-peers",
                )
            await asyncio.sleep(0.5)

    def uncovered(self, exclude: AbstractSet[str] = frozenset()) -> str:
        """The blocks no known peer (outside ``exclude``) serves, as "a:b, c:d"; "" if none.
        The client's ``private_blocks`` (it runs them itself) need no peer."""
        covered = [b < self.config.private_blocks for b in range(self.num_blocks)]
        for r in self.records.values():
            if r.peer_id in exclude:
                continue
            for b in range(r.start, min(r.end, self.num_blocks)):
                covered[b] = True
        gaps, b = [], 0
        while b < self.num_blocks:
            if not covered[b]:
                a = b
                while b < self.num_blocks and not covered[b]:
                    b += 1
                gaps.append(f"{a}:{b}")
            b += 1
        return ", ".join(gaps)

    # ---------------------------------------------------------------- connections

    def endpoint(self, peer_id: str) -> str:
        """The endpoint of a known peer that answered last, else its record's best."""
        return preferred_order(self.records[peer_id].endpoints, self._reached.get(peer_id))[0]

    async def client(self, peer_id: str) -> RpcClient:
        """The connection to a known peer (KeyError if unknown), opened if needed."""
        return (await self._connection(peer_id, probe=False)).rpc

    @property
    def open_connections(self) -> int:
        return len(self._clients)

    async def _connection(self, peer_id: str, probe: bool) -> _Connection:
        record = self.records[peer_id]
        conn = self._clients.get(peer_id)
        if conn is not None and (conn.rpc.closed or conn.endpoint not in record.endpoints):
            self._drop_connection(peer_id)
            conn = None
        if conn is None:
            # An endpoint this transport cannot dial (mem:// on TCP: ConfigError) or that
            # refuses (OSError) is the peer's fault, never the user's: a hop failure, a ban.
            endpoint, raw = await dial_first(
                self.transport, peer_id,
                preferred_order(record.endpoints, self._reached.get(peer_id)),
                self.config.connect_timeout_s,
            )
            self._reached[peer_id] = endpoint
            conn = self._clients.get(peer_id)  # another task may have connected meanwhile
            if conn is None or conn.rpc.closed or conn.endpoint not in record.endpoints:
                if conn is not None:
                    self._drop_connection(peer_id)
                conn = _Connection(endpoint, RpcClient(raw), time.monotonic(), probe)
                self._clients[peer_id] = conn
                self._trim(keep=peer_id)
            else:
                self._close_soon(RpcClient(raw))
        self._clients.move_to_end(peer_id)
        if not probe:
            conn.probe, conn.used_at = False, time.monotonic()
        return conn

    def _trim(self, keep: str = "") -> None:
        """Close least recently used idle connections beyond ``max_connections``: those
        only pinged first, then those no session used for ``SESSION_IDLE_S``. Busy ones
        and ``keep`` (the one being handed out) stay: the cap is exceeded only while every
        connection is in use."""
        excess = len(self._clients) - self.config.max_connections
        if excess <= 0:
            return
        now = time.monotonic()
        idle = [p for p, c in self._clients.items() if p != keep and c.rpc.pending == 0
                and (c.probe or now - c.used_at > SESSION_IDLE_S)]
        idle.sort(key=lambda p: not self._clients[p].probe)  # stable: LRU within each kind
        for peer_id in idle[:excess]:
            self._drop_connection(peer_id)

    def _drop_connection(self, peer_id: str) -> None:
        conn = self._clients.pop(peer_id, None)
        if conn is not None:
            self._close_soon(conn.rpc)

    def _close_soon(self, rpc: RpcClient) -> None:
        task = asyncio.get_running_loop().create_task(rpc.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def measure_rtt(self, peer_id: str, pings: int = 1) -> float | None:
        """Ping a peer ``pings`` times in a row; update its smoothed RTT with the fastest
        (one slow reply is often this side's loop busy elsewhere, not the peer's distance).
        A failed ping bans it."""
        try:
            rpc = (await self._connection(peer_id, probe=True)).rpc
            sample = math.inf
            for nonce in range(1, max(1, pings) + 1):
                t0 = time.perf_counter()
                await rpc.call(m.Ping(rid=0, nonce=nonce), timeout=self.config.ping_timeout_s)
                sample = min(sample, 1000.0 * (time.perf_counter() - t0))
        except PeerError as error:
            self.ban(peer_id, f"ping failed: {error}")
            return None
        old = self.rtt_ms.get(peer_id)
        w = self.config.rtt_smoothing
        self.rtt_ms[peer_id] = sample if old is None else (1 - w) * old + w * sample
        self._trim()
        return self.rtt_ms[peer_id]

    async def close(self) -> None:
        for peer_id in list(self._clients):
            self._drop_connection(peer_id)
        await asyncio.gather(*list(self._closing))

    # ---------------------------------------------------------------- measured speed

    def observe_step(self, peer_id: str, blocks: int, tokens: int, seconds: float) -> None:
        """One completed step of a hop over ``blocks`` blocks and ``tokens`` tokens that took
        ``seconds`` of wall time (send to reply). One-token steps update the peer's
        measured speed; longer ones (prefill, replay) are not per-token comparable and are
        ignored. O(1): called once per hop per decode step."""
        if tokens != 1 or blocks < 1 or peer_id not in self.records:
            return
        if not (math.isfinite(seconds) and seconds >= 0):
            return
        sample = measured_ms_per_block(seconds, self.rtt_ms.get(peer_id, 0.0), blocks)
        self._speed[peer_id] = add_sample(self._speed.get(peer_id), sample,
                                          time.monotonic(), self.config)

    def speed(self, peer_id: str) -> float:
        """The ms per block routes use for a known peer now (measured or claimed)."""
        return routing_ms_per_block(self.records[peer_id].ms_per_block,
                                    self._speed.get(peer_id), time.monotonic(), self.config)

    # ---------------------------------------------------------------- bans and planning

    def _wallet(self, peer_id: str) -> str:
        record = self.records.get(peer_id)
        return record.wallet.lower() if record is not None else ""

    def ban(self, peer_id: str, reason: str, *, proven: bool = False) -> None:
        """Leave ``peer_id`` and every peer paid to its wallet out of plans, for longer
        at each failure (``ban_base_s`` doubling, at most ``ban_max_s``); ``proven``: it was
        caught lying (an audit and a referee), so for ``ban_max_s`` at once."""
        wallet = self._wallet(peer_id)
        failures = 1 + max(self._failures.get(peer_id, 0),
                           self._wallet_failures.get(wallet, 0) if wallet else 0)
        seconds = min(self.config.ban_max_s, self.config.ban_base_s * 2.0 ** min(failures - 1, 32))
        if proven:
            seconds = self.config.ban_max_s
        until = time.monotonic() + seconds
        self._failures[peer_id] = failures
        self._banned_until[peer_id] = until
        if wallet:
            self._wallet_failures[wallet] = failures
            self._wallet_banned_until[wallet] = until
        log.warning("banned peer %s for %.0f s: %s", peer_id, seconds, reason)

    def unban(self, peer_id: str) -> None:
        """Lift a peer's ban (and its wallet's) now; failure counts stay, so a next ban
        lasts longer."""
        self._banned_until.pop(peer_id, None)
        self._avoid_until.pop(peer_id, None)
        wallet = self._wallet(peer_id)
        if wallet:
            self._wallet_banned_until.pop(wallet, None)

    def banned(self) -> set[str]:
        """Peer ids banned now: by their own id, or through their record's wallet."""
        now = time.monotonic()
        out = {p for p, until in self._banned_until.items() if until > now}
        wallets = {w for w, until in self._wallet_banned_until.items() if until > now}
        if wallets:
            out |= {r.peer_id for r in self.records.values() if r.wallet.lower() in wallets}
        return out

    def avoid(self, peer_id: str, seconds: float, reason: str) -> None:
        """Leave ``peer_id`` out of plans for ``seconds`` (at most ``ban_max_s``) without a
        ban: its failure count does not grow. For answers that say "not now" (busy) or
        "not this request" (too large for it), not "I am broken"."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ConfigError(f"avoid() needs a finite number of seconds >= 0, not {seconds!r}")
        until = time.monotonic() + min(seconds, self.config.ban_max_s)
        self._avoid_until[peer_id] = max(until, self._avoid_until.get(peer_id, 0.0))
        log.info("avoiding peer %s for %.1f s: %s", peer_id, seconds, reason)

    def avoided(self) -> set[str]:
        """Peer ids left out of plans for now without a ban."""
        now = time.monotonic()
        return {p for p, until in self._avoid_until.items() if until > now}

    def unavailable(self) -> set[str]:
        """Peer ids no plan may use now: banned or avoided."""
        return self.banned() | self.avoided()

    # ---------------------------------------------------------------- load

    def session_opened(self, peer_id: str, session_id: str) -> None:
        """This client opened ``session_id`` on ``peer_id`` (it counts in the peer's load)."""
        self._sessions.setdefault(peer_id, set()).add(session_id)

    def session_closed(self, peer_id: str, session_id: str) -> None:
        """``session_id`` on ``peer_id`` is closed or abandoned (idempotent)."""
        open_ = self._sessions.get(peer_id)
        if open_ is not None:
            open_.discard(session_id)
            if not open_:
                del self._sessions[peer_id]

    def own_sessions(self, peer_id: str) -> int:
        """Sessions this client has open on ``peer_id`` now."""
        return len(self._sessions.get(peer_id, ()))

    def snapshot(self, exclude: AbstractSet[str] = frozenset()) -> RoutePeers:
        """Route-planner inputs for every usable peer: measured speeds where known, the
        expected queueing from its load and this client's sessions on it, and every
        latency term scaled by this client's jitter factor for it (``routing.load``).

        Equal to ``fresh_snapshot`` (what it computes peer by peer), but kept between
        calls: only the peers whose numbers changed (records, RTTs, speeds, load, own
        sessions) get new RoutePeers, and the planner's table comes with it
        (``routing.RoutePeers``), so at 10,000 peers a plan no longer builds 10,000
        RoutePeers (~58 ms) and reads them back; what it costs per plan is in
        ``bench routing --json``'s ``"client"``."""
        skip = frozenset(self.unavailable() | set(exclude))
        full = self._all_route_peers(time.monotonic())
        if not skip:
            return full
        last = self._skipped
        if last is not None and last[0] is full and last[1] == skip:
            return last[2]
        left = np.flatnonzero(~np.fromiter(map(skip.__contains__, full.ids), bool,
                                           count=len(full)))
        if len(left) == len(full):
            out = full
        else:
            rows = left.tolist()
            out = RoutePeers([full[i] for i in rows], cols=full.cols[left],
                             ids=tuple([full.ids[i] for i in rows]))
        self._skipped = (full, skip, out)
        return out

    def _all_route_peers(self, now: float) -> RoutePeers:
        """``snapshot()`` of every record (nothing skipped), rebuilt where inputs changed.

        Each call reads what may have changed at C speed (the records' identities, the
        RTTs and jitter factors by id) or through the few peers concerned (measured
        speeds, own sessions); a record re-read (refresh) re-reads only its numbers, and a
        RoutePeer is made only for a peer whose planner numbers differ from the last."""
        records, config = self.records, self.config
        ids = list(records)
        cache = self._route_cache
        if cache is None or cache.config is not config or cache.ids != ids:
            cache = self._route_cache = _RouteCache(ids, config, self._route_cache)
        vals = list(records.values())
        changed = np.flatnonzero(np.fromiter(map(operator.is_not, vals, cache.records), bool,
                                             count=len(ids)))
        for i in changed.tolist():
            cache.read(i, vals[i])
        count = len(ids)
        ms = cache.claimed.copy()  # routing_ms_per_block, peer by peer only where measured
        index = cache.index
        for peer_id, measured in self._speed.items():
            i = index.get(peer_id)
            if i is not None:
                ms[i] = routing_ms_per_block(vals[i].ms_per_block, measured, now, config)
        own = np.zeros(count)
        for peer_id, sessions in self._sessions.items():
            i = index.get(peer_id)
            if i is not None:
                own[i] = len(sessions)
        step = np.where(np.isnan(cache.step), cache.span * ms, cache.step)
        step = np.where(np.isfinite(step) & (step > 0), step, 0.0)  # expected_queue_ms
        queue = np.minimum(MAX_QUEUE_MS, step * (cache.queued + own))
        factor = np.fromiter(map(self._jitter.get, ids, repeat(math.nan)), np.float64,
                             count=count)
        for i in np.flatnonzero(np.isnan(factor)).tolist():
            factor[i] = self._jitter[ids[i]] = jitter_factor(self._jitter_seed, ids[i],
                                                             config.route_jitter)
        rtt = np.fromiter(map(self.rtt_ms.get, ids, repeat(UNKNOWN_RTT_MS)), np.float64,
                          count=count)
        cols = np.empty((count, len(COLUMNS)))  # COLUMNS: start end rtt ms price queue
        cols[:, 0], cols[:, 1], cols[:, 4] = cache.start, cache.end, cache.price
        cols[:, 2] = np.minimum(rtt * factor, MAX_RTT_MS)
        cols[:, 3] = np.minimum(ms * factor, MAX_MS_PER_BLOCK)
        cols[:, 5] = np.minimum(queue * factor, MAX_RTT_MS)
        return cache.peers_for(cols, vals)

    def fresh_snapshot(self, exclude: AbstractSet[str] = frozenset()) -> list[RoutePeer]:
        """``snapshot()`` computed peer by peer with nothing kept: its reference."""
        skip = self.unavailable() | set(exclude)
        now = time.monotonic()
        spread = self.config.route_jitter
        peers = []
        for r in self.records.values():
            if r.peer_id in skip:
                continue
            ms = routing_ms_per_block(r.ms_per_block, self._speed.get(r.peer_id), now,
                                      self.config)
            load = r.load
            step_ms = load.step_ms if load is not None and load.step_ms > 0 else (
                (r.end - r.start) * ms)  # not measured yet: the span at its speed
            queue = expected_queue_ms(load.queued_steps if load is not None else 0.0,
                                      step_ms, self.own_sessions(r.peer_id))
            factor = self._jitter.get(r.peer_id)
            if factor is None:
                factor = self._jitter[r.peer_id] = jitter_factor(self._jitter_seed, r.peer_id,
                                                                 spread)
            peers.append(RoutePeer(
                id=r.peer_id,
                start=r.start,
                end=r.end,
                ms_per_block=min(ms * factor, MAX_MS_PER_BLOCK),
                price_per_block=float(r.price_per_block),
                rtt_ms=min(self.rtt_ms.get(r.peer_id, UNKNOWN_RTT_MS) * factor, MAX_RTT_MS),
                queue_ms=min(queue * factor, MAX_RTT_MS),
            ))
        return peers

    def block_prices(self) -> tuple[float, ...]:
        """``[num_blocks]`` median price per block over the current records (cached)."""
        if self._prices is None or self._prices[0] is not self.records:
            peers = [RoutePeer(r.peer_id, r.start, r.end, 0.0, float(r.price_per_block), 0.0)
                     for r in self.records.values()]
            self._prices = (self.records, median_block_prices(peers, self.num_blocks))
        return self._prices[1]

    def plan(
        self,
        start: int = 0,
        end: int | None = None,
        exclude: AbstractSet[str] = frozenset(),
        limits: RouteLimits | None = None,
    ) -> RoutePlan:
        """The best route over blocks ``[start, end)`` within ``limits`` (None: the
        client's). With no max_price, the route may cost at most ``max_price_multiple``
        times the swarm's median price per block."""
        limits = self.config.limits if limits is None else limits
        end = self.num_blocks if end is None else end
        multiple = self.config.max_price_multiple
        default_cap = limits.max_price is None and multiple is not None
        if limits.max_price is None and multiple is not None:
            limits = replace(limits, max_price=default_max_price(self.block_prices(), start,
                                                                 end, multiple))
        try:
            return plan_span(self.snapshot(exclude), self.num_blocks, start, end, limits)
        except NoRoute as error:
            if default_cap and "max_price" in error.message:
                raise NoRoute(
                    error.message,
                    hint=f"with no price limit given, a route may cost {multiple or 0:g}x the "
                         "swarm's median price per block; set max_price (--max-price) to "
                         "allow more",
                ) from None
            plaintext = self.plaintext_only()
            if plaintext and error.hint is None:  # the likeliest reason: say it
                raise NoRoute(
                    error.message,
                    hint=f"{plaintext} known peers serve plaintext tcp:// only; pass --insecure "
                         "to use them on a network you trust",
                ) from None
            raise

    def plaintext_only(self) -> int:
        """How many known peers this client will not dial because every endpoint they
        announce is plaintext tcp:// and ``config.insecure`` is off."""
        if self.config.insecure:
            return 0
        return sum(all(e.startswith("tcp://") for e in r.endpoints) for r in self.records.values())


async def live_snapshot(
    discovery: Discovery,
    transport: Transport,
    model_id: str,
    num_blocks: int,
    config: ClientConfig | None = None,
) -> Snapshot:
    """The live swarm as planner input: records read through ``discovery`` (checked as a
    client checks them), RTTs measured by pings over ``transport``; connections closed
    before it returns. What ``layerchain route --initial-peers`` plans over."""
    # a tool's view (``route``, ``swarm status``): the numbers as they are, no client jitter
    view = PeerView(discovery, transport, model_id, num_blocks,
                    config or ClientConfig(route_jitter=0.0))
    try:
        await view.refresh(force=True)
        return Snapshot(num_blocks, tuple(view.snapshot()), {})
    finally:
        await view.close()

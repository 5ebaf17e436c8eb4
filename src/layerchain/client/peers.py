"""The client's view of the swarm: peer records, measured RTTs, bans and connections.

Feeds the pure planner (layerchain.routing) with snapshots; holds no routing logic itself.
RTTs are measured with wire pings and smoothed (exponential moving average); a peer that
fails is banned for ``ban_base_s * 2**(failures-1)`` seconds, capped at ``ban_max_s``.

Churn: records are re-read when older than ``refresh_s``, and at once whenever the usable
(unbanned) peers leave a block uncovered, so a node that joined since the last read is
found by the very failover that needs it. A banned peer that comes back at a new endpoint
(it restarted) is given another chance: its ban is lifted, its failure count kept.
"""

from __future__ import annotations

import asyncio
import logging
import time

from layerchain.client.config import ClientConfig, RouteLimits
from layerchain.discovery import Discovery, PeerRecord
from layerchain.errors import NoRoute, PeerError, PeerTimeout, PeerUnreachable
from layerchain.routing import RoutePeer, RoutePlan, plan_span
from layerchain.wire import messages as m
from layerchain.wire.rpc import RpcClient
from layerchain.wire.transport import Transport

log = logging.getLogger(__name__)


class PeerView:
    """Records, RTTs, bans and a connection per endpoint, for one model."""

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
        self.rtt_ms: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._banned_until: dict[str, float] = {}
        self._clients: dict[str, RpcClient] = {}
        self._refreshed_at = 0.0
        self._lock = asyncio.Lock()

    # ---------------------------------------------------------------- records

    async def refresh(self, force: bool = False) -> None:
        """Re-read the records when forced, stale (older than ``refresh_s``), or when the
        usable peers leave a gap (a failover needs a peer we may not know of yet)."""
        async with self._lock:
            fresh = time.monotonic() - self._refreshed_at < self.config.refresh_s
            if not force and fresh and not self.uncovered(self.banned()):
                return
            records = await self.discovery.find(self.model_id, self.num_blocks)
            banned = self.banned()
            for r in records:
                old = self.records.get(r.peer_id)
                if old is not None and old.endpoint != r.endpoint and r.peer_id in banned:
                    log.info("peer %s restarted at %s: ban lifted", r.peer_id, r.endpoint)
                    self.unban(r.peer_id)
            self.records = {r.peer_id: r for r in records}
            self._refreshed_at = time.monotonic()
            await asyncio.gather(
                *(self.measure_rtt(r.peer_id) for r in records if r.peer_id not in self.rtt_ms)
            )

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

    def uncovered(self, exclude: set[str] = frozenset()) -> str:
        """The blocks no known peer (outside ``exclude``) serves, as "a:b, c:d"; "" if none."""
        covered = [False] * self.num_blocks
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

    async def client(self, peer_id: str) -> RpcClient:
        record = self.records[peer_id]
        rpc = self._clients.get(record.endpoint)
        if rpc is None or rpc.closed:
            try:
                conn = await asyncio.wait_for(
                    self.transport.connect(record.endpoint), self.config.connect_timeout_s
                )
            except asyncio.TimeoutError:
                raise PeerTimeout(f"peer {peer_id} did not accept a connection") from None
            except OSError as error:
                raise PeerUnreachable(f"peer {peer_id} at {record.endpoint}: {error}") from None
            rpc = RpcClient(conn)
            self._clients[record.endpoint] = rpc
        return rpc

    async def measure_rtt(self, peer_id: str) -> float | None:
        """Ping a peer; update its smoothed RTT. A failed ping bans it."""
        try:
            rpc = await self.client(peer_id)
            t0 = time.perf_counter()
            await rpc.call(m.Ping(rid=0, nonce=1), timeout=self.config.ping_timeout_s)
            sample = 1000.0 * (time.perf_counter() - t0)
        except PeerError as error:
            self.ban(peer_id, f"ping failed: {error}")
            return None
        old = self.rtt_ms.get(peer_id)
        w = self.config.rtt_smoothing
        self.rtt_ms[peer_id] = sample if old is None else (1 - w) * old + w * sample
        return self.rtt_ms[peer_id]

    async def close(self) -> None:
        for rpc in list(self._clients.values()):
            await rpc.close()
        self._clients.clear()

    # ---------------------------------------------------------------- bans and planning

    def ban(self, peer_id: str, reason: str) -> None:
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        seconds = min(self.config.ban_max_s, self.config.ban_base_s * 2 ** (failures - 1))
        self._banned_until[peer_id] = time.monotonic() + seconds
        log.warning("banned peer %s for %.0f s: %s", peer_id, seconds, reason)

    def unban(self, peer_id: str) -> None:
        """Lift a peer's ban now (its failure count stays, so a next ban lasts longer)."""
        self._banned_until.pop(peer_id, None)

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {p for p, until in self._banned_until.items() if until > now}

    def snapshot(self, exclude: set[str] = frozenset()) -> list[RoutePeer]:
        """Route-planner inputs for every usable peer."""
        skip = self.banned() | set(exclude)
        return [
            RoutePeer(
                id=r.peer_id,
                start=r.start,
                end=r.end,
                ms_per_block=r.ms_per_block,
                price_per_block=float(r.price_per_block),
                rtt_ms=self.rtt_ms.get(r.peer_id, 1000.0),
            )
            for r in self.records.values()
            if r.peer_id not in skip
        ]

    def plan(
        self,
        start: int = 0,
        end: int | None = None,
        exclude: set[str] = frozenset(),
        limits: RouteLimits | None = None,
    ) -> RoutePlan:
        """The best route over blocks ``[start, end)`` within ``limits`` (by default, and
        for each field left None, the client's)."""
        alpha, max_price, max_latency_ms = (limits or RouteLimits()).resolve(self.config)
        return plan_span(
            self.snapshot(exclude),
            self.num_blocks,
            start,
            self.num_blocks if end is None else end,
            alpha=alpha,
            max_price=max_price,
            max_latency_ms=max_latency_ms,
        )

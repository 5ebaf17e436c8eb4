"""In-process discovery for fast tests: many ``MemoryDiscovery`` objects share one ``MemoryDHT``.

The hub mimics the hivemind store's rules (entry per ``(key, sub_key)``, replaced only by a
later expiration, dropped once expired, ``check_entry`` enforced unless ``validate=False``,
which plays a malicious replica), so tests of announcing, withdrawing and expiry mean the
same thing here as on the real DHT. Time comes from the hub's ``clock`` (unix
seconds), which tests may replace to expire records without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from layerchain.discovery.base import (
    TOMBSTONE_MARGIN_S,
    DiscoveryStats,
    block_key,
    check_num_blocks,
    check_own,
    select_records,
    tombstone,
)
from layerchain.discovery.catalog import check_stored_entry
from layerchain.discovery.identity import Identity
from layerchain.discovery.records import PeerRecord, sign_record
from layerchain.errors import ProtocolError


@dataclass
class MemoryDHT:
    """The shared store: ``entries[key][sub_key] = (blob, expiration)``."""

    clock: Callable[[], float] = time.time  # unix seconds
    validate: bool = True  # enforce catalog.check_stored_entry on store, as layerchain DHT
    # nodes do (a peer record, base.check_entry, or a catalog entry)
    entries: dict[str, dict[str, tuple[bytes, float]]] = field(default_factory=dict)

    def store(self, key: str, sub_key: str, blob: bytes, expiration: float) -> bool:
        """Kademlia store rule: accept only unexpired entries newer than the one held."""
        if expiration <= self.clock():
            return False
        if self.validate:
            try:
                check_stored_entry(sub_key, blob, expiration, self.clock())
            except ProtocolError:
                return False
        held = self.entries.setdefault(key, {}).get(sub_key)
        if held is not None and held[1] >= expiration:
            return False
        self.entries[key][sub_key] = (blob, expiration)
        return True

    def get(self, key: str) -> dict[str, tuple[bytes, float]]:
        now = self.clock()
        live = {s: e for s, e in self.entries.get(key, {}).items() if e[1] > now}
        self.entries[key] = live
        return dict(live)

    def address(self) -> str:
        return f"memory://{id(self):x}"


class MemoryDiscovery:
    """``Discovery`` over a ``MemoryDHT``; no I/O, no tasks."""

    def __init__(self, hub: MemoryDHT, identity: Identity | None = None) -> None:
        self.hub = hub
        self.identity = identity or Identity.generate()
        self.stats = DiscoveryStats()
        self._closed = False

    @property
    def initial_peers(self) -> tuple[str, ...]:
        return (self.hub.address(),)

    @property
    def visible_addresses(self) -> tuple[str, ...]:
        return (self.hub.address(),)

    async def announce(self, record: PeerRecord) -> None:
        check_own(self.identity, record.peer_id)
        blob = sign_record(self.identity, record)
        stored = [
            self.hub.store(block_key(record.model_id, b), record.peer_id, blob, record.expires_at)
            for b in record.blocks
        ]
        if any(stored):
            self.stats.announced += 1

    async def withdraw(self, model_id: str, peer_id: str, start: int, end: int) -> None:
        check_own(self.identity, peer_id)
        keys = [block_key(model_id, b) for b in range(start, end)]
        held = [self.hub.get(key).get(peer_id) for key in keys]
        latest = max([self.hub.clock()] + [h[1] for h in held if h is not None])
        expiration = latest + TOMBSTONE_MARGIN_S  # outlives every entry it replaces
        blob = sign_record(self.identity, tombstone(self.identity, model_id, start, end, expiration))
        for key in keys:
            self.hub.store(key, peer_id, blob, expiration)
        self.stats.withdrawn += 1

    async def find(self, model_id: str, num_blocks: int) -> list[PeerRecord]:
        check_num_blocks(num_blocks)
        entries = [
            (b, sub_key, blob, expiration)
            for b in range(num_blocks)
            for sub_key, (blob, expiration) in self.hub.get(block_key(model_id, b)).items()
        ]
        return select_records(entries, model_id, num_blocks, self.hub.clock(), self.stats)

    async def put_entry(self, key: str, blob: bytes, expires_at: float) -> bool:
        """Store ``blob`` under ``key``, sub-keyed by this peer (the catalog's seam)."""
        return self.hub.store(key, self.identity.peer_id, blob, expires_at)

    async def get_entries(self, key: str) -> dict[str, tuple[bytes, float]]:
        return self.hub.get(key)

    async def close(self) -> None:
        self._closed = True

"""The discovery seam: how peers announce the blocks they serve and how clients find them.

Storage layout (the same for every implementation, see DESIGN.md "Network"): one DHT key per
``(model_id, block)``, ``block_key(model_id, i) == f"{model_id}.block{i}"``, holding a
dictionary sub-keyed by peer id whose values are signed record blobs (``records.py``). A
peer serving ``[start, end)`` stores its blob under each of the ``end - start`` keys, with
the entry's expiration equal to ``record.expires_at``. A client reads all ``L`` keys and
keeps, per peer, the latest valid record (``select_records``, a pure function).

Like Kademlia stores, an entry is only replaced by one with a later expiration. So a peer
*withdraws* by storing a *tombstone*: a record it signs with no ``endpoints`` ("serves
nothing"), expiring just after its last announcement, which every reader skips.

Entry rule (``check_entry``, enforced by every layerchain DHT node on store and on read,
see ``validator.py``): an entry's sub-key must be a peer id and its value a record signed
by that peer, within every cap of ``records.check_limits``, expiring exactly when the
entry does and at most ``MAX_RECORD_TTL_S`` after now. So nobody can write under another
peer's sub-key, replay a peer's old record with a longer life to push its fresh ones out,
or park a record (or anything else) that outlives the swarm's refresh cycle.

Readers trust nothing they did not verify: a blob with a bad signature, a peer id that is
not its sub-key, another model or a block outside its span is dropped and counted in
``DiscoveryStats.invalid``; an expired one in ``.expired``; a tombstone in ``.tombstones``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from layerchain.discovery.identity import Identity
from layerchain.discovery.records import MAX_BLOCKS, PeerRecord, check_expiry, open_record
from layerchain.errors import ProtocolError, SpanError

TOMBSTONE_MARGIN_S = 1e-3  # a tombstone's entry outlives the entry it replaces by this much


def block_key(model_id: str, block: int) -> str:
    """The DHT key listing the peers that serve ``block`` of ``model_id``."""
    return f"{model_id}.block{block}"


def check_num_blocks(num_blocks: int) -> int:
    if type(num_blocks) is not int or not 0 < num_blocks <= MAX_BLOCKS:
        raise SpanError(f"a model has 1..{MAX_BLOCKS} blocks, not {num_blocks!r}")
    return num_blocks


@dataclass
class DiscoveryStats:
    """Counters since the discovery object was made (mutable; read them, do not set them)."""

    announced: int = 0  # announce() calls that stored at least one entry
    withdrawn: int = 0  # withdraw() calls
    found: int = 0  # valid records returned by find(), before de-duplication
    invalid: int = 0  # blobs dropped: malformed, forged, or under the wrong key/sub-key
    expired: int = 0  # blobs dropped because expires_at <= now
    tombstones: int = 0  # withdrawn entries skipped


@runtime_checkable
class Discovery(Protocol):
    """Where peers announce their spans and clients find them. All methods are coroutines."""

    identity: Identity  # signs what this node announces
    stats: DiscoveryStats

    @property
    def initial_peers(self) -> tuple[str, ...]:
        """The addresses this instance joined through (empty for a new swarm)."""
        ...

    @property
    def visible_addresses(self) -> tuple[str, ...]:
        """Addresses others can pass as ``initial_peers`` to join through this instance."""
        ...

    async def announce(self, record: PeerRecord) -> None:
        """Sign ``record`` and store it under every block of its span until ``record.expires_at``.

        Raises ProtocolError if the record is not this node's, PeerError if nothing was stored.
        """
        ...

    async def withdraw(self, model_id: str, peer_id: str, start: int, end: int) -> None:
        """Store tombstones over blocks ``[start, end)`` so readers stop seeing this peer there."""
        ...

    async def find(self, model_id: str, num_blocks: int) -> list[PeerRecord]:
        """Every peer with a valid, unexpired record for some block in ``[0, num_blocks)``.

        One record per peer (the one expiring last), sorted by ``(start, end, peer_id)``.
        """
        ...

    async def close(self) -> None:
        """Release everything; idempotent. Does not withdraw (the Announcer does that)."""
        ...


def tombstone(
    identity: Identity, model_id: str, start: int, end: int, expires_at: float
) -> PeerRecord:
    """A record of ``identity`` saying it no longer serves ``[start, end)`` (no endpoints)."""
    return PeerRecord(
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        endpoints=(),
        model_id=model_id,
        start=start,
        end=end,
        ms_per_block=0.0,
        price_per_block=0,
        free_cache_tokens=0,
        wallet="",
        rtts=(),
        version="",
        expires_at=expires_at,
    )


def is_tombstone(record: PeerRecord) -> bool:
    return not record.endpoints


_BASE58 = frozenset(string.digits + string.ascii_letters) - set("0OIl")


def looks_like_peer_id(sub_key: object) -> bool:
    """Whether a DHT sub-key is in layerchain's peer-id namespace (see identity.py)."""
    return isinstance(sub_key, str) and 16 <= len(sub_key) <= 24 and set(sub_key) <= _BASE58


def check_entry(sub_key: object, blob: object, expiration: float, now: float) -> PeerRecord:
    """Pure: the record of a DHT entry, or ProtocolError if the entry breaks the entry rule.

    The rule: ``sub_key`` looks like a peer id, ``blob`` is a correctly signed record of
    that peer (within the caps of ``records``), the entry expires exactly when the record
    does, and not more than ``MAX_RECORD_TTL_S`` after ``now`` (unix s). An expired entry
    passes (stores drop those by their own rule; readers count them as expired).
    """
    if not looks_like_peer_id(sub_key):
        raise ProtocolError(f"DHT sub-key {str(sub_key)[:32]!r} is not a peer id")
    if not isinstance(blob, bytes):
        raise ProtocolError("a peer entry must hold a signed record blob")
    check_expiry(expiration, now)
    record = open_record(blob)
    if record.peer_id != sub_key:
        raise ProtocolError(f"record of {record.peer_id!r} stored under sub-key {sub_key!r}")
    if record.expires_at != expiration:
        raise ProtocolError(
            f"entry expires at {expiration}, but its record at {record.expires_at}"
        )
    return record


def check_own(identity: Identity, peer_id: str) -> None:
    if peer_id != identity.peer_id:
        raise ProtocolError(
            f"this node is {identity.peer_id!r}; it cannot announce or withdraw for {peer_id!r}"
        )


def select_records(
    entries: Iterable[tuple[int, object, object, float]],
    model_id: str,
    num_blocks: int,
    now: float,
    stats: DiscoveryStats,
) -> list[PeerRecord]:
    """Pure: the live records among ``(block, sub_key, blob, expiration)`` entries of a store.

    An entry counts only if it passes ``check_entry``, its record is of ``model_id``,
    ``block`` lies in its span, its span lies in ``[0, num_blocks)``, it has not expired at
    ``now`` and is not a tombstone. Per peer, the record expiring last wins.
    """
    best: dict[str, PeerRecord] = {}
    for block, sub_key, blob, expiration in entries:
        try:
            record = check_entry(sub_key, blob, expiration, now)
        except ProtocolError:
            stats.invalid += 1
            continue
        if record.model_id != model_id or block not in record.blocks or record.end > num_blocks:
            stats.invalid += 1
            continue
        if record.expires_at <= now:
            stats.expired += 1
            continue
        if is_tombstone(record):
            stats.tombstones += 1
            continue
        stats.found += 1
        current = best.get(record.peer_id)
        if current is None or record.expires_at > current.expires_at:
            best[record.peer_id] = record
    return sorted(best.values(), key=lambda r: (r.start, r.end, r.peer_id))

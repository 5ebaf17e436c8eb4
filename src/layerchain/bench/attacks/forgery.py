"""The attacker's side of the DHT: forged records, and a DHT peer that checks nothing.

Nothing here uses layerchain's checks on the attacker's side: records are signed from raw
field maps (``forge_blob``), so a field the validator would refuse can still be *sent*; the
DHT peer (``AttackerDHT``) runs hivemind without layerchain's record validator and in client
mode, so it stores nothing for others, and what a fresh peer reads back
(``held_by_honest_nodes``) is what the honest DHT nodes accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import msgpack

from layerchain.discovery import Identity, PeerRecord
from layerchain.discovery.base import block_key
from layerchain.discovery.records import open_record
from layerchain.errors import ProtocolError
from layerchain.types import Span

T = TypeVar("T")


def forge_blob(identity: Identity, template: PeerRecord, **fields: object) -> bytes:
    """A record blob signed by ``identity``: ``template``'s canonical field map with
    ``fields`` replaced as given, unchecked (a value ``PeerRecord`` would refuse is kept)."""
    body = msgpack.unpackb(template.canonical_bytes(), raw=False)
    unknown = set(fields) - set(body)
    if unknown:
        raise ValueError(f"not peer-record fields: {sorted(unknown)}")
    body.update(fields)
    payload = msgpack.packb({k: body[k] for k in sorted(body)}, use_bin_type=True)
    return msgpack.packb([payload, identity.sign(payload)], use_bin_type=True)


def accepted_claim(identity: Identity, template: PeerRecord, name: str,
                   candidates: Sequence[object]) -> object:
    """The first of ``candidates`` for field ``name`` that layerchain's own record check accepts
    (the attacker runs the open-source validator locally), else the last candidate."""
    for value in candidates:
        try:
            open_record(forge_blob(identity, template, **{name: value}))
            return value
        except ProtocolError:
            continue
    return candidates[-1]


@dataclass(frozen=True)
class Published:
    """A forged record the attacker stored: under whose sub-key, over which blocks, until when."""

    label: str  # what the attack calls it
    identity: Identity
    template: PeerRecord  # the fields that were not forged
    blocks: range
    expires_at: float  # unix s: the DHT entry's expiration (= the blob's expires_at, or not)
    stored: int  # block keys on which at least one DHT node accepted it

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


async def _store_many(_dht: object, node: object, keys: list[str], blob: bytes,
                      expiration: float, sub_key: str) -> int:
    ok = await node.store_many(  # type: ignore[attr-defined]
        keys, [blob] * len(keys), [expiration] * len(keys), subkeys=[sub_key] * len(keys)
    )
    return sum(bool(ok.get((key, sub_key))) for key in keys)


TOMBSTONE: dict[str, object] = {  # a withdrawal: serves nothing, carries no values
    "endpoints": [], "relay": False, "ms_per_block": 0.0, "price_per_block": 0, "free_cache_tokens": 0,
    "wallet": "", "rtts": [], "version": "",
}
REGULAR_VALUE = "<regular value>"  # what ``held`` reports for a key holding no dictionary


async def _store_regular(_dht: object, node: object, key: str, value: bytes, expiration: float) -> bool:
    ok = await node.store_many([key], [value], [expiration])  # type: ignore[attr-defined]
    return bool(ok.get(key))


async def _sub_keys(_dht: object, node: object, keys: list[str]) -> list[str]:
    """The sub-keys stored under any of ``keys`` on the DHT (``REGULAR_VALUE`` for a key
    whose value is not a dictionary)."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))  # type: ignore[attr-defined]
    out: set[str] = set()
    for item in found.values():
        if item is not None and isinstance(item.value, dict):
            out.update(str(k) for k in item.value)
        elif item is not None:
            out.add(REGULAR_VALUE)
    return sorted(out)


class AttackerDHT:
    """A hivemind DHT peer in client mode, without layerchain's validator: it stores and reads
    through the honest DHT nodes only. Make it with ``await AttackerDHT.start(peers)``."""

    def __init__(self, dht: object, model_id: str) -> None:
        self._dht = dht
        self.model_id = model_id
        self.published: list[Published] = []

    @classmethod
    async def start(cls, initial_peers: Sequence[str], model_id: str) -> AttackerDHT:
        import hivemind

        def make() -> object:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                # no local copies: what it reads back is what the honest nodes hold
                return hivemind.DHT(initial_peers=list(initial_peers), start=True,
                                    client_mode=True, num_workers=4, wait_timeout=3.0,
                                    cache_locally=False, cache_on_store=False, cache_nearest=0)

        return cls(await asyncio.to_thread(make), model_id)

    async def _call(self, coro: Callable[..., Awaitable[T]], timeout_s: float = 20.0,
                    **kwargs: object) -> T:
        future = self._dht.run_coroutine(partial(coro, **kwargs), return_future=True)  # type: ignore[attr-defined]
        result: T = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        return result

    async def publish(
        self, label: str, identity: Identity, template: PeerRecord,
        forged: Mapping[str, object] | None = None, blocks: range | None = None,
    ) -> Published:
        """Sign ``template`` with its ``forged`` fields replaced and store it under
        ``blocks`` (by default the template's span), as an entry expiring when the blob
        says it does."""
        forged = dict(forged or {})
        blob = forge_blob(identity, template, **forged)
        expires_at = forged.get("expires_at", template.expires_at)
        expiration = float(expires_at) if isinstance(expires_at, (int, float)) else template.expires_at
        blocks = blocks if blocks is not None else template.blocks
        keys = [block_key(self.model_id, b) for b in blocks]
        stored = await self._call(_store_many, keys=keys, blob=blob, expiration=expiration,
                                  sub_key=identity.peer_id)
        published = Published(label, identity, template, blocks, expiration, stored)
        self.published.append(published)
        return published

    async def store_junk(self, block: int, value: bytes, expires_at: float,
                         sub_key: str | None = None) -> bool:
        """Store ``value`` under ``block``'s key: a regular value (no sub-key), or under
        ``sub_key``. Whether any DHT node accepted it."""
        key = block_key(self.model_id, block)
        if sub_key is None:
            return bool(await self._call(_store_regular, key=key, value=value, expiration=expires_at))
        return bool(await self._call(_store_many, keys=[key], blob=value, expiration=expires_at,
                                     sub_key=sub_key))

    async def held(self, blocks: range) -> set[str]:
        """Sub-keys found under ``blocks``. The peer that stored them keeps its own copies
        whatever it is told, so ask a fresh one (``held_by_honest_nodes``)."""
        keys = [block_key(self.model_id, b) for b in blocks]
        return set(await self._call(_sub_keys, keys=keys))

    async def withdraw_all(self, timeout_s: float = 30.0) -> None:
        """Tombstone every record published (empty endpoint, no values, expiring just
        later), all at once, so the attack does not outlive its window; gives up after
        ``timeout_s`` (the records expire on their own)."""
        published, self.published = self.published, []  # (tombstones are not withdrawn)

        async def withdraw(p: Published) -> None:
            later = max(p.expires_at, time.time()) + 1.0
            await self.publish(p.label, p.identity, p.template, TOMBSTONE | {"expires_at": later},
                               p.blocks)

        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(withdraw(p) for p in published), return_exceptions=True),
                timeout_s)
        self.published.clear()

    async def close(self) -> None:
        dht, self._dht = self._dht, None
        if dht is not None:
            await asyncio.to_thread(_shutdown, dht)


async def held_by_honest_nodes(initial_peers: Sequence[str], model_id: str, blocks: range) -> set[str]:
    """Sub-keys the honest DHT nodes hold under ``blocks``, read by a DHT peer of the
    attacker's that stored nothing."""
    reader = await AttackerDHT.start(initial_peers, model_id)
    try:
        return await reader.held(blocks)
    finally:
        await reader.close()


def _shutdown(dht: object) -> None:
    with contextlib.suppress(Exception):
        dht.shutdown()  # type: ignore[attr-defined]
    if dht.is_alive():  # type: ignore[attr-defined]
        dht.kill()  # type: ignore[attr-defined]


def record_template(identity: Identity, model_id: str, span: Span, endpoint: str,
                    ms_per_block: float, wallet: str, ttl_s: float) -> PeerRecord:
    """A well-formed record of ``identity`` expiring ``ttl_s`` from now: what forging starts from."""
    return PeerRecord.create(identity, model_id=model_id, span=span, endpoint=endpoint,
                             ms_per_block=ms_per_block, wallet=wallet,
                             free_cache_tokens=4096, expires_at=time.time() + ttl_s)

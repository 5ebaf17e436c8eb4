"""MemoryDiscovery and the Announcer: announce, find, withdraw, expiry, forgeries. In-process."""

from __future__ import annotations

import asyncio
import dataclasses

import msgpack
import pytest

from layerchain.discovery import (
    AnnounceConfig,
    Announcer,
    Discovery,
    Identity,
    MemoryDiscovery,
    MemoryDHT,
    PeerRecord,
    block_key,
    sign_record,
)
from layerchain.discovery.announcer import uncovered
from layerchain.discovery.base import check_entry, looks_like_peer_id
from layerchain.errors import ConfigError, ProtocolError, SpanError
from layerchain.types import Span

MODEL = "smollm2-135m"
L = 30


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def swarm():
    clock = FakeClock()
    hub = MemoryDHT(clock=clock)
    nodes = [MemoryDiscovery(hub) for _ in range(3)]
    client = MemoryDiscovery(hub)
    return clock, hub, nodes, client


def test_memory_discovery_is_a_discovery(swarm):
    _, _, nodes, _ = swarm
    assert isinstance(nodes[0], Discovery)
    assert nodes[0].visible_addresses == nodes[1].initial_peers


def test_announce_find_withdraw(swarm, record_for):
    clock, hub, nodes, client = swarm
    spans = [(0, 10), (10, 20), (20, 30)]

    async def run():
        for node, (s, e) in zip(nodes, spans):
            await node.announce(record_for(node.identity, s, e, clock.now + 60))
        found = await client.find(MODEL, L)
        assert [r.span for r in found] == [Span(*s) for s in spans]
        assert [r.peer_id for r in found] == [n.identity.peer_id for n in nodes]
        assert found[1].endpoint == "tcp://127.0.0.1:4010"
        assert await client.find("another-model", L) == []
        # Each block key lists exactly the peer serving it.
        assert list(hub.get(block_key(MODEL, 15))) == [nodes[1].identity.peer_id]

        await nodes[1].withdraw(MODEL, nodes[1].identity.peer_id, 10, 20)
        found = await client.find(MODEL, L)
        assert [r.span for r in found] == [Span(0, 10), Span(20, 30)]
        assert client.stats.tombstones == 10  # one per block
        assert client.stats.expired == 0

        # Coming back after a withdrawal works (a later expiration replaces the tombstone).
        clock.now += 1
        await nodes[1].announce(record_for(nodes[1].identity, 10, 20, clock.now + 60))
        assert len(await client.find(MODEL, L)) == 3

    asyncio.run(run())


def test_records_expire_without_refresh(swarm, record_for):
    clock, _, nodes, client = swarm

    async def run():
        await nodes[0].announce(record_for(nodes[0].identity, 0, 30, clock.now + 60))
        await nodes[1].announce(record_for(nodes[1].identity, 0, 30, clock.now + 10))
        assert len(await client.find(MODEL, L)) == 2
        clock.now += 10
        assert [r.peer_id for r in await client.find(MODEL, L)] == [nodes[0].identity.peer_id]
        clock.now += 50
        assert await client.find(MODEL, L) == []

    asyncio.run(run())


def test_latest_record_per_peer_wins(swarm, record_for):
    clock, _, nodes, client = swarm

    async def run():
        me = nodes[0]
        await me.announce(record_for(me.identity, 0, 10, clock.now + 30))
        await me.announce(record_for(me.identity, 5, 15, clock.now + 60, free_cache_tokens=7))
        found = await client.find(MODEL, L)
        assert len(found) == 1
        assert (found[0].span, found[0].free_cache_tokens) == (Span(5, 15), 7)

    asyncio.run(run())


def test_forged_and_misplaced_entries_are_ignored_and_counted(swarm, record_for):
    clock, hub, nodes, client = swarm
    honest, mallory = nodes[0], Identity.generate()

    async def run():
        victim = record_for(honest.identity, 0, 10, clock.now + 60)
        await honest.announce(victim)
        exp = clock.now + 60
        # A replica that checks entries refuses all of the below; this one plays a malicious
        # replica that stores anything, so the readers' own checks are what is tested.
        assert not hub.store(block_key(MODEL, 8), mallory.peer_id, b"junk", exp)
        hub.validate = False
        # 1. Mallory's record with a signature over different bytes.
        blob = sign_record(mallory, record_for(mallory, 0, 30, exp))
        payload, sig = msgpack.unpackb(blob)
        forged = msgpack.packb([payload.replace(b"4000", b"6666"), sig])
        hub.store(block_key(MODEL, 3), mallory.peer_id, forged, exp)
        # 2. A valid record stored under another peer's sub-key.
        good = sign_record(mallory, record_for(mallory, 0, 30, exp))
        hub.store(block_key(MODEL, 4), "someone-else", good, exp)
        # 3. A valid record under a block outside its span, and a model mismatch.
        small = sign_record(mallory, record_for(mallory, 20, 21, exp))
        hub.store(block_key(MODEL, 5), mallory.peer_id, small, exp)
        other = sign_record(mallory, record_for(mallory, 0, 30, exp, model_id="other"))
        hub.store(block_key(MODEL, 6), mallory.peer_id, other, exp)
        # 4. A span beyond the model, and plain garbage.
        big = sign_record(mallory, record_for(mallory, 0, 31, exp))
        hub.store(block_key(MODEL, 7), mallory.peer_id, big, exp)
        hub.store(block_key(MODEL, 8), mallory.peer_id, b"junk", exp)

        # 5. The victim's own, genuine record replayed with a longer life (it would push the
        #    victim's refreshes out, as stores keep the entry expiring last).
        replayed = sign_record(honest.identity, victim)
        hub.store(block_key(MODEL, 9), honest.identity.peer_id, replayed, exp + 1000)

        found = await client.find(MODEL, L)
        assert [r.peer_id for r in found] == [honest.identity.peer_id]
        assert client.stats.invalid == 7
        assert client.stats.found == 9

    asyncio.run(run())


def _resigned(identity: Identity, record: PeerRecord, **changes: object) -> bytes:
    """``record`` with ``changes`` that break the record caps, validly signed by ``identity``."""
    from layerchain.discovery.records import _encode_fields

    payload = _encode_fields({**dataclasses.asdict(record), **changes})
    return msgpack.packb([payload, identity.sign(payload)], use_bin_type=True)


@pytest.mark.parametrize(
    "changes",
    [
        {"ms_per_block": 1e308},
        {"ms_per_block": 0.0},
        {"endpoints": ("tcp://:0",)},
        {"price_per_block": 10**15},
        {"free_cache_tokens": 10**12},
        {"wallet": "0x" + "ab" * 20},
    ],
)
def test_signed_records_outside_the_caps_are_refused_by_the_store_and_by_readers(swarm, changes, record_for):
    clock, hub, nodes, client = swarm
    mallory = nodes[1].identity

    async def run():
        exp = clock.now + 60
        record = record_for(mallory, 0, 30, exp)
        blob = _resigned(mallory, record, **changes)
        assert not hub.store(block_key(MODEL, 0), mallory.peer_id, blob, exp)  # the DHT rule
        hub.validate = False  # a malicious replica stores it anyway: the reader's check holds
        hub.store(block_key(MODEL, 0), mallory.peer_id, blob, exp)
        assert await client.find(MODEL, L) == []
        assert client.stats.invalid == 1

    asyncio.run(run())


def test_a_record_living_for_fifty_years_is_refused_by_the_store_and_by_readers(swarm, record_for):
    clock, hub, nodes, client = swarm
    mallory = nodes[1].identity

    async def run():
        forever = clock.now + 50 * 365 * 86400
        blob = sign_record(mallory, record_for(mallory, 0, 30, forever))
        assert not hub.store(block_key(MODEL, 0), mallory.peer_id, blob, forever)
        hub.validate = False
        hub.store(block_key(MODEL, 0), mallory.peer_id, blob, forever)
        assert await client.find(MODEL, L) == []
        assert client.stats.invalid == 1
        await nodes[0].announce(record_for(nodes[0].identity, 0, 30, clock.now + 60))
        assert [r.peer_id for r in await client.find(MODEL, L)] == [nodes[0].identity.peer_id]

    asyncio.run(run())


def test_cannot_announce_or_withdraw_for_another_peer(swarm, record_for):
    clock, _, nodes, _ = swarm

    async def run():
        with pytest.raises(ProtocolError, match="cannot announce or withdraw"):
            await nodes[0].announce(record_for(nodes[1].identity, 0, 5, clock.now + 60))
        with pytest.raises(ProtocolError):
            await nodes[0].withdraw(MODEL, nodes[1].identity.peer_id, 0, 5)
        with pytest.raises(SpanError):
            await nodes[0].find(MODEL, 0)

    asyncio.run(run())


def test_entry_rule(record_for):
    me, other = Identity.generate(), Identity.generate()
    rec = record_for(me, 0, 3, 123.5)
    blob = sign_record(me, rec)
    now = 100.0
    assert check_entry(me.peer_id, blob, 123.5, now) == rec
    with pytest.raises(ProtocolError, match="sub-key"):
        check_entry(other.peer_id, blob, 123.5, now)
    with pytest.raises(ProtocolError, match="expires at"):
        check_entry(me.peer_id, blob, 124.0, now)
    with pytest.raises(ProtocolError):
        check_entry(me.peer_id, "text", 123.5, now)
    with pytest.raises(ProtocolError, match="not a peer id"):
        check_entry("not/a peer id", blob, 123.5, now)
    with pytest.raises(ProtocolError, match="from now"):  # a record nobody could withdraw
        check_entry(me.peer_id, blob, 123.5, now=123.5 - 601)
    assert looks_like_peer_id(me.peer_id)
    assert not looks_like_peer_id(b"bytes-subkey-of-hivemind-optim")
    assert not looks_like_peer_id("12D3KooWHSfjBWMPDr3sd6kRJSR1JHpXFpmhP1v3ucgRDT8PqaWr")
    assert not looks_like_peer_id("not/base58-0OIl!!!!")


# ---- Announcer ----


def test_uncovered_blocks(record_for):
    me = Identity.generate()
    r = lambda s, e, **kw: record_for(me, s, e, 0.0, **kw)  # noqa: E731
    assert uncovered(r(0, 10), r(0, 10)) == []
    assert uncovered(r(0, 10), r(5, 15)) == [(0, 5)]
    assert uncovered(r(5, 15), r(0, 10)) == [(10, 15)]
    assert uncovered(r(0, 30), r(10, 20)) == [(0, 10), (20, 30)]
    assert uncovered(r(0, 10), r(20, 30)) == [(0, 10)]
    assert uncovered(r(0, 10), r(0, 10, model_id="x")) == [(0, 10)]


def test_announce_config_is_checked():
    with pytest.raises(ConfigError):
        AnnounceConfig(refresh_s=60, ttl_s=60)
    with pytest.raises(ConfigError, match="too long"):  # DHT nodes would refuse its records
        AnnounceConfig(refresh_s=60, ttl_s=3600)


def test_announcer_refreshes_moves_and_withdraws(swarm, record_for):
    clock, _, nodes, client = swarm
    node = nodes[0]
    span = [0, 10]
    announcer = Announcer(
        node,
        lambda: record_for(node.identity, span[0], span[1], 0.0),
        AnnounceConfig(refresh_s=0.02, ttl_s=5.0),
        clock=clock,
    )

    async def run():
        first = await announcer.start()
        assert first.expires_at == clock.now + 5.0
        assert [r.span for r in await client.find(MODEL, L)] == [Span(0, 10)]
        # Time passes; refreshes keep the record alive past its first expiry.
        for _ in range(4):
            clock.now += 2.0
            await asyncio.sleep(0.1)
        assert clock.now > first.expires_at
        assert announcer.last is not None and announcer.last.expires_at > clock.now
        assert [r.span for r in await client.find(MODEL, L)] == [Span(0, 10)]
        # The node moves to 5:15: blocks 0..4 are withdrawn once the new record is out.
        span[:] = [5, 15]
        await asyncio.sleep(0.1)
        assert [r.span for r in await client.find(MODEL, L)] == [Span(5, 15)]
        assert await client.find(MODEL, 5) == []  # nothing left in blocks 0..4
        await announcer.stop()
        assert await client.find(MODEL, L) == []
        assert announcer.failures == 0
        await announcer.stop()  # idempotent

    asyncio.run(run())


def test_announcer_survives_failing_refresh(swarm, record_for):
    clock, _, nodes, _ = swarm
    calls = []

    def build() -> PeerRecord:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("measuring failed")
        return record_for(nodes[0].identity, 0, 1, 0.0)

    announcer = Announcer(nodes[0], build, AnnounceConfig(refresh_s=0.01, ttl_s=1.0), clock=clock)

    async def run():
        await announcer.start()
        await asyncio.sleep(0.1)
        assert announcer.failures >= 2
        await announcer.stop()

    asyncio.run(run())


def test_record_is_frozen(record_for):
    me = Identity.generate()
    rec = record_for(me, 0, 1, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.start = 3  # type: ignore[misc]

"""The client's kept snapshot (``PeerView.snapshot``) equals one computed peer by peer
(``fresh_snapshot``) after every kind of change, rebuilds only what changed, and the
planner's table it carries (``RoutePeers``) is the one a plain list gives. Pure, fast."""

from __future__ import annotations

import dataclasses
import random
import time

import numpy as np
import pytest

from layerchain.client import ClientConfig
from layerchain.client.peers import MeasuredSpeed, PeerView
from layerchain.discovery import Identity, MemoryDHT, MemoryDiscovery, PeerRecord
from layerchain.discovery.records import PeerLoad
from layerchain.routing import RouteLimits, RoutePeer, RoutePeers, plan_route, plan_span
from layerchain.routing.relaxed import peer_table
from layerchain.types import Span
from layerchain.wire import MemoryNetwork, MemoryTransport

MODEL, L = "m", 8


def make_record(identity: Identity, rng: random.Random, **change) -> PeerRecord:
    start = rng.randrange(L)
    fields = dict(span=Span(start, rng.randint(start + 1, L)),
                  ms_per_block=rng.choice([0.5, 2.0, rng.uniform(0.1, 9.0)]),
                  price_per_block=rng.randrange(4),
                  load=rng.choice([None, PeerLoad(sessions=1, queued_steps=rng.uniform(0, 3),
                                                  step_ms=rng.choice([0.0, 12.5]))]))
    fields.update(change)
    return PeerRecord.create(identity, model_id=MODEL, endpoint=f"mem://{identity.peer_id}",
                             expires_at=time.time() + 60, **fields)


def check(view: PeerView, exclude: frozenset[str] = frozenset()) -> RoutePeers:
    """The kept snapshot equals the fresh one, table and ids included; plans agree."""
    kept = view.snapshot(exclude)
    fresh = view.fresh_snapshot(exclude)
    assert isinstance(kept, RoutePeers)
    assert list(kept) == fresh
    ids, cols = peer_table(fresh)
    assert kept.ids == tuple(ids)
    assert np.array_equal(kept.cols, cols) and not kept.cols.flags.writeable
    assert kept.by_id == {p.id: p for p in fresh}
    for limits in (RouteLimits(0.0), RouteLimits(1.0), RouteLimits(0.5, max_price=9.0)):
        try:
            want = plan_span(fresh, L, 0, L, limits)
        except Exception as error:  # noqa: BLE001 - the same error either way
            with pytest.raises(type(error)):
                plan_span(kept, L, 0, L, limits)
        else:
            assert plan_span(kept, L, 0, L, limits) == want
    return kept


def test_a_kept_snapshot_equals_a_fresh_one_after_every_kind_of_change():
    rng = random.Random(7)
    idents = [Identity.generate() for _ in range(40)]
    config = ClientConfig(route_jitter=0.05, speed_samples=2)
    view = PeerView(MemoryDiscovery(MemoryDHT()), MemoryTransport(MemoryNetwork()), MODEL, L,
                    config)
    view.records = {i.peer_id: make_record(i, rng) for i in idents[:30]}
    view.records[idents[30].peer_id] = make_record(idents[30], rng, span=Span(0, L))
    view.rtt_ms = {i.peer_id: rng.uniform(0.2, 90.0) for i in idents[:25]}  # others unknown
    first = check(view)
    assert view.snapshot() is first  # nothing changed: the same object, table and all
    ids = list(view.records)

    def changes():
        yield "rtt measured", lambda: view.rtt_ms.__setitem__(ids[3], 7.25)
        yield "rtt of a new peer", lambda: view.rtt_ms.__setitem__(ids[27], 0.5)
        yield "rtt forgotten", lambda: view.rtt_ms.pop(ids[4])
        yield "rtts replaced", lambda: setattr(view, "rtt_ms", dict(view.rtt_ms))
        yield "speed measured", lambda: [view.observe_step(ids[5], 2, 1, 0.05) for _ in "ab"]
        yield "one sample only", lambda: view.observe_step(ids[6], 1, 1, 0.01)
        yield "speed forgotten", lambda: view._speed.__setitem__(
            ids[5], MeasuredSpeed(3.0, 5, time.monotonic() - 10 * config.speed_memory_s))
        yield "session opened", lambda: view.session_opened(ids[7], "s1")
        yield "another session", lambda: view.session_opened(ids[7], "s2")
        yield "session closed", lambda: view.session_closed(ids[7], "s1")
        yield "load announced", lambda: view.records.__setitem__(
            ids[8], make_record(idents[8], rng, load=PeerLoad(sessions=3, queued_steps=2.5,
                                                              step_ms=0.0)))
        yield "price and span", lambda: view.records.__setitem__(
            ids[9], make_record(idents[9], rng, price_per_block=3, span=Span(1, 3)))
        yield "same numbers, new record", lambda: view.records.__setitem__(
            ids[10], dataclasses.replace(view.records[ids[10]], expires_at=time.time() + 90))
        yield "records replaced (a refresh)", lambda: setattr(
            view, "records", {k: dataclasses.replace(r, expires_at=r.expires_at + 1)
                              for k, r in view.records.items()})
        yield "records reordered", lambda: setattr(
            view, "records", dict(reversed(list(view.records.items()))))
        yield "a peer left", lambda: view.records.pop(ids[11])
        yield "a peer joined", lambda: view.records.__setitem__(
            idents[35].peer_id, make_record(idents[35], rng))
        yield "banned", lambda: view.ban(ids[12], "test")
        yield "avoided", lambda: view.avoid(ids[13], 30.0, "busy")
        yield "unbanned", lambda: view.unban(ids[12])
        yield "jitter config", lambda: setattr(view, "config",
                                               dataclasses.replace(config, route_jitter=0.2))
        yield "jitter forgotten", lambda: view._jitter.clear()

    for name, change in changes():
        before = view.snapshot()
        change()
        after = check(view)
        for exclude in (frozenset({ids[0]}), frozenset({ids[0], ids[14], "unknown"})):
            check(view, exclude)
        # only what changed is rebuilt: every other peer is the same RoutePeer object
        old = {p.id: p for p in before}
        fresh = {p.id: p for p in view.fresh_snapshot()}
        for peer in after:
            if peer.id in old and old[peer.id] == fresh[peer.id]:
                assert peer is old[peer.id], (name, peer.id)
    assert view.snapshot(frozenset({ids[0]})) is view.snapshot(frozenset({ids[0]}))


def test_route_peers_carry_the_table_a_list_gives():
    peers = [RoutePeer(f"p{i}", i % 5, i % 5 + 1 + i % 3, 0.5 + i, float(i % 4), 1.0 + i,
                       0.25 * i) for i in range(12)] + [RoutePeer("long", 0, 7, 9.0, 0.0, 3.0)]
    table = RoutePeers(peers)
    ids, cols = peer_table(peers)
    assert table.ids == tuple(ids) and np.array_equal(table.cols, cols)
    assert peer_table(table)[1] is table.cols
    assert table.by_id["p3"] is peers[3] and list(table) == peers
    assert plan_route(table, 7, RouteLimits(0.5)) == plan_route(peers, 7, RouteLimits(0.5))
    with pytest.raises(ValueError):
        RoutePeers(peers, cols=cols[:3])
    with pytest.raises(ValueError):
        RoutePeers(peers, ids=("p0",))
    # a RoutePeer's packed row follows replace(); equality and repr ignore it
    moved = dataclasses.replace(peers[2], rtt_ms=99.0)
    assert peer_table([moved])[1][0, 2] == 99.0 and "_row" not in repr(moved)
    assert dataclasses.replace(moved, rtt_ms=peers[2].rtt_ms) == peers[2]

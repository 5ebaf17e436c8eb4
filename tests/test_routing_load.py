"""Load-aware routing (issue 16.2): nodes announce their load, the planner charges the
queueing it implies, and clients spread over equivalent peers. Pure and in-process."""

from __future__ import annotations

import time

import msgpack
import pytest

from layerchain.client import ClientConfig
from layerchain.client.peers import PeerView
from layerchain.discovery import Identity, MemoryDHT, MemoryDiscovery, PeerRecord
from layerchain.discovery.records import (
    RECORD_FORMAT,
    PeerLoad,
    open_record,
    sign_record,
)
from layerchain.errors import ProtocolError
from layerchain.node.load import Announced, LoadMeter, worth_announcing
from layerchain.routing import RoutePeer, plan_route, route_terms
from layerchain.routing.load import MAX_QUEUE_MS, expected_queue_ms, jitter_factor
from layerchain.types import Hop, Span
from layerchain.wire import MemoryNetwork, MemoryTransport

MODEL, L = "m", 4


def record(identity: Identity, name: str, *, load: PeerLoad | None = None,
           ms_per_block: float = 5.0) -> PeerRecord:
    return PeerRecord.create(identity, model_id=MODEL, span=Span(0, L),
                             endpoint=f"mem://{name}", ms_per_block=ms_per_block,
                             expires_at=time.time() + 60, load=load)


# --- the record field ---------------------------------------------------------------


def test_a_record_without_load_encodes_as_before_and_still_opens():
    me = Identity.generate()
    plain = record(me, "a")
    body = msgpack.unpackb(plain.canonical_bytes(), raw=False)
    assert "load" not in body and body["format"] == RECORD_FORMAT  # older nodes' bytes
    assert open_record(sign_record(me, plain)) == plain
    loaded = record(me, "a", load=PeerLoad(3, 1.5, 42.0))
    opened = open_record(sign_record(me, loaded))
    assert opened.load == PeerLoad(3, 1.5, 42.0)
    assert msgpack.unpackb(loaded.canonical_bytes(), raw=False)["load"] == [3, 1.5, 42.0]


@pytest.mark.parametrize("load", [
    [-1, 0.0, 1.0], [1 << 21, 0.0, 1.0], [1, float("nan"), 1.0], [1, -0.5, 1.0],
    [1, 1e9, 1.0], [1, 0.0, float("inf")], [1, 0.0, 1e300], [True, 0.0, 1.0],
    [1, 0.0], "busy", None,
])
def test_a_malformed_load_is_refused(load):
    me = Identity.generate()
    body = msgpack.unpackb(record(me, "a").canonical_bytes(), raw=False)
    body["load"] = load
    payload = msgpack.packb({k: body[k] for k in sorted(body)}, use_bin_type=True)
    with pytest.raises(ProtocolError, match="malformed|canonical"):
        open_record(msgpack.packb([payload, me.sign(payload)], use_bin_type=True))


def test_a_tombstone_carries_no_load():
    me = Identity.generate()
    with pytest.raises(ProtocolError, match="tombstone"):
        PeerRecord(me.peer_id, me.public_key, (), MODEL, 0, L, 0.0, 0, 0, "", (), "v",
                   time.time() + 60, False, PeerLoad(0, 0.0, 0.0))


# --- the node's meter -----------------------------------------------------------------


def test_load_meter_averages_steps_in_flight_and_step_time():
    meter = LoadMeter(span_blocks=10, now=0.0, tau_s=2.0)
    assert meter.load(0.0, sessions=0) == PeerLoad(0, 0.0, 0.0)
    meter.begin(0.0)
    meter.begin(0.0)  # two steps in flight for a long while: the average nears 2
    assert meter.load(20.0, sessions=2).queued_steps == pytest.approx(2.0, abs=1e-3)
    meter.end(20.0)
    meter.end(20.0)  # idle for one time constant: 2 / e
    assert meter.load(22.0, sessions=2).queued_steps == pytest.approx(2 / 2.718281828, abs=1e-3)
    meter.sample(1.5)  # ms per block of a one-token step -> the whole span
    assert meter.step_ms == pytest.approx(15.0)
    meter.sample(2.5)
    assert meter.step_ms == pytest.approx(0.8 * 15.0 + 0.2 * 25.0)
    meter.end(23.0)  # an unmatched end never goes below zero
    assert meter.in_flight == 0


def test_load_is_announced_early_only_when_it_moved_and_not_too_often():
    last = Announced(PeerLoad(1, 0.5, 10.0), at=100.0)
    assert worth_announcing(None, PeerLoad(0, 0.0, 0.0), 0.0)
    assert not worth_announcing(last, PeerLoad(2, 0.5, 10.0), 100.5)  # within the interval
    assert worth_announcing(last, PeerLoad(2, 0.5, 10.0), 101.5)  # a session more
    assert not worth_announcing(last, PeerLoad(1, 0.6, 12.0), 101.5)  # noise
    assert worth_announcing(last, PeerLoad(1, 0.8, 10.0), 101.5)  # busier


# --- the planner's queueing term ------------------------------------------------------


def test_expected_queue_is_steps_ahead_times_step_time():
    assert expected_queue_ms(0.0, 20.0, 0) == 0.0
    assert expected_queue_ms(1.5, 20.0, 0) == pytest.approx(30.0)
    assert expected_queue_ms(1.5, 20.0, 2) == pytest.approx(70.0)  # own sessions add
    assert expected_queue_ms(float("nan"), -1.0, -3) == 0.0
    assert expected_queue_ms(1e9, 1e9, 0) == MAX_QUEUE_MS


def test_a_busy_peer_is_avoided_not_banned():
    idle = RoutePeer("idle", 0, L, 5.0, 0.0, 1.0)
    busy = RoutePeer("busy", 0, L, 5.0, 0.0, 1.0, queue_ms=30.0)
    assert plan_route([busy, idle], L).peer_ids == ("idle",)
    plan = plan_route([busy], L)  # the only one: it serves, and the queue is counted
    assert plan.peer_ids == ("busy",) and plan.latency_ms == pytest.approx(1 + 20 + 30)
    fast_but_busy = RoutePeer("fast", 0, L, 0.5, 0.0, 1.0, queue_ms=10.0)  # 13 ms vs 21
    assert plan_route([fast_but_busy, idle], L).peer_ids == ("fast",)
    assert route_terms([Hop("busy", 0, L)], {"busy": busy}, mode="push")[0] == \
        pytest.approx(0.5 + 20 + 30 + 0.5)


def test_jitter_is_fixed_per_client_and_spreads_clients():
    seed = b"client-a"
    factors = {jitter_factor(seed, f"p{i}", 0.05) for i in range(50)}
    assert all(1.0 <= f < 1.05 for f in factors) and len(factors) == 50
    assert jitter_factor(seed, "p1", 0.05) == jitter_factor(seed, "p1", 0.05)
    assert jitter_factor(seed, "p1", 0.0) == 1.0
    twins = [RoutePeer(p, 0, L, 5.0, 0.0, 1.0) for p in ("a", "b")]
    picks = []
    for client in range(64):  # 64 clients, two equal peers: each gets a fair share
        key = client.to_bytes(2, "big")
        scaled = [RoutePeer(p.id, 0, L, p.ms_per_block * jitter_factor(key, p.id, 0.05), 0.0,
                            p.rtt_ms * jitter_factor(key, p.id, 0.05)) for p in twins]
        picks.append(plan_route(scaled, L).peer_ids[0])
    assert 16 <= picks.count("a") <= 48
    slow = RoutePeer("slow", 0, L, 5.5, 0.0, 1.0)  # 10% slower: never within the jitter
    assert all(plan_route([twins[0], slow], L).peer_ids == ("a",) for _ in range(3))


# --- the client's view ----------------------------------------------------------------


def view_of(*records: PeerRecord, **config) -> PeerView:
    view = PeerView(MemoryDiscovery(MemoryDHT()), MemoryTransport(MemoryNetwork()), MODEL, L,
                    ClientConfig(**config))
    view.records = {r.peer_id: r for r in records}
    view.rtt_ms = {r.peer_id: 1.0 for r in records}
    return view


def test_a_client_spreads_its_own_concurrent_sessions():
    a, b = Identity.generate(), Identity.generate()
    view = view_of(record(a, "a"), record(b, "b"), route_jitter=0.0)
    first = view.plan().peer_ids[0]
    other = b.peer_id if first == a.peer_id else a.peer_id
    view.session_opened(first, "s1")  # one of its generations is on `first` now
    assert view.plan().peer_ids == (other,)
    view.session_opened(other, "s2")
    view.session_opened(other, "s3")
    assert view.plan().peer_ids == (first,)
    view.session_closed(other, "s2")
    view.session_closed(other, "s2")  # idempotent
    assert view.own_sessions(other) == 1


def test_an_announced_load_steers_other_clients_away():
    a, b = Identity.generate(), Identity.generate()
    busy = record(a, "a", load=PeerLoad(sessions=3, queued_steps=1.2, step_ms=20.0))
    view = view_of(busy, record(b, "b"))
    assert view.plan().peer_ids == (b.peer_id,)
    snap = {p.id: p for p in view.snapshot()}
    assert snap[a.peer_id].queue_ms == pytest.approx(24.0, rel=0.02)  # x jitter < 1.02
    assert snap[b.peer_id].queue_ms == 0.0
    idle = record(a, "a", load=PeerLoad(sessions=0, queued_steps=0.0, step_ms=20.0))
    unmeasured = record(a, "a", load=PeerLoad(sessions=1, queued_steps=1.0, step_ms=0.0))
    assert view_of(idle, route_jitter=0.0).snapshot()[0].queue_ms == 0.0
    # no step time measured yet: the span at its announced speed (4 blocks x 5 ms)
    assert view_of(unmeasured, route_jitter=0.0).snapshot()[0].queue_ms == pytest.approx(20.0)


def test_route_jitter_is_validated():
    from layerchain.errors import ConfigError

    with pytest.raises(ConfigError, match="route_jitter"):
        ClientConfig(route_jitter=-0.1)
    with pytest.raises(ConfigError, match="route_jitter"):
        ClientConfig(route_jitter=float("nan"))


# --- in-process swarm: nodes announce their load, concurrent generations spread ---------


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def test_concurrent_generations_spread_and_nodes_announce_their_load(tiny_model, reference,
                                                                     tmp_path):
    import asyncio
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from memswarm import MemorySwarm

    from layerchain.model import SamplingParams

    params = SamplingParams(max_new_tokens=6)
    prompt = "What is the capital of France?"

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            # equivalent peers: the same announced speed (at least 2 ms per block: above
            # what either measures for the tiny model, so measurements taken apart on a
            # loaded machine do not make one look faster, a gap no load term outweighs)
            twins = [await swarm.add_node(0, 4, tmp_path / f"n{i}", emulate_ms_per_block=2.0)
                     for i in range(2)]
            # no jitter: the same speeds tie, so only the load terms can spread the sessions
            client = swarm.client(audit_rate=0.0, route_jitter=0.0)
            results = await asyncio.gather(*(client.generate(prompt, params) for _ in range(4)))
            loads = [node.record().load for node in twins]
            found = {r.peer_id: r.load for r in await swarm.nodes[0].discovery.find(
                client.spec.model_id, client.spec.num_blocks)}
            return twins, results, loads, found
        finally:
            await swarm.close()

    twins, results, loads, found = asyncio.run(asyncio.wait_for(main(), 120))
    expected = reference(tiny_model, prompt, params).token_ids
    assert all(r.token_ids == expected for r in results)
    used = [r.route[0].peer_id for r in results]
    # the client's own sessions count in each twin's queue: both twins serve (not always
    # 2 and 2: the steps' measured times enter the queue terms)
    assert {n.peer_id for n in twins} == set(used)
    for load in loads:
        assert load is not None and load.sessions == 0 and load.step_ms > 0
    assert all(found[n.peer_id] is not None for n in twins)  # announced in the DHT


def test_announcements_made_at_once_still_expire_one_after_another():
    """A node re-announces its load besides the periodic refresh: two announcements at
    the same moment must not carry the same expiry (a store keeps the one expiring last,
    so the newer load could be dropped)."""
    import asyncio

    from layerchain.discovery import Announcer

    class SlowStore:
        def __init__(self):
            self.announced = []

        async def announce(self, record):
            await asyncio.sleep(0)  # a real DHT store yields on the way
            self.announced.append(record)

    me = Identity.generate()
    store = SlowStore()
    announcer = Announcer(store, lambda: record(me, "a"), clock=lambda: 1000.0)

    async def main():
        return await asyncio.gather(*(announcer.announce_now() for _ in range(3)))

    stamped = asyncio.run(main())
    expiries = [r.expires_at for r in store.announced]
    assert len(set(expiries)) == 3 and expiries == sorted(expiries)
    assert sorted(r.expires_at for r in stamped) == expiries

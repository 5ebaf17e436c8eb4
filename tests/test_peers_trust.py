"""The client's view of the swarm trusts nothing a peer says (issue 12, items 3, 6, 7, 15).

In-process and fast: records in a ``MemoryDHT``, peers that answer pings over the memory
transport, a ``PeerView`` reading them. Each test is an attack that worked before.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from layerchain.client import ClientConfig, RouteLimits
from layerchain.client.peers import (
    MeasuredSpeed,
    PeerView,
    add_sample,
    dial_first,
    measured_ms_per_block,
    preferred_order,
    routing_ms_per_block,
)
from layerchain.discovery import Identity, MemoryDHT, MemoryDiscovery, PeerRecord
from layerchain.errors import NoRoute, PeerAuthFailed, PeerTimeout, PeerUnreachable
from layerchain.market import Wallet
from layerchain.types import Span
from layerchain.wire import MemoryNetwork, MemoryTransport, serve_connection

MODEL, L = "m", 4


class Swarm:
    """Peers announced in a memory DHT, each endpoint answering pings; counts open sockets."""

    def __init__(self) -> None:
        self.hub, self.wire = MemoryDHT(), MemoryNetwork()
        self.open = 0  # connections the peers hold open now
        self.listeners: list = []

    async def announce(self, identity: Identity, name: str, *, start: int = 0, end: int = L,
                       ms_per_block: float = 1.0, price: int = 0, wallet: str = "") -> None:
        async def nothing(msg):  # pings are answered by serve_connection itself
            raise AssertionError(msg)

        async def serve(conn):
            self.open += 1
            try:
                await serve_connection(conn, nothing)
            finally:
                self.open -= 1

        transport = MemoryTransport(self.wire)
        if f"mem://{name}" not in self.wire.endpoints():
            self.listeners.append(await transport.listen(f"mem://{name}", serve))
        record = PeerRecord.create(identity, model_id=MODEL, span=Span(start, end),
                                   endpoint=f"mem://{name}", ms_per_block=ms_per_block,
                                   price_per_block=price, wallet=wallet,
                                   expires_at=time.time() + 60 + len(self.listeners) * 1e-3)
        await MemoryDiscovery(self.hub, identity).announce(record)

    def view(self, **config) -> PeerView:
        return PeerView(MemoryDiscovery(self.hub), MemoryTransport(self.wire), MODEL, L,
                        ClientConfig(**config))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def settle(view: PeerView) -> None:
    """Let the connections the view closed in the background finish closing."""
    await asyncio.gather(*list(view._closing))
    for _ in range(5):
        await asyncio.sleep(0)


def route_of(view: PeerView, **limits) -> list[str]:
    return list(view.plan(limits=RouteLimits(**limits) if limits else None).peer_ids)


# ---- 3. announced speed is a claim; measured speed decides -------------------------------


def test_a_peer_claiming_zero_ms_is_routed_on_what_it_delivers():
    async def main():
        swarm = Swarm()
        liar, honest = Identity.generate(), Identity.generate()
        await swarm.announce(liar, "liar", ms_per_block=0.001)  # the lowest claim allowed
        await swarm.announce(honest, "honest", ms_per_block=5.0)
        view = swarm.view()
        await view.refresh(force=True)
        assert route_of(view) == [liar.peer_id]  # unmeasured: the claim decides
        rtt = view.rtt_ms[liar.peer_id]
        for _ in range(ClientConfig().speed_samples):  # it takes 50 ms per block per token
            view.observe_step(liar.peer_id, blocks=L, tokens=1, seconds=(rtt + 4 * 50.0) / 1000)
        assert view.speed(liar.peer_id) == pytest.approx(50.0)
        assert route_of(view) == [honest.peer_id]  # measured: routed as the slow peer it is
        await view.close()

    run(main())


def test_prefill_steps_do_not_count_and_junk_timings_are_ignored():
    async def main():
        swarm = Swarm()
        peer = Identity.generate()
        await swarm.announce(peer, "p", ms_per_block=2.0)
        view = swarm.view(speed_samples=1)
        await view.refresh(force=True)
        view.observe_step(peer.peer_id, blocks=4, tokens=300, seconds=0.4)  # a prefill
        view.observe_step(peer.peer_id, blocks=4, tokens=1, seconds=float("nan"))
        view.observe_step(peer.peer_id, blocks=0, tokens=1, seconds=1.0)
        view.observe_step("someone-unknown", blocks=4, tokens=1, seconds=1.0)
        assert view.speed(peer.peer_id) == 2.0 and view._speed == {}
        await view.close()

    run(main())


def test_measured_speed_rules():
    config = ClientConfig(speed_samples=2, speed_smoothing=0.3, speed_memory_s=100.0)
    assert measured_ms_per_block(0.105, 5.0, 4) == pytest.approx(25.0)  # 105 ms - 5 ms RTT
    assert measured_ms_per_block(0.001, 5.0, 4) == 0.0  # faster than its ping: no negative
    first = add_sample(None, 10.0, 0.0, config)
    second = add_sample(first, 20.0, 1.0, config)
    assert (second.ms_per_block, second.samples) == (15.0, 2)  # a mean while samples are few
    third = add_sample(second, 20.0, 2.0, config)
    assert third.ms_per_block == pytest.approx(50 / 3)  # 1/3 > 0.3: still the mean
    assert add_sample(third, 0.0, 3.0, config).ms_per_block == pytest.approx(0.7 * 50 / 3)
    assert add_sample(second, 99.0, 500.0, config) == MeasuredSpeed(99.0, 1, 500.0)  # forgotten
    assert routing_ms_per_block(1.0, first, 0.0, config) == 1.0  # one sample: the claim
    assert routing_ms_per_block(1.0, second, 1.0, config) == 15.0
    assert routing_ms_per_block(1.0, second, 200.0, config) == 1.0  # stale: the claim again


def test_an_endpoint_the_transport_cannot_dial_is_the_peers_failure_not_the_users():
    async def main():
        swarm = Swarm()
        odd, good = Identity.generate(), Identity.generate()
        record = PeerRecord.create(odd, model_id=MODEL, span=Span(0, L), ms_per_block=0.001,
                                   endpoint="tcp://127.0.0.1:9", expires_at=time.time() + 60)
        await MemoryDiscovery(swarm.hub, odd).announce(record)  # a TCP endpoint, memory client
        await swarm.announce(good, "good", ms_per_block=5.0)
        view = swarm.view()
        await view.refresh(force=True)  # pinging it fails as a peer failure: a ban, no crash
        assert odd.peer_id in view.banned()
        assert route_of(view) == [good.peer_id]
        await view.close()

    run(main())


# ---- 6. bans stick to identities ----------------------------------------------------------


def test_a_ban_follows_the_wallet_to_a_new_peer_id_and_endpoint():
    async def main():
        swarm = Swarm()
        wallet = Wallet.generate().address
        cheat, spare = Identity.generate(), Identity.generate()
        await swarm.announce(cheat, "cheat", ms_per_block=0.5, price=1, wallet=wallet)
        await swarm.announce(spare, "spare", ms_per_block=5.0, price=1,
                             wallet=Wallet.generate().address)
        view = swarm.view()
        await view.refresh(force=True)
        view.ban(cheat.peer_id, "took a payment and failed")
        reborn = Identity.generate()  # a fresh peer id at a fresh endpoint, same payee
        await swarm.announce(reborn, "reborn", ms_per_block=0.1, price=1, wallet=wallet)
        await view.refresh(force=True)
        assert reborn.peer_id in view.records
        assert {cheat.peer_id, reborn.peer_id} <= view.banned()
        assert route_of(view) == [spare.peer_id]
        view.ban(reborn.peer_id, "failed again")  # the wallet's second failure: a longer ban
        assert view._banned_until[reborn.peer_id] - time.monotonic() > 1.5 * 15.0
        await view.close()

    run(main())


def test_avoid_leaves_a_peer_out_for_a_while_without_a_ban():
    async def main():
        swarm = Swarm()
        busy, other = Identity.generate(), Identity.generate()
        await swarm.announce(busy, "busy", ms_per_block=0.5)
        await swarm.announce(other, "other", ms_per_block=5.0)
        view = swarm.view()
        await view.refresh(force=True)
        view.avoid(busy.peer_id, 0.2, "busy")
        assert route_of(view) == [other.peer_id]
        assert busy.peer_id not in view.banned() and view._failures == {}
        await asyncio.sleep(0.25)
        assert route_of(view) == [busy.peer_id]
        view.ban(busy.peer_id, "a real failure")  # its first: the base ban, not a doubled one
        assert view._banned_until[busy.peer_id] - time.monotonic() <= 15.0
        await view.close()

    run(main())


# ---- 7. bounded client state ---------------------------------------------------------------


def test_an_endpoint_seen_once_is_not_a_socket_held_forever():
    async def main():
        swarm = Swarm()
        rotating = Identity.generate()
        view = swarm.view()
        for i in range(12):  # the same peer, a new endpoint at every refresh
            await swarm.announce(rotating, f"rot-{i}")
            await asyncio.sleep(0.002)
            await view.refresh(force=True)
            await view.client(rotating.peer_id)
            await settle(view)
        assert view.open_connections == 1 and swarm.open == 1
        assert list(view.rtt_ms) == [rotating.peer_id]  # pinged again at each endpoint
        await view.close()
        await settle(view)
        assert swarm.open == 0

    run(main())


def test_many_identities_do_not_grow_connections_pings_or_records_past_the_caps():
    async def main():
        swarm = Swarm()
        first = [Identity.generate() for _ in range(5)]
        for i, identity in enumerate(first):
            await swarm.announce(identity, f"first-{i}")
        view = swarm.view(max_connections=8, max_pings=10, max_peers=40)
        await view.refresh(force=True)
        for i in range(60):  # a flood of fresh identities, each with its own endpoint
            await swarm.announce(Identity.generate(), f"fake-{i}")
        for _ in range(3):
            await view.refresh(force=True)
            await settle(view)
        assert len(view.records) == 40
        assert {i.peer_id for i in first} <= set(view.records)  # known peers stay
        assert len(view.rtt_ms) == 5 + 3 * 10  # pings per refresh are capped
        assert view.open_connections <= 8 and swarm.open <= 8
        await view.close()

    run(main())


def test_departed_peers_leave_no_state_behind():
    async def main():
        swarm = Swarm()
        gone, stays = Identity.generate(), Identity.generate()
        await swarm.announce(gone, "gone")
        await swarm.announce(stays, "stays")
        view = swarm.view()
        await view.refresh(force=True)
        view.observe_step(gone.peer_id, 4, 1, 0.01)
        await MemoryDiscovery(swarm.hub, gone).withdraw(MODEL, gone.peer_id, 0, L)
        await view.refresh(force=True)
        await settle(view)
        assert set(view.records) == set(view.rtt_ms) == {stays.peer_id}
        assert view._speed == {} and view.open_connections == 1
        await view.close()

    run(main())


def test_ban_state_is_capped_and_forgiven():
    async def main():
        view = Swarm().view(max_peers=5, ban_base_s=1.0, ban_max_s=1.0)
        for i in range(50):
            view.ban(f"peer-{i:02d}", "test")
        await view.refresh(force=True)
        assert len(view._banned_until) == len(view._failures) == 20  # 4 x max_peers
        assert "peer-49" in view._banned_until  # the latest bans stay
        view._banned_until = {p: t - 2.5 for p, t in view._banned_until.items()}
        await view.refresh(force=True)  # ended more than ban_max_s ago: forgiven
        assert view._banned_until == view._failures == {}
        await view.close()

    run(main())


# ---- 15. a sane default price cap ----------------------------------------------------------


def test_with_no_price_limit_a_greedy_fast_peer_is_not_taken():
    async def main():
        swarm = Swarm()
        greedy = Identity.generate()
        await swarm.announce(greedy, "greedy", ms_per_block=0.01, price=1000,
                             wallet=Wallet.generate().address)
        for i in range(3):
            await swarm.announce(Identity.generate(), f"honest-{i}", ms_per_block=5.0,
                                 price=1, wallet=Wallet.generate().address)
        view = swarm.view()
        await view.refresh(force=True)
        plan = view.plan()
        assert greedy.peer_id not in plan.peer_ids and plan.price == 4  # not 4000
        assert route_of(view, max_price=1e6) == [greedy.peer_id]  # the user's cap rules
        assert swarm.view(max_price_multiple=None)  # the default cap can be turned off
        await view.close()

    run(main())


def test_the_default_cap_keeps_blocks_only_priced_peers_serve_reachable():
    async def main():
        swarm = Swarm()
        only = Identity.generate()
        await swarm.announce(only, "only", start=2, end=4, ms_per_block=1.0, price=50,
                             wallet=Wallet.generate().address)
        for i in range(3):
            await swarm.announce(Identity.generate(), f"free-{i}", end=2)
        view = swarm.view()
        await view.refresh(force=True)
        assert view.plan().peer_ids[-1] == only.peer_id
        await view.close()

    run(main())


def test_when_no_route_meets_the_default_cap_the_error_says_how_to_raise_it():
    async def main():
        swarm = Swarm()
        honest = [Identity.generate() for _ in range(3)]
        for i, identity in enumerate(honest):
            await swarm.announce(identity, f"honest-{i}", ms_per_block=5.0, price=1,
                                 wallet=Wallet.generate().address)
        await swarm.announce(Identity.generate(), "dear", price=1000,
                             wallet=Wallet.generate().address)
        view = swarm.view()
        await view.refresh(force=True)
        for identity in honest:  # the honest peers fail; the swarm's price is still theirs
            view.ban(identity.peer_id, "test")
        with pytest.raises(NoRoute, match="max_price 16") as error:
            view.plan()
        assert "--max-price" in str(error.value)
        await view.close()

    run(main())


# ---- the same, end to end: real nodes in one process ----------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def test_a_node_claiming_to_be_fastest_loses_the_route_once_measured(tiny_model, tmp_path):
    import dataclasses

    from memswarm import MemorySwarm

    from layerchain.model import LocalModel, SamplingParams, resolve_model
    from layerchain.node import Node

    class SlowLiar(Node):
        """Announces the fastest speed a record may claim; takes 40 ms more per step."""

        def record(self) -> PeerRecord:
            return dataclasses.replace(super().record(), ms_per_block=0.001)

        async def handle(self, msg, owner: int = 0):
            if type(msg).__name__ == "Step":
                await asyncio.sleep(0.04)
            return await super().handle(msg, owner)

    prompt, params = "The capital of France is", SamplingParams(max_new_tokens=6)
    reference = LocalModel(resolve_model(tiny_model)).generate(prompt, params).token_ids

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            liar = await swarm.add_node(0, 4, tmp_path / "liar", node_class=SlowLiar)
            honest = await swarm.add_node(0, 4, tmp_path / "honest")
            client = swarm.client()
            first = await client.generate(prompt, params)
            second = await client.generate(prompt, params)
            return liar.peer_id, honest.peer_id, first, second
        finally:
            await swarm.close()

    liar, honest, first, second = run(main())
    assert list(first.token_ids) == list(second.token_ids) == list(reference)
    assert [h.peer_id for h in first.route] == [liar]  # the claim wins while unmeasured
    assert [h.peer_id for h in second.route] == [honest]  # then what it delivered decides


def test_records_from_the_discovery_seam_are_checked_again():
    from layerchain.discovery.base import tombstone

    class Replica:
        """A discovery that hands over whatever records it got."""

        def __init__(self, records):
            self.records = records

        async def find(self, model_id, num_blocks):
            return self.records

    def make(identity, **changes):
        values = dict(model_id=MODEL, span=Span(0, L), endpoint="mem://x", ms_per_block=1.0,
                      expires_at=time.time() + 60)
        values.update(changes)
        return PeerRecord.create(identity, **values)

    async def main():
        good, *bad_ids = [Identity.generate() for _ in range(5)]
        records = [
            make(good),
            make(bad_ids[0], model_id="another-model"),
            make(bad_ids[1], span=Span(0, L + 1)),  # past the model's blocks
            make(bad_ids[2], expires_at=time.time() - 1),  # expired
            make(bad_ids[3], expires_at=time.time() + 50 * 365 * 86400),  # fifty years
            tombstone(bad_ids[0], MODEL, 0, L, time.time() + 60),
        ]
        view = PeerView(Replica(records), MemoryTransport(MemoryNetwork()), MODEL, L,
                        ClientConfig(max_pings=0))
        await view.refresh(force=True)
        assert list(view.records) == [good.peer_id]

    run(main())


def test_live_snapshot_plans_over_the_swarm_and_closes_what_it_opened():
    from layerchain.client import live_snapshot

    async def main():
        swarm = Swarm()
        a, b = Identity.generate(), Identity.generate()
        await swarm.announce(a, "a", end=2)
        await swarm.announce(b, "b", start=2)
        snap = await live_snapshot(MemoryDiscovery(swarm.hub), MemoryTransport(swarm.wire),
                                   MODEL, L)
        for _ in range(5):
            await asyncio.sleep(0)
        assert snap.num_blocks == L and {p.id for p in snap.peers} == {a.peer_id, b.peer_id}
        assert all(p.rtt_ms < 1000.0 for p in snap.peers)  # pinged
        assert swarm.open == 0

    run(main())


# ---- issue 13: a record lists several endpoints; the client keeps the first that answers --


class HangingTransport(MemoryTransport):
    """The memory transport, where dialling ``hang`` never completes (a dropped SYN)."""

    def __init__(self, wire: MemoryNetwork, hang: str) -> None:
        super().__init__(wire)
        self.hang, self.dialled, self.cancelled = hang, [], 0

    async def connect(self, endpoint: str, *, peer_id: str | None = None):
        self.dialled.append((endpoint, peer_id))
        if endpoint == self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return await super().connect(endpoint, peer_id=peer_id)


async def serve_pings(wire: MemoryNetwork, endpoint: str, proves: str | None) -> object:
    async def nothing(msg):
        raise AssertionError(msg)

    return await MemoryTransport(wire, peer_id=proves).listen(
        endpoint, lambda conn: serve_connection(conn, nothing))


def test_the_first_endpoint_that_answers_is_kept_and_the_rtt_measured_on_it():
    async def main():
        swarm, peer = Swarm(), Identity.generate()
        await serve_pings(swarm.wire, "mem://lan", peer.peer_id)
        record = PeerRecord.create(peer, model_id=MODEL, span=Span(0, L), ms_per_block=1.0,
                                   endpoints=("mem://gone", "mem://lan"),
                                   expires_at=time.time() + 60)
        await MemoryDiscovery(swarm.hub, peer).announce(record)
        view = swarm.view()
        await view.refresh(force=True)  # pings every new peer
        assert peer.peer_id in view.rtt_ms and not view.banned()
        assert view._clients[peer.peer_id].endpoint == "mem://lan"
        await view.close()

    run(main())


class FirstReplyLate:
    """A connection whose first reply leaves ``delay_s`` late (as when the pinging side's
    loop was busy with another peer's handshake), later ones at once."""

    def __init__(self, conn, delay_s: float) -> None:
        self._conn, self._delay_s = conn, delay_s

    def __getattr__(self, name: str):
        return getattr(self._conn, name)

    async def send(self, msg) -> None:
        delay, self._delay_s = self._delay_s, 0.0
        await asyncio.sleep(delay)
        await self._conn.send(msg)


def test_a_new_peers_round_trip_is_its_fastest_ping_not_a_late_first_one():
    async def main():
        swarm, peer = Swarm(), Identity.generate()

        async def nothing(msg):
            raise AssertionError(msg)

        await MemoryTransport(swarm.wire, peer_id=peer.peer_id).listen(
            "mem://p", lambda conn: serve_connection(FirstReplyLate(conn, 0.3), nothing))
        record = PeerRecord.create(peer, model_id=MODEL, span=Span(0, L), ms_per_block=1.0,
                                   endpoint="mem://p", expires_at=time.time() + 60)
        await MemoryDiscovery(swarm.hub, peer).announce(record)
        view = swarm.view()
        await view.refresh(force=True)
        assert view.rtt_ms[peer.peer_id] < 100.0  # one late reply of 300 ms is not distance
        await view.close()

    run(main())


def test_a_hanging_endpoint_delays_the_next_by_the_stagger_not_the_connect_timeout():
    async def main():
        wire, peer = MemoryNetwork(), Identity.generate()
        await serve_pings(wire, "mem://b", peer.peer_id)
        transport = HangingTransport(wire, hang="mem://a")
        t0 = time.perf_counter()
        endpoint, conn = await dial_first(transport, peer.peer_id, ("mem://a", "mem://b"),
                                          timeout_s=5.0, stagger_s=0.05)
        assert endpoint == "mem://b" and time.perf_counter() - t0 < 1.0
        assert transport.dialled == [("mem://a", peer.peer_id), ("mem://b", peer.peer_id)]
        await asyncio.sleep(0)
        assert transport.cancelled == 1  # the hanging dial does not linger
        await conn.close()

    run(main())


def test_an_endpoint_held_by_someone_else_is_skipped_and_alone_is_an_auth_failure():
    async def main():
        wire, peer, mallory = MemoryNetwork(), Identity.generate(), Identity.generate()
        await serve_pings(wire, "mem://mitm", mallory.peer_id)  # answers, with another key
        await serve_pings(wire, "mem://real", peer.peer_id)
        endpoint, conn = await dial_first(MemoryTransport(wire), peer.peer_id,
                                          ("mem://mitm", "mem://real"), timeout_s=5.0)
        assert endpoint == "mem://real" and conn.remote_peer_id == peer.peer_id
        await conn.close()
        with pytest.raises(PeerAuthFailed) as caught:
            await dial_first(MemoryTransport(wire), peer.peer_id, ("mem://gone", "mem://mitm"),
                             timeout_s=5.0)
        assert caught.value.peer_id == peer.peer_id

    run(main())


def test_when_every_endpoint_fails_the_error_names_each_and_a_hang_is_a_timeout():
    async def main():
        wire, peer = MemoryNetwork(), Identity.generate()
        with pytest.raises(PeerUnreachable, match="mem://x: nothing listens.*mem://y: nothing"):
            await dial_first(MemoryTransport(wire), peer.peer_id, ("mem://x", "mem://y"),
                             timeout_s=5.0)
        with pytest.raises(PeerTimeout):
            await dial_first(HangingTransport(wire, hang="mem://x"), peer.peer_id,
                             ("mem://x", "mem://y"), timeout_s=0.2, stagger_s=0.05)

    run(main())


def test_a_record_that_drops_the_connected_endpoint_closes_the_connection():
    async def main():
        swarm, peer = Swarm(), Identity.generate()
        for name in ("one", "two"):
            await serve_pings(swarm.wire, f"mem://{name}", peer.peer_id)
        view = swarm.view()

        async def announce(*endpoints: str, at: float) -> None:
            await MemoryDiscovery(swarm.hub, peer).announce(PeerRecord.create(
                peer, model_id=MODEL, span=Span(0, L), ms_per_block=1.0, endpoints=endpoints,
                expires_at=time.time() + at))

        await announce("mem://one", "mem://two", at=60)
        await view.refresh(force=True)
        assert view._clients[peer.peer_id].endpoint == "mem://one"
        await announce("mem://two", "mem://one", at=61)  # reordered: the connection stays
        await view.refresh(force=True)
        assert view._clients[peer.peer_id].endpoint == "mem://one"
        await announce("mem://two", at=62)  # dropped: closed, the next dial goes to two
        await view.refresh(force=True)
        assert view._clients[peer.peer_id].endpoint == "mem://two"
        await view.close()

    run(main())


def test_the_endpoint_that_answered_is_dialled_first_on_reconnection():
    assert preferred_order(("a", "b", "c"), "b") == ("b", "a", "c")
    assert preferred_order(("a", "b"), "a") == ("a", "b")
    assert preferred_order(("a", "b"), "gone") == ("a", "b")  # the record dropped it
    assert preferred_order(("a", "b"), None) == ("a", "b")

    async def main():
        swarm, peer = Swarm(), Identity.generate()
        await serve_pings(swarm.wire, "mem://lan", peer.peer_id)
        await MemoryDiscovery(swarm.hub, peer).announce(PeerRecord.create(
            peer, model_id=MODEL, span=Span(0, L), ms_per_block=1.0,
            endpoints=("mem://dead", "mem://lan"), expires_at=time.time() + 60))
        transport = HangingTransport(swarm.wire, hang="mem://dead")
        view = PeerView(MemoryDiscovery(swarm.hub), transport, MODEL, L, ClientConfig())
        await view.refresh(force=True)
        view._drop_connection(peer.peer_id)  # idle, closed: the next use reconnects
        await settle(view)
        await view.client(peer.peer_id)
        await view.close()
        return transport.dialled

    dialled = run(main())
    assert [e for e, _ in dialled] == ["mem://dead", "mem://lan", "mem://lan"]

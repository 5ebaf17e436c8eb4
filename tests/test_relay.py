"""The relay: a peer that accepts no connection is reached through a reachable one.

Socket level first (splice, caps, forged registrations), then the transport with the
connections inside the pipe (TLS end to end: a relay that alters bytes is detected)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import socket
import time

import pytest

from layerchain.discovery.identity import Identity
from layerchain.errors import (
    ConfigError,
    LimitExceeded,
    PeerAuthFailed,
    PeerBusy,
    PeerUnreachable,
    ProtocolError,
)
from layerchain.node.reachability import (
    DialBackService,
    check_reachability,
    parse_relay_via,
    pick_helpers,
    pick_relays,
    relayed_endpoints,
    same_host_only,
)
from layerchain.wire import messages as m
from layerchain.wire.codec import DEFAULT_LIMITS, Limits
from layerchain.wire.relay import (
    RelayAddress,
    RelayConfig,
    RelayRegistration,
    RelayService,
    RelayTransport,
    TokenBucket,
    _expect_ok,
    _Pipe,
    open_socket,
    parse_relay_endpoint,
    recv_frame,
    register_payload,
    relay_dial,
    send_frame,
)
from layerchain.wire.rpc import RpcClient, serve_connection
from layerchain.wire.tcp import TcpConnection
from layerchain.wire.tls import tls_server_over
from layerchain.wire.transport import Connection, Dialer, Handler, MemoryTransport

pytestmark = pytest.mark.timeout(60)


def run(coro, timeout: float = 20.0):
    result = asyncio.run(asyncio.wait_for(coro, timeout))
    gc.collect()  # a socket or transport left open warns here, in the test that leaked it
    return result


async def echo_socket(sock: socket.socket) -> None:
    """Serve a spliced data socket: send every byte back until the client closes."""
    loop = asyncio.get_running_loop()
    try:
        while data := await loop.sock_recv(sock, 65536):
            await loop.sock_sendall(sock, data)
    except OSError:
        pass
    finally:
        sock.close()


async def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` through a spliced socket and read as many bytes back."""
    loop = asyncio.get_running_loop()
    got = bytearray()

    async def read() -> None:
        while len(got) < len(payload):
            chunk = await loop.sock_recv(sock, 1 << 20)
            assert chunk, "the pipe closed early"
            got.extend(chunk)

    reader = asyncio.create_task(read())
    await loop.sock_sendall(sock, payload)
    await reader
    return bytes(got)


async def started(config: RelayConfig = RelayConfig()) -> RelayService:
    relay = RelayService(config)
    await relay.start("127.0.0.1", 0)
    return relay


def address(relay: RelayService, identity: Identity) -> RelayAddress:
    return RelayAddress("127.0.0.1", relay.port, identity.peer_id)


# ---------------------------------------------------------------------------- pure parts


def test_relay_endpoints_parse_and_bad_ones_say_how_to_write_them():
    peer = Identity.generate().peer_id
    got = parse_relay_endpoint(f"relay://10.0.0.1:4000/{peer}")
    assert (got.host, got.port, got.peer_id) == ("10.0.0.1", 4000, peer)
    assert str(got) == f"relay://10.0.0.1:4000/{peer}"
    assert parse_relay_endpoint(f"relay://[::1]:4000/{peer}").relay == "[::1]:4000"
    for bad in (f"relay://10.0.0.1/{peer}", "relay://10.0.0.1:4000/", f"tcp://h:1/{peer}",
                f"relay://h:70000/{peer}", f"relay://h:1/{peer}0OIl"):
        with pytest.raises(ConfigError, match="relay://HOST:PORT/PEERID"):
            parse_relay_endpoint(bad)


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=1000.0, capacity=500.0)
    assert bucket.take(500, now=10.0) == 0.0  # the burst
    assert bucket.take(250, now=10.0) == pytest.approx(0.25)  # in debt: wait until repaid
    assert bucket.take(0, now=10.5) == 0.0  # repaid, and 250 bytes of credit again
    assert bucket.take(300, now=10.5) == pytest.approx(0.05)


# ---------------------------------------------------------------------------- splice


def test_a_client_reaches_a_registered_peer_through_the_relay_byte_for_byte():
    async def main():
        relay = await started()
        peer = Identity.generate()
        registration = RelayRegistration(address(relay, peer), peer, echo_socket)
        await registration.start()
        assert list(relay.registrations) == [peer.peer_id]
        payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
        sock = await relay_dial(address(relay, peer))
        assert await exchange(sock, payload) == payload
        sock.close()
        second = await relay_dial(address(relay, peer))  # one data connection per client
        assert await exchange(second, b"again") == b"again"
        second.close()
        assert relay.spliced == 2
        await registration.close()
        await relay.close()

    run(main())


def test_a_peer_not_registered_is_unreachable_and_a_bad_token_is_refused():
    async def main():
        relay = await started()
        stranger = Identity.generate()
        with pytest.raises(PeerUnreachable, match="not registered"):
            await relay_dial(address(relay, stranger))
        sock = await open_socket("127.0.0.1", relay.port, 5.0)
        assert isinstance(await recv_frame(sock), m.RelayChallenge)
        await send_frame(sock, m.RelayAccept(1, b"\x00" * 16))  # a token never issued
        with pytest.raises(PeerUnreachable, match="unknown or expired relay token"):
            await _expect_ok(sock, "accept")
        sock.close()
        await relay.close()

    run(main())


def test_a_stranger_cannot_register_someone_elses_peer_id():
    async def main():
        relay = await started()
        victim, stranger = Identity.generate(), Identity.generate()

        async def register(peer_id: str, public_key: bytes, sign) -> None:
            sock = await open_socket("127.0.0.1", relay.port, 5.0)
            try:
                challenge = await recv_frame(sock)
                await send_frame(sock, m.RelayRegister(1, peer_id, public_key,
                                                       sign(challenge.nonce)))
                await _expect_ok(sock, "register")
            finally:
                sock.close()

        # the victim's id and key, signed with the stranger's key
        with pytest.raises(PeerUnreachable, match="does not prove peer id"):
            await register(victim.peer_id, victim.public_key,
                           lambda nonce: stranger.sign(register_payload(nonce)))
        # the victim's id with the stranger's own key
        with pytest.raises(PeerUnreachable, match="does not prove peer id"):
            await register(victim.peer_id, stranger.public_key,
                           lambda nonce: stranger.sign(register_payload(nonce)))
        # a signature the victim made for another relay's nonce, replayed
        old = victim.sign(register_payload(b"\x01" * 32))
        with pytest.raises(PeerUnreachable, match="does not prove peer id"):
            await register(victim.peer_id, victim.public_key, lambda nonce: old)
        assert relay.registrations == {}
        with pytest.raises(PeerUnreachable, match="not registered"):
            await relay_dial(address(relay, victim))
        # the real one registers, and is reached
        registration = RelayRegistration(address(relay, victim), victim, echo_socket)
        await registration.start()
        sock = await relay_dial(address(relay, victim))
        assert await exchange(sock, b"hello") == b"hello"
        sock.close()
        await registration.close()
        await relay.close()

    run(main())


def test_a_registration_is_refused_for_an_endpoint_naming_another_peer():
    node, other = Identity.generate(), Identity.generate()
    with pytest.raises(ConfigError, match="names another peer"):
        RelayRegistration(RelayAddress("127.0.0.1", 1, other.peer_id), node, echo_socket)


def test_relay_caps_pairs_and_registrations():
    async def main():
        relay = await started(RelayConfig(max_pairs=1, max_registrations=1, dial_timeout_s=1.0))
        first, second = Identity.generate(), Identity.generate()
        registration = RelayRegistration(address(relay, first), first, echo_socket)
        await registration.start()
        with pytest.raises(PeerBusy, match="registrations, its cap"):
            await RelayRegistration(address(relay, second), second, echo_socket).start()
        idle = await relay_dial(address(relay, first))
        assert await exchange(idle, b"x") == b"x"
        await asyncio.sleep(0.05)
        newcomer = await relay_dial(address(relay, first))  # the idle pair gives way
        assert await exchange(newcomer, b"y") == b"y"
        assert relay.evicted == 1
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(idle, 10), 5) == b""  # closed
        idle.close()
        newcomer.close()
        await registration.close()
        # a slot held by a client still waiting for its peer cannot be taken
        deaf = RelayRegistration(address(relay, first), first, echo_socket, max_connections=0)
        await deaf.start()
        waiting = asyncio.create_task(relay_dial(address(relay, first)))
        await asyncio.sleep(0.2)
        with pytest.raises(PeerBusy, match="forwards 1 connections, its cap"):
            await relay_dial(address(relay, first))
        with pytest.raises(PeerUnreachable, match="did not dial back"):
            await waiting
        await deaf.close()
        await relay.close()

    run(main())


def test_a_peer_serves_no_more_relayed_connections_than_its_cap():
    async def main():
        relay = await started(RelayConfig(dial_timeout_s=0.5))
        peer = Identity.generate()
        registration = RelayRegistration(address(relay, peer), peer, echo_socket,
                                         max_connections=1)
        await registration.start()
        held = await relay_dial(address(relay, peer))
        assert await exchange(held, b"one") == b"one"
        with pytest.raises(PeerUnreachable, match="did not dial back"):
            await relay_dial(address(relay, peer))  # the peer ignores the relay's ask
        held.close()
        await registration.close()
        await relay.close()

    run(main())


def test_relay_caps_bandwidth_per_pair():
    async def main():
        relay = await started(RelayConfig(max_mbps=4.0))  # 500 kB/s, a 125 kB burst
        peer = Identity.generate()
        registration = RelayRegistration(address(relay, peer), peer, echo_socket)
        await registration.start()
        sock = await relay_dial(address(relay, peer))
        payload = b"z" * 600_000
        t0 = time.perf_counter()
        assert await exchange(sock, payload) == payload
        elapsed = time.perf_counter() - t0
        sock.close()
        await registration.close()
        await relay.close()
        # (600 kB - 125 kB burst - a 64 KiB read) / 500 kB/s = 0.82 s at least
        assert elapsed >= 0.8, elapsed

    run(main())


def test_sockets_stuck_in_their_handshake_are_dropped_and_capped():
    async def main():
        relay = await started(RelayConfig(max_pending=2, handshake_timeout_s=0.3))
        idle = [await open_socket("127.0.0.1", relay.port, 5.0) for _ in range(3)]
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.1)
        assert relay._pending == 2 and relay.refused >= 1  # the third closed at once
        await asyncio.sleep(0.5)  # then the other two time out
        assert relay._pending == 0
        for sock in idle:
            data = b""
            while chunk := await loop.sock_recv(sock, 4096):
                data += chunk  # a challenge at most, then EOF
            sock.close()
        peer = Identity.generate()  # the relay still serves
        registration = RelayRegistration(address(relay, peer), peer, echo_socket)
        await registration.start()
        await registration.close()
        await relay.close()

    run(main())


def test_a_peer_re_registers_after_losing_its_control_connection():
    async def main():
        relay = await started()
        peer = Identity.generate()
        registration = RelayRegistration(address(relay, peer), peer, echo_socket)
        registration_backoff = 0.05
        await registration.start()
        await relay.registrations[peer.peer_id].control.close()  # the relay drops it
        for _ in range(400):
            await asyncio.sleep(registration_backoff)
            if peer.peer_id in relay.registrations and registration.registered.is_set():
                break
        else:
            raise AssertionError("the peer did not register again")
        sock = await relay_dial(address(relay, peer))
        assert await exchange(sock, b"back") == b"back"
        sock.close()
        await registration.close()
        await relay.close()

    run(main())


# ---------------------------------------------------------------------------- transport


async def plain_client_over(sock: socket.socket, endpoint: str, peer_id: str,
                            limits: Limits) -> Connection:
    """Stand-in for TLS in tests of the plumbing: frames straight over the pipe."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: TcpConnection(limits, endpoint), sock=sock)
    return conn


async def plain_server_over(sock: socket.socket, identity: Identity, handler: Handler,
                            limits: Limits) -> None:
    loop = asyncio.get_running_loop()
    _, conn = await loop.connect_accepted_socket(lambda: TcpConnection(limits), sock)
    try:
        await handler(conn)
    finally:
        await conn.close()


async def answer_info(conn: Connection) -> None:
    async def handle(msg):
        return m.InfoReply(msg.rid, "peer", "model", 0, 1, 1.0, 0, 0, "", "test")

    await serve_connection(conn, handle)


def test_relay_transport_carries_requests_to_the_listening_peer():
    async def main():
        relay = await started()
        peer = Identity.generate()
        endpoint = f"relay://127.0.0.1:{relay.port}/{peer.peer_id}"
        served = RelayTransport(identity=peer, client_over=plain_client_over,
                                server_over=plain_server_over)
        listener = await served.listen(endpoint, answer_info)
        assert listener.endpoint == endpoint
        client = RelayTransport(client_over=plain_client_over)
        conn = await client.connect(endpoint, peer_id=peer.peer_id)
        rpc = RpcClient(conn)
        assert (await rpc.call(m.Ping(0, 7), timeout=5)) == m.Pong(1, 7)
        assert isinstance(await rpc.call(m.Info(0), timeout=5), m.InfoReply)
        await rpc.close()
        with pytest.raises(PeerAuthFailed, match="not"):  # the record says another peer
            await client.connect(endpoint, peer_id=Identity.generate().peer_id)
        with pytest.raises(ConfigError, match="identity"):
            await RelayTransport().listen(endpoint, answer_info)
        await listener.close()
        await relay.close()

    run(main())


def test_handshake_limits_keep_relay_frames_small():
    # a relay never buffers more than a handshake frame for a socket that is not spliced
    from layerchain.wire.relay import HANDSHAKE_LIMITS

    assert HANDSHAKE_LIMITS.max_frame_bytes <= 4096 < DEFAULT_LIMITS.max_frame_bytes
    with pytest.raises(ProtocolError):
        from layerchain.wire.codec import encode_bytes

        encode_bytes(m.RelayConnect(1, "x" * 5000), HANDSHAKE_LIMITS)


# ---------------------------------------------------------------------------- TLS inside


async def tls_pair(relay: RelayService, handler=answer_info):
    """A peer registered with ``relay`` serving ``handler`` over TLS, and its endpoint."""
    peer = Identity.generate()
    endpoint = f"relay://127.0.0.1:{relay.port}/{peer.peer_id}"
    listener = await Dialer(identity=peer).listen(endpoint, handler)
    return peer, endpoint, listener


def test_the_dialer_reaches_a_relayed_peer_with_tls_end_to_end():
    async def main():
        relay = await started()
        peer, endpoint, listener = await tls_pair(relay)
        conn = await Dialer().connect(endpoint, peer_id=peer.peer_id)
        assert conn.remote_peer_id == peer.peer_id  # proved through the pipe
        rpc = RpcClient(conn)
        assert isinstance(await rpc.call(m.Info(0), timeout=5), m.InfoReply)
        await rpc.close()
        await listener.close()
        await relay.close()

    run(main())


def test_a_relay_that_alters_bytes_breaks_the_link_instead_of_the_data(monkeypatch):
    async def main():
        relay = await started()
        peer, endpoint, listener = await tls_pair(relay)
        conn = await Dialer().connect(endpoint, peer_id=peer.peer_id)
        rpc = RpcClient(conn)
        assert isinstance(await rpc.call(m.Info(0), timeout=5), m.InfoReply)
        original = _Pipe.buffer_updated

        def flip_a_bit(self, nbytes):  # from now on the relay tampers with every chunk
            self._buffer[nbytes // 2] ^= 0x01
            original(self, nbytes)

        monkeypatch.setattr(_Pipe, "buffer_updated", flip_a_bit)
        with pytest.raises(PeerUnreachable):  # the record fails its MAC: the link drops
            await rpc.call(m.Info(0), timeout=5)
        await rpc.close()
        with pytest.raises(PeerUnreachable):  # a handshake through it fails too
            await Dialer().connect(endpoint, peer_id=peer.peer_id)
        await listener.close()
        await relay.close()

    run(main())


class ImpersonatingRelay(RelayService):
    """A relay that answers clients itself, with its own key, instead of splicing."""

    def __init__(self) -> None:
        super().__init__()
        self.identity = Identity.generate()

    async def _connect(self, sock: socket.socket, msg: m.RelayConnect) -> None:
        await send_frame(sock, m.RelayOk(msg.rid))
        await tls_server_over(sock, self.identity, answer_info)


def test_a_relay_answering_in_the_peers_place_fails_authentication():
    async def main():
        relay = ImpersonatingRelay()
        await relay.start("127.0.0.1", 0)
        peer = Identity.generate()
        endpoint = f"relay://127.0.0.1:{relay.port}/{peer.peer_id}"
        with pytest.raises(PeerAuthFailed) as caught:
            await Dialer().connect(endpoint, peer_id=peer.peer_id)
        assert caught.value.peer_id == peer.peer_id
        await relay.close()

    run(main())


LEG_MS = 20.0  # the emulated delay a far relay adds to each direction


def test_the_client_measures_a_relayed_peer_with_the_relay_leg_included(monkeypatch, record_for):
    """The planner needs no notion of relays: the RTT a client measures over the endpoint
    it keeps is what the route costs, the relay's legs included."""
    from layerchain.client.config import ClientConfig
    from layerchain.client.peers import PeerView
    from layerchain.discovery import MemoryDHT, MemoryDiscovery

    def far(self, nbytes):  # this relay forwards each chunk LEG_MS late
        data, other = bytes(self._buffer[:nbytes]), self.other
        self._loop.call_later(LEG_MS / 1000, lambda: other.transport.is_closing()
                              or other.transport.write(data))

    monkeypatch.setattr(_Pipe, "buffer_updated", far)

    async def main():
        relay = await started()
        peer, endpoint, relayed = await tls_pair(relay)
        direct = await Dialer(identity=peer).listen("tls://127.0.0.1:0", answer_info)
        view = PeerView(MemoryDiscovery(MemoryDHT()), Dialer(), "test-model", 4, ClientConfig())
        try:
            view.records[peer.peer_id] = record_for(peer, 0, 2, endpoints=(endpoint,))
            through = [await view.measure_rtt(peer.peer_id) for _ in range(3)]
            await view.close()
            view.records[peer.peer_id] = record_for(peer, 0, 2, endpoints=(direct.endpoint,))
            view.rtt_ms.clear()  # (a smoothed RTT: start the direct one afresh)
            straight = [await view.measure_rtt(peer.peer_id) for _ in range(3)]
        finally:
            await view.close()
            await direct.close()
            await relayed.close()
            await relay.close()
        return through, straight

    through, straight = run(main())
    assert all(rtt is not None and rtt >= 2 * LEG_MS for rtt in through), through
    assert min(straight) < min(through) - LEG_MS, (straight, through)


# ---------------------------------------------------------------------------- reachability


@pytest.fixture
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def test_pure_rules_pick_helpers_relays_and_what_a_private_node_announces(record_for):
    me, a, b, relayed, relay = (Identity.generate() for _ in range(5))
    records = [
        record_for(me, 0, 2),  # our own: never asked
        record_for(a, 0, 2), record_for(a, 2, 4),  # one peer, two records: asked once
        record_for(b, 2, 4),
        record_for(relayed, 0, 4, endpoints=(f"relay://10.0.0.1:9/{relayed.peer_id}",)),
        record_for(relay, 0, 4, relay=True),
    ]
    rng = random.Random(1)
    helpers = pick_helpers(records, me.peer_id, rng)
    assert sorted(h.peer_id for h in helpers) == sorted([a.peer_id, b.peer_id, relay.peer_id])
    assert len(pick_helpers(records, me.peer_id, rng, k=2)) == 2
    assert [r.peer_id for r in pick_relays(records, me.peer_id, rng)] == [relay.peer_id]
    ours = f"relay://10.0.0.1:9/{me.peer_id}"
    direct = ("tls://192.168.1.7:1", "tls://10.8.0.2:1", "tls://172.17.0.1:1", "tls://[fd00::1]:1")
    assert relayed_endpoints(ours, direct) == (ours, *direct[:3])  # relayed first, 4 at most
    assert same_host_only(("tls://127.0.0.1:5", "mem://x"), "127.0.0.1")  # a local swarm
    assert not same_host_only(("tls://127.0.0.2:5",), "127.0.0.1")  # announced elsewhere
    assert not same_host_only(("tls://192.168.1.7:5",), "192.168.1.7")
    assert parse_relay_via("relay.example:7000") == "relay.example:7000"
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_relay_via("relay.example")


async def liar(conn: Connection) -> None:
    """A helper that says it dialled back without doing it."""
    async def handle(msg):
        return m.DialBackResult(msg.rid, "")

    await serve_connection(conn, handle)


def test_a_node_is_reachable_only_if_a_probe_with_its_nonce_arrives(tiny_model, tmp_path,
                                                                     record_for):
    from memswarm import MemorySwarm

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            asker = await swarm.add_node(0, 2, tmp_path / "asker")
            helpers = [(await swarm.add_node(0, 2, tmp_path / f"h{i}")).record()
                       for i in range(2)]
            reach = await check_reachability(asker.transport, asker.endpoints[0],
                                             asker.peer_id, helpers, asker.probes)
            assert reach.public and set(reach.reached_by) == {h.peer_id for h in helpers}
            # nobody listens there (a NATed address): private
            reach = await check_reachability(asker.transport, "mem://behind-nat",
                                             asker.peer_id, helpers, asker.probes)
            assert not reach.public and reach.asked == tuple(h.peer_id for h in helpers)
            # the endpoint answers, but as another peer: the dial-back proves nothing
            other = Identity.generate().peer_id
            reach = await check_reachability(asker.transport, asker.endpoints[0], other,
                                             helpers, asker.probes)
            assert not reach.public
            # a helper that claims success without dialling is not believed
            liar_id = Identity.generate()
            listener = await MemoryTransport(swarm.wire, peer_id=liar_id.peer_id).listen(
                "mem://liar", liar)
            lying = record_for(liar_id, 0, 2, endpoints=("mem://liar",))
            reach = await check_reachability(asker.transport, "mem://behind-nat",
                                             asker.peer_id, [lying], asker.probes)
            assert not reach.public and reach.asked == (liar_id.peer_id,)
            await listener.close()
            # nobody to ask (the first node of a swarm): taken as reachable
            assert (await check_reachability(asker.transport, asker.endpoints[0],
                                             asker.peer_id, [], asker.probes)).public
            # a node does not dial relay:// targets for others, and says it does not relay
            rpc = RpcClient(await MemoryTransport(swarm.wire).connect(helpers[0].endpoint))
            with pytest.raises(LimitExceeded, match="direct endpoint"):
                await rpc.call(m.DialBack(0, f"relay://h:1/{other}", other, 1), timeout=5)
            assert await rpc.call(m.RelayQuery(0), timeout=5) == m.RelayOffer(2, 0)
            await rpc.close()
        finally:
            await swarm.close()

    run(main(), timeout=60)


def test_a_hop_through_a_tampering_relay_fails_over_with_identical_output(
    tiny_model, tmp_path, reference, monkeypatch
):
    """Nodes over real TLS in this process: blocks 2:4 are served only through a relay
    first; once the relay starts flipping bits the link drops, the client fails over to a
    direct spare, and the answer is still the single-process one."""
    from layerchain.client import AsyncSwarm, ClientConfig
    from layerchain.discovery import MemoryDHT, MemoryDiscovery
    from layerchain.model import SamplingParams, load_head, load_span, load_tokenizer, resolve_model
    from layerchain.node import Node, NodeConfig

    params = SamplingParams(max_new_tokens=12)
    prompt = "What is the capital of France?"
    spec = resolve_model(tiny_model)
    hub = MemoryDHT()

    async def node(start: int, end: int, name: str, via: str = "") -> Node:
        identity = Identity.generate()
        served = Node(
            NodeConfig(model=tiny_model, start=start, end=end, data_dir=tmp_path / name),
            spec=spec, span=load_span(spec, start, end), transport=Dialer(identity),
            listen_at="tls://127.0.0.1:0", discovery=MemoryDiscovery(hub, identity),
            identity=identity,
        )
        await served.listen()
        if via:
            await served.serve_via(via)
        await served.announce()
        return served

    async def main():
        relay = await started()
        nodes = [await node(0, 2, "a"), await node(2, 4, "b", via=relay.address)]
        assert nodes[1].record().endpoints[0].startswith("relay://")
        client = AsyncSwarm(spec=spec, head=load_head(spec), tokenizer=load_tokenizer(spec),
                            discovery=MemoryDiscovery(hub), transport=Dialer(),
                            config=ClientConfig(discovery_wait_s=1.0))
        try:
            first = await client.generate(prompt, params)
            assert [h.peer_id for h in first.route] == [n.peer_id for n in nodes]
            assert relay.spliced >= 1  # it did go through the relay
            nodes.append(await node(2, 4, "c"))  # a direct spare
            original = _Pipe.buffer_updated

            def flip_a_bit(self, nbytes):
                self._buffer[nbytes // 2] ^= 0x01
                original(self, nbytes)

            monkeypatch.setattr(_Pipe, "buffer_updated", flip_a_bit)
            second = await client.generate(prompt, params)
            assert second.route[-1].peer_id == nodes[2].peer_id
            return first, second
        finally:
            await client.close()
            for served in nodes:
                await served.stop(drain_s=0)
            await relay.close()

    first, second = run(main(), timeout=120)
    expected = reference(tiny_model, prompt, params).token_ids
    assert first.token_ids == expected and second.token_ids == expected


def test_a_node_that_had_nobody_to_ask_finds_out_later_and_moves_behind_a_relay(
    tiny_model, tmp_path
):
    """Nodes starting together find nobody to ask: the one nobody can dial (it announces
    127.0.0.2, where it does not listen) asks again once a peer appears, finds it is
    private, registers with that peer's relay and announces its relay:// endpoint."""
    from layerchain.discovery import MemoryDHT, MemoryDiscovery
    from layerchain.model import load_span, resolve_model
    from layerchain.node import Node, NodeConfig
    from layerchain.node.runner import recheck_reachability

    spec = resolve_model(tiny_model)
    hub = MemoryDHT()

    def node(name: str, *hosts: str) -> Node:
        identity = Identity.generate()
        return Node(
            NodeConfig(model=tiny_model, start=0, end=2, data_dir=tmp_path / name),
            spec=spec, span=load_span(spec, 0, 2), transport=Dialer(identity),
            listen_at="tls://127.0.0.1:0", discovery=MemoryDiscovery(hub, identity),
            identity=identity, announce_hosts=hosts,
        )

    async def main():
        behind = node("behind-nat", "127.0.0.2")
        await behind.listen()
        await behind.announce()
        assert behind.record().endpoints[0].startswith("tls://127.0.0.2:")
        recheck = asyncio.create_task(recheck_reachability(
            behind, behind.config, behind.discovery, first_wait_s=0.1, max_wait_s=0.5))
        relay = node("relay")
        await relay.listen()
        relay.relay_service = await started()
        await relay.announce()
        try:
            await asyncio.wait_for(recheck, 15)
            endpoints = behind.record().endpoints
            assert endpoints[0] == (f"relay://127.0.0.1:{relay.relay_service.port}/"
                                    f"{behind.peer_id}"), endpoints
            assert endpoints[1].startswith("tls://127.0.0.2:")
            rpc = RpcClient(await Dialer().connect(endpoints[0], peer_id=behind.peer_id))
            info = await rpc.call(m.Info(0), timeout=5)
            assert isinstance(info, m.InfoReply) and info.peer_id == behind.peer_id
            await rpc.close()
        finally:
            await behind.stop(drain_s=0)
            await relay.stop(drain_s=0)

    run(main(), timeout=60)


def test_a_relayed_node_moves_to_another_relay_when_its_own_is_gone(tiny_model, tmp_path):
    from layerchain.discovery import MemoryDHT, MemoryDiscovery
    from layerchain.model import load_span, resolve_model
    from layerchain.node import Node, NodeConfig
    from layerchain.node.runner import keep_relayed

    spec = resolve_model(tiny_model)
    hub = MemoryDHT()

    def node(name: str) -> Node:
        identity = Identity.generate()
        return Node(
            NodeConfig(model=tiny_model, start=0, end=2, data_dir=tmp_path / name),
            spec=spec, span=load_span(spec, 0, 2), transport=Dialer(identity),
            listen_at="tls://127.0.0.1:0", discovery=MemoryDiscovery(hub, identity),
            identity=identity,
        )

    async def relay_node(name: str) -> Node:
        served = node(name)
        await served.listen()
        served.relay_service = await started()
        await served.announce()
        return served

    async def main():
        first = await relay_node("first")
        behind = node("behind")
        await behind.listen()
        await behind.serve_via(first.relay_service.address)
        await behind.announce()
        second = await relay_node("second")
        keeper = asyncio.create_task(keep_relayed(behind, behind.config, behind.discovery,
                                                  check_s=0.1, lost_s=0.3))
        try:
            await first.stop(drain_s=0)  # the first relay goes, its record withdrawn
            for _ in range(150):
                await asyncio.sleep(0.1)
                if behind.record().endpoints[0].startswith(
                        f"relay://127.0.0.1:{second.relay_service.port}/"):
                    break
            else:
                raise AssertionError(f"still at {behind.record().endpoints}")
            rpc = RpcClient(await Dialer().connect(behind.record().endpoints[0],
                                                   peer_id=behind.peer_id))
            assert isinstance(await rpc.call(m.Info(0), timeout=5), m.InfoReply)
            await rpc.close()
        finally:
            keeper.cancel()
            await behind.stop(drain_s=0)
            await second.stop(drain_s=0)

    run(main(), timeout=60)


# ---------------------------------------------------------------------------- real processes


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nodes_behind_nat_serve_through_a_relay_in_a_real_swarm(tmp_path, reference):
    """Node 0 relays (and serves 0:15). Node 1 is forced private and serves 15:30 through
    the relay it found in node 0's record; a generation goes through it. Node 2 (15:30)
    announces an address nobody can dial (127.0.0.2, where it does not listen): its own
    check finds it private, it registers too and rejoins the DHT as a client; with node 1
    gone, the generation goes through node 2. Both answers are the single-process one."""
    import json
    import os
    import signal
    import subprocess

    from typer.testing import CliRunner

    from layerchain.cli.main import app
    from layerchain.local import swarm_down, swarm_up
    from layerchain.local.launcher import start_node, wait_ready
    from layerchain.model import DEFAULT_MODEL, SamplingParams
    from layerchain.types import Span

    prompt, tokens = "The capital of France is", 12
    expected = list(reference(DEFAULT_MODEL, prompt, SamplingParams(max_new_tokens=tokens))
                    .token_ids)
    swarm = swarm_up(tmp_path, [Span(0, 15)], node_args=[("--relay",)])
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> dict:
        proc, data_dir = start_node(tmp_path, name, Span(15, 30), swarm.initial_peers,
                                    extra_args=args)
        procs.append(proc)
        wait_ready(proc, data_dir, tmp_path / f"{name}.log", 240)
        return json.loads((data_dir / "node.json").read_text())

    def generate() -> dict:  # `layerchain generate`, in this process: no interpreter start
        done = CliRunner().invoke(app, ["generate", "--initial-peers", swarm.initial_peers[0],
                                        "--prompt", prompt, "--max-new-tokens", str(tokens),
                                        "--json"])
        assert done.exit_code == 0, done.output
        return json.loads(done.stdout)

    def stop(proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    try:
        relay_info = json.loads((tmp_path / "node-0" / "node.json").read_text())
        assert relay_info["relay"].startswith("127.0.0.1:") and not relay_info["relayed"]
        forced = start("node-1", "--reachability", "private")
        assert forced["relayed"], forced
        assert forced["endpoints"][0] == f"relay://{relay_info['relay']}/{forced['peer_id']}"
        assert forced["endpoints"][1].startswith("tls://")  # the direct one, after it
        out = generate()
        assert out["token_ids"] == expected
        assert [h["peer_id"] for h in out["route"]] == [relay_info["peer_id"], forced["peer_id"]]

        found = start("node-2", "--announce-host", "127.0.0.2")  # --reachability auto
        assert found["relayed"] and found["endpoints"][0].startswith("relay://"), found
        assert found["dht_addresses"] == list(swarm.initial_peers)  # a DHT client now
        stop(procs[0])  # node 1 leaves: 15:30 is served only through node 2's relay
        out = generate()
        assert out["token_ids"] == expected
        assert [h["peer_id"] for h in out["route"]] == [relay_info["peer_id"], found["peer_id"]]
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop(proc)
        swarm_down(tmp_path, quiet=True)


def test_node_settings_for_nat_are_checked_with_one_line_each():
    from layerchain.node import NodeConfig

    assert NodeConfig().reachability == "auto" and not NodeConfig().relay
    NodeConfig(reachability="private", relay_via="203.0.113.5:40123")
    NodeConfig(relay=True, relay_port=40123, relay_max_connections=8, relay_max_mbps=12.5)
    for bad, why in (
        (dict(reachability="sometimes"), "reachability must be one of auto, public, private"),
        (dict(relay_via="203.0.113.5"), "relay_via must be HOST:PORT"),
        (dict(relay=True, reachability="private"), "relay needs a reachable node"),
        (dict(relay_max_connections=0), "relay_max_connections must be a positive integer"),
        (dict(relay_max_mbps=0.0), "relay_max_mbps must be positive"),
        (dict(relay_port=70000), "relay_port must be in 0..65535"),
    ):
        with pytest.raises(ConfigError, match=why):
            NodeConfig(**bad)


def test_a_node_dials_back_only_the_address_the_request_came_from():
    async def main():
        service = DialBackService(Dialer())
        peer = Identity.generate().peer_id
        t0 = time.perf_counter()
        for observed in ("tls://127.0.0.1:40000", "tls://[::ffff:127.0.0.1]:40000"):
            reply = await service.dial_back(m.DialBack(7, "tls://10.1.2.3:22", peer, 5),
                                            observed=observed)
            assert reply.rid == 7 and "only to the address" in reply.error, reply
        assert time.perf_counter() - t0 < 1.0  # refused without dialling anything
        # the asker's own host is dialled (nothing listens on port 9 here: refused)
        reply = await service.dial_back(m.DialBack(8, "tls://127.0.0.1:9", peer, 5),
                                        observed="tls://[::ffff:127.0.0.1]:40000")
        assert reply.error and "only to the address" not in reply.error, reply

    run(main())

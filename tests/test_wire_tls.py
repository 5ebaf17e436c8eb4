"""TLS links: the node proves its peer id with its identity key, a man in the middle with
another key is refused, a byte relay is not, plaintext is refused unless asked for, and the
framing defences of wire.tcp still hold under TLS."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import struct
import time

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from layerchain.discovery.identity import Identity
from layerchain.errors import ConfigError, PeerAuthFailed, PeerUnreachable
from layerchain.wire.codec import Limits, decode, encode_bytes
from layerchain.wire.messages import ErrorReply, Ping, Pong, Step, StepResult
from layerchain.wire.rpc import RpcClient, ServeStats, serve_connection
from layerchain.wire.tcp import parse_tcp_endpoint
from layerchain.wire.tls import (
    TlsTransport,
    client_context,
    peer_id_of_certificate,
    self_signed_certificate,
    tls_client_over,
    tls_server_over,
)
from layerchain.wire.transport import Connection, Dialer, TcpTransport

pytestmark = pytest.mark.timeout(60)


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def echo_steps(msg):
    return StepResult(msg.rid, msg.session_id, msg.step, msg.hidden + 1)


async def tls_node(identity: Identity, stats: ServeStats | None = None, limits=Limits()):
    """A TLS listener serving Step -> hidden + 1, like a node of one block."""
    stats = stats if stats is not None else ServeStats()
    return await TlsTransport(identity, limits).listen(
        "tls://127.0.0.1:0",
        lambda conn: serve_connection(conn, echo_steps, limits=limits, stats=stats),
    )


async def one_step(conn: Connection, value: float = 1.0) -> bool:
    rpc = RpcClient(conn)
    x = torch.full((1, 2, 8), value)
    try:
        reply = await rpc.call(Step(0, "s", 0, x), timeout=5)
    finally:
        await rpc.close()
    return torch.equal(reply.hidden, x + 1)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def byte_relay(target: str) -> tuple[asyncio.AbstractServer, str]:
    """A TCP relay that forwards bytes both ways and reads nothing (like wire.relay)."""
    host, port = parse_tcp_endpoint(target, "tls")

    async def splice(reader, writer):
        up_reader, up_writer = await asyncio.open_connection(host, port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(splice, "127.0.0.1", 0)
    return server, f"tls://127.0.0.1:{server.sockets[0].getsockname()[1]}"


# ------------------------------------------------------------------ identity


def test_the_certificate_carries_the_identity_and_the_client_learns_the_peer_id():
    node = Identity.generate()
    assert peer_id_of_certificate(self_signed_certificate(node.private_key)) == node.peer_id

    async def main():
        listener = await tls_node(node)
        assert listener.endpoint.startswith("tls://127.0.0.1:")
        conn = await TlsTransport().connect(listener.endpoint, peer_id=node.peer_id)
        assert isinstance(conn, Connection)
        assert conn.remote_peer_id == node.peer_id
        tls = conn.extra("ssl_object")
        assert isinstance(tls, ssl.SSLObject) and tls.version() == "TLSv1.3"
        assert await one_step(conn)
        anyone = await TlsTransport().connect(listener.endpoint)  # peer_id=None: a probe
        assert anyone.remote_peer_id == node.peer_id
        assert await one_step(anyone)
        await listener.close()

    run(main())


def test_a_listener_proving_another_peer_id_is_refused_before_any_request():
    node, expected = Identity.generate(), Identity.generate()

    async def main():
        stats = ServeStats()
        listener = await tls_node(node, stats)
        with pytest.raises(PeerAuthFailed) as caught:
            await TlsTransport().connect(listener.endpoint, peer_id=expected.peer_id)
        assert caught.value.peer_id == expected.peer_id
        assert node.peer_id in str(caught.value) and "middle" in str(caught.value)
        assert isinstance(caught.value, PeerUnreachable)  # the client routes around it
        await asyncio.sleep(0.05)
        assert stats.requests == 0
        await listener.close()

    run(main())


def test_a_man_in_the_middle_terminating_tls_with_its_own_key_is_refused():
    """The proxy terminates TLS with its own key and relays every message to the real node
    (it could read and rewrite them): the client refuses it, nothing reaches the node."""
    node, mitm = Identity.generate(), Identity.generate()

    async def main():
        stats = ServeStats()
        listener = await tls_node(node, stats)

        async def forward(msg):
            upstream = RpcClient(await TlsTransport().connect(listener.endpoint))
            try:
                return await upstream.call(msg, timeout=5)
            finally:
                await upstream.close()

        proxy = await TlsTransport(mitm).listen(
            "tls://127.0.0.1:0", lambda conn: serve_connection(conn, forward)
        )
        # the proxy does work: a client that does not check identities is served through it
        assert await one_step(await TlsTransport().connect(proxy.endpoint))
        assert stats.requests == 1
        with pytest.raises(PeerAuthFailed) as caught:
            await TlsTransport().connect(proxy.endpoint, peer_id=node.peer_id)
        assert caught.value.peer_id == node.peer_id and mitm.peer_id in str(caught.value)
        await asyncio.sleep(0.05)
        assert stats.requests == 1  # the refused connection sent nothing through
        await proxy.close()
        await listener.close()

    run(main())


def test_a_pure_byte_relay_in_between_still_works():
    node = Identity.generate()

    async def main():
        listener = await tls_node(node)
        relay, relayed = await byte_relay(listener.endpoint)
        conn = await TlsTransport().connect(relayed, peer_id=node.peer_id)
        assert conn.remote_peer_id == node.peer_id
        assert await one_step(conn)
        relay.close()
        await listener.close()

    run(main())


def test_a_certificate_without_an_ed25519_key_proves_nothing():
    """A listener with an ordinary (ECDSA) certificate: refused when a peer id is expected."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )

    async def main(tmp_pem: bytes):
        import tempfile

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.NamedTemporaryFile() as f:
            f.write(tmp_pem)
            f.flush()
            ctx.load_cert_chain(f.name)

        async def silent(reader, writer):
            await reader.read()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0, ssl=ctx)
        endpoint = f"tls://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        expected = Identity.generate().peer_id
        with pytest.raises(PeerAuthFailed, match="not Ed25519"):
            await TlsTransport().connect(endpoint, peer_id=expected)
        server.close()

    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    run(main(pem))


# ------------------------------------------------------------------ plaintext and versions


def test_the_dialer_refuses_plaintext_unless_insecure_and_dispatches_by_scheme():
    node = Identity.generate()

    async def main():
        plain = await TcpTransport().listen(
            "tcp://127.0.0.1:0", lambda conn: serve_connection(conn, echo_steps)
        )
        with pytest.raises(ConfigError, match="--insecure") as caught:
            await Dialer().connect(plain.endpoint)
        assert "plaintext" in str(caught.value)
        with pytest.raises(ConfigError, match="--insecure"):
            await Dialer(node).listen("tcp://127.0.0.1:0", echo_steps)
        assert await one_step(await Dialer(insecure=True).connect(plain.endpoint))

        listener = await Dialer(node).listen("tls://127.0.0.1:0", lambda conn: serve_connection(
            conn, echo_steps))
        conn = await Dialer().connect(listener.endpoint, peer_id=node.peer_id)
        assert conn.remote_peer_id == node.peer_id and await one_step(conn)
        with pytest.raises(PeerAuthFailed):
            await Dialer(insecure=True).connect(listener.endpoint, peer_id="someone-else")
        with pytest.raises(ConfigError, match="identity"):
            await Dialer().listen("tls://127.0.0.1:0", echo_steps)  # no key to prove
        with pytest.raises(ConfigError, match="scheme"):
            await Dialer().connect("udp://1.2.3.4:5")
        await listener.close()
        await plain.close()

    run(main())


def test_mismatched_ends_fail_fast_with_peer_unreachable():
    """A TLS client at a plaintext listener and a plaintext client at a TLS listener each get
    a typed error at once, not a hang until some timeout."""
    node = Identity.generate()

    async def main():
        plain = await TcpTransport().listen(
            "tcp://127.0.0.1:0", lambda conn: serve_connection(conn, echo_steps)
        )
        host, port = parse_tcp_endpoint(plain.endpoint)
        t0 = time.perf_counter()
        with pytest.raises(PeerUnreachable):
            await TlsTransport().connect(f"tls://{host}:{port}", peer_id=node.peer_id)
        listener = await tls_node(node)
        host, port = parse_tcp_endpoint(listener.endpoint, "tls")
        conn = await TcpTransport().connect(f"tcp://{host}:{port}")
        with pytest.raises(PeerUnreachable):
            await one_step(conn)
        assert time.perf_counter() - t0 < 3.0
        await listener.close()
        await plain.close()

    run(main())


def test_tls_below_1_3_is_refused():
    node = Identity.generate()

    async def main():
        listener = await tls_node(node)
        host, port = parse_tcp_endpoint(listener.endpoint, "tls")
        old = client_context()
        old.minimum_version = ssl.TLSVersion.TLSv1_2
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionResetError)):  # an alert, or a reset
            await asyncio.open_connection(host, port, ssl=old, server_hostname="")
        await listener.close()

    run(main())


# ------------------------------------------------------------------ hostile peers under TLS


async def tls_raw(endpoint: str):
    host, port = parse_tcp_endpoint(endpoint, "tls")
    return await asyncio.open_connection(host, port, ssl=client_context(), server_hostname="")


def test_a_huge_length_prefix_inside_tls_is_refused_and_the_honest_client_served():
    node = Identity.generate()

    async def main():
        stats = ServeStats()
        listener = await tls_node(node, stats)
        reader, writer = await tls_raw(listener.endpoint)
        writer.write(struct.pack(">I", 2**32 - 1) + b"junk" * 100)
        raw = await asyncio.wait_for(reader.read(), 5)  # the reply, then the close
        (n,) = struct.unpack(">I", raw[:4])
        reply = decode(raw[: 4 + n])
        assert isinstance(reply, ErrorReply) and reply.code == "limit_exceeded"
        writer.close()
        conn = await TlsTransport().connect(listener.endpoint, peer_id=node.peer_id)
        assert await one_step(conn)
        assert stats.by_code == {"limit_exceeded": 1}
        await listener.close()

    run(main())


def test_a_stalled_handshake_and_a_stalled_frame_are_cut_after_the_read_timeout():
    """Slowloris at both layers: a socket that never finishes the TLS handshake, and a TLS
    connection that starts a frame and trickles, are both closed after read_timeout_s."""
    node = Identity.generate()

    async def main():
        listener = await tls_node(node, limits=Limits(read_timeout_s=0.5))
        host, port = parse_tcp_endpoint(listener.endpoint, "tls")

        async def closed_after(reader: asyncio.StreamReader, writer, trickle: bool) -> float:
            t0 = time.perf_counter()
            try:
                for _ in range(40):
                    try:
                        if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                            return time.perf_counter() - t0
                    except asyncio.TimeoutError:
                        pass
                    if trickle:
                        writer.write(b"\0")
            except (ConnectionError, ssl.SSLError):
                return time.perf_counter() - t0
            finally:
                writer.close()
            return float("inf")

        bare = await asyncio.open_connection(host, port)  # TCP only: no ClientHello
        framed = await tls_raw(listener.endpoint)
        step = encode_bytes(Step(1, "s", 0, torch.zeros(1, 8, 64)))
        framed[1].write(step[:100])  # the start of a frame, then a byte every 0.1 s
        cut = await asyncio.gather(closed_after(*bare, False), closed_after(*framed, True))
        assert all(0.3 < t < 2.0 for t in cut), cut
        honest = await TlsTransport().connect(listener.endpoint, peer_id=node.peer_id)
        assert await one_step(honest)
        await listener.close()

    run(main())


# ------------------------------------------------------------------ over a connected socket


def test_tls_over_an_already_connected_socket_checks_the_peer_id_too():
    node = Identity.generate()

    async def main():
        async def serve(conn):
            await serve_connection(conn, echo_steps)

        for expected, ok in ((node.peer_id, True), (Identity.generate().peer_id, False)):
            a, b = socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
            server = asyncio.create_task(tls_server_over(b, node, serve))
            if ok:
                conn = await tls_client_over(a, "relay://r:1/" + expected, expected)
                assert conn.remote_peer_id == node.peer_id and conn.peer.startswith("relay://")
                assert await one_step(conn)
                await asyncio.wait_for(server, 5)
            else:
                with pytest.raises(PeerAuthFailed):
                    await tls_client_over(a, "relay://r:1/" + expected, expected)
                await asyncio.gather(server, return_exceptions=True)
            a.close()
            b.close()

    run(main())


def test_step_frames_are_identical_over_tls_and_tcp():
    """The framed protocol is unchanged under TLS: a Step of each size round-trips bit-exact."""
    node = Identity.generate()

    async def main():
        listener = await tls_node(node)
        rpc = RpcClient(await TlsTransport().connect(listener.endpoint, peer_id=node.peer_id))
        for tokens in (1, 7, 512):
            x = torch.randn(1, tokens, 64)
            reply = await rpc.call(Step(0, "s", 0, x), timeout=5)
            assert torch.equal(reply.hidden, x + 1)
        pong = await rpc.call(Ping(0, 9), timeout=5)
        assert isinstance(pong, Pong) and pong.nonce == 9
        await rpc.close()
        await listener.close()

    run(main())


def test_sockets_stuck_in_the_handshake_hold_capped_slots_and_give_way_to_newcomers():
    """Handshakes cannot pile up beyond max_connections: a socket counts from its accept,
    and one that never says ClientHello is the least recently active, so evicted first."""
    node = Identity.generate()

    async def main():
        listener = await TlsTransport(node, Limits(max_connections=4)).listen(
            "tls://127.0.0.1:0", lambda conn: serve_connection(conn, echo_steps)
        )
        host, port = parse_tcp_endpoint(listener.endpoint, "tls")
        bare = [await asyncio.open_connection(host, port) for _ in range(10)]
        await asyncio.sleep(0.2)
        assert listener.connections == 4 and listener.evicted == 6
        t0 = time.perf_counter()
        conn = await TlsTransport().connect(listener.endpoint, peer_id=node.peer_id)
        assert await one_step(conn) and time.perf_counter() - t0 < 2.0
        assert listener.evicted == 7
        for _, writer in bare:
            writer.close()
        await listener.close()

    run(main())


# ------------------------------------------------------------------ in a swarm


def test_a_node_behind_a_man_in_the_middle_is_routed_around(tiny_model_dir, reference, tmp_path):
    """Someone takes over node A's announced address and relays to A with its own identity
    (it could read and rewrite every step): the client refuses it, routes through A's spare,
    and the answer is the single-process one. Memory transport: listeners prove peer ids
    the way TLS does, so the swarm runs in one process."""
    from memswarm import MemorySwarm

    from layerchain.model import SamplingParams
    from layerchain.wire.memory import MemoryTransport

    model = str(tiny_model_dir("llama", tokenizer=True))
    params = SamplingParams(max_new_tokens=12)
    prompt = "What is the capital of France?"
    mallory = Identity.generate()

    async def main():
        swarm = MemorySwarm(model)
        try:
            a = await swarm.add_node(0, 2, tmp_path)
            spare = await swarm.add_node(0, 2, tmp_path)
            await swarm.add_node(2, 4, tmp_path)
            # the attacker now answers at A's address; A itself moves out of sight
            listeners, announced = swarm.wire._listeners, a.endpoint
            hidden = announced + "-hidden"
            listeners[hidden] = listeners.pop(announced)  # A still announces `announced`
            relayed = []

            async def forward(msg):
                relayed.append(type(msg).__name__)
                upstream = RpcClient(await MemoryTransport(swarm.wire).connect(hidden))
                try:
                    return await upstream.call(msg, timeout=5)
                finally:
                    await upstream.close()

            await MemoryTransport(swarm.wire, peer_id=mallory.peer_id).listen(
                announced, lambda conn: serve_connection(conn, forward)
            )
            client = swarm.client()
            try:
                result = await client.generate(prompt, params)
                banned = client.peers.banned()
            finally:
                await client.close()
            return result, a.peer_id, spare.peer_id, relayed, banned
        finally:
            await swarm.close()

    result, a_id, spare_id, relayed, banned = run(main(), timeout=60)
    assert result.token_ids == reference(model, prompt, params).token_ids
    assert [h.peer_id for h in result.route if h.start == 0] == [spare_id]
    assert a_id not in {h.peer_id for h in result.route}
    assert relayed == []  # not one message went through the man in the middle
    assert a_id in banned  # the client failed A at its address, not the spare


def test_a_client_without_insecure_refuses_a_plaintext_swarm_with_a_clear_error(
    tiny_model_dir, reference, tmp_path
):
    """Nodes started with --insecure announce tcp://: a default client sends them nothing
    and says to pass --insecure; with insecure it is served over plaintext."""
    from memswarm import MemorySwarm

    from layerchain.client import AsyncSwarm, ClientConfig
    from layerchain.discovery import MemoryDiscovery
    from layerchain.errors import LayerchainError
    from layerchain.model import SamplingParams, load_head, load_span, load_tokenizer
    from layerchain.node import Node, NodeConfig

    model = str(tiny_model_dir("llama", tokenizer=True))
    params = SamplingParams(max_new_tokens=6)
    prompt = "What is the capital of France?"

    async def main():
        swarm = MemorySwarm(model)
        served = []
        try:
            for start, end in ((0, 2), (2, 4)):
                identity = Identity.generate()
                node = Node(
                    NodeConfig(model=model, start=start, end=end, data_dir=tmp_path, insecure=True),
                    spec=swarm.spec, span=load_span(swarm.spec, start, end),
                    transport=Dialer(identity, insecure=True), listen_at="tcp://127.0.0.1:0",
                    discovery=MemoryDiscovery(swarm.hub, identity), identity=identity,
                )
                await node.start()
                swarm.nodes.append(node)
                original = node.handle

                async def counting(msg, *args, original=original):
                    served.append(type(msg).__name__)
                    return await original(msg, *args)

                node.handle = counting
            outcomes = []
            for insecure in (False, True):
                client = AsyncSwarm(
                    spec=swarm.spec, head=load_head(swarm.spec), tokenizer=load_tokenizer(swarm.spec),
                    discovery=MemoryDiscovery(swarm.hub), transport=Dialer(insecure=insecure),
                    config=ClientConfig(discovery_wait_s=1.0, insecure=insecure),
                )
                try:
                    outcomes.append(await client.generate(prompt, params))
                except LayerchainError as error:
                    outcomes.append(error)
                finally:
                    await client.close()
                outcomes.append(list(served))
            return outcomes
        finally:
            await swarm.close()

    refused, served_before, result, served_after = run(main(), timeout=60)
    assert isinstance(refused, LayerchainError) and "--insecure" in str(refused)
    assert served_before == []  # nothing was sent in the clear
    assert result.token_ids == reference(model, prompt, params).token_ids
    assert "Step" in served_after

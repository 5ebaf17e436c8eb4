"""Transports: messages cross TCP and memory intact; hostile peers get typed errors or a closed
connection while an honest client keeps being served."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest
import torch

from layerchain.discovery.identity import Identity
from layerchain.errors import ConfigError, PeerAuthFailed, PeerUnreachable
from layerchain.wire.codec import Limits, encode_bytes
from layerchain.wire.messages import ErrorReply, Ping, Pong, Step, StepResult
from layerchain.wire.rpc import RpcClient, ServeStats, serve_connection
from layerchain.wire.tcp import parse_tcp_endpoint
from layerchain.wire.transport import (
    Connection,
    MemoryNetwork,
    MemoryTransport,
    TcpTransport,
    TlsTransport,
    transport_for,
)
from test_wire_codec import assert_same, frame_from_header, sample_messages, step_header

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def echo(conn) -> None:
    """Send every received message straight back."""
    try:
        while True:
            await conn.send(await conn.recv())
    except PeerUnreachable:
        pass


@pytest.mark.parametrize("kind", ["tls", "tcp", "mem"])
def test_every_message_round_trips_through_every_transport(kind):
    async def main():
        identity = Identity.generate()
        transport = {
            "tls": TlsTransport(identity),
            "tcp": TcpTransport(),
            "mem": MemoryTransport(MemoryNetwork(), peer_id=identity.peer_id),
        }[kind]
        listener = await transport.listen(f"{kind}://127.0.0.1:0" if kind != "mem" else "mem://",
                                          echo)
        conn = await transport.connect(listener.endpoint, peer_id=identity.peer_id)
        assert isinstance(conn, Connection)
        assert conn.remote_peer_id == (None if kind == "tcp" else identity.peer_id)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for msg in sample_messages(dtype):
                await conn.send(msg)
                got = await conn.recv()
                assert_same(got, msg)
                if isinstance(msg, (Step, StepResult)):  # a copy, never the sender's memory
                    assert got.hidden.data_ptr() != msg.hidden.data_ptr()
        await conn.close()
        await listener.close()

    run(main())


def test_tcp_listen_on_port_zero_reports_the_real_port_and_transport_for_picks_by_scheme():
    async def main():
        listener = await TcpTransport().listen("tcp://127.0.0.1:0", echo)
        host, port = parse_tcp_endpoint(listener.endpoint)
        assert host == "127.0.0.1" and port > 0
        conn = await transport_for(listener.endpoint).connect(listener.endpoint)
        await conn.send(Ping(1, 5))
        assert await conn.recv() == Ping(1, 5)
        await conn.close()
        await listener.close()
        with pytest.raises(PeerUnreachable):
            await TcpTransport().connect(listener.endpoint)

    run(main())
    assert isinstance(transport_for("mem://x"), MemoryTransport)
    assert isinstance(transport_for("tls://1.2.3.4:5"), TlsTransport)
    with pytest.raises(ConfigError):
        transport_for("udp://1.2.3.4:5")
    with pytest.raises(ConfigError):
        parse_tcp_endpoint("tcp://nohost")


def test_memory_transport_latency_order_and_close():
    async def main():
        hub = MemoryNetwork()
        transport = MemoryTransport(hub, latency_ms=20)
        listener = await transport.listen("mem://node-a", echo)
        assert hub.endpoints() == ["mem://node-a"]
        with pytest.raises(ConfigError):
            await transport.listen("mem://node-a", echo)
        with pytest.raises(PeerUnreachable):
            await MemoryTransport(MemoryNetwork()).connect("mem://node-a")  # another hub
        conn = await transport.connect("mem://node-a")
        t0 = time.perf_counter()
        for i in range(5):
            await conn.send(Ping(i, i))
        got = [await conn.recv() for _ in range(5)]
        assert [m.rid for m in got] == list(range(5))
        assert time.perf_counter() - t0 >= 0.04  # one round trip of 2 x 20 ms
        await listener.close()  # ends the server side: the client sees the close
        with pytest.raises(PeerUnreachable):
            await conn.recv()
        with pytest.raises(PeerUnreachable):
            await conn.send(Ping(9, 9))

    run(main())


def test_memory_listeners_prove_their_transports_peer_id_like_tls():
    async def main():
        hub, node = MemoryNetwork(), Identity.generate()
        listener = await MemoryTransport(hub, peer_id=node.peer_id).listen("mem://n", echo)
        anonymous = await MemoryTransport(hub).listen("mem://anon", echo)
        client = MemoryTransport(hub)
        with pytest.raises(PeerAuthFailed) as caught:
            await client.connect("mem://n", peer_id="someone-else")
        assert caught.value.peer_id == "someone-else"
        conn = await client.connect("mem://n", peer_id=node.peer_id)
        assert conn.remote_peer_id == node.peer_id
        got: list = []
        conn.set_receiver(got.append)  # push mode over memory too
        await conn.send(Ping(3, 4))
        for _ in range(50):
            await asyncio.sleep(0)
        assert got == [Ping(3, 4)]
        await conn.close()
        assert isinstance(got[-1], PeerUnreachable)
        plain = await client.connect("mem://anon", peer_id="anyone")  # proves nothing, like tcp
        assert plain.remote_peer_id is None
        await listener.close()
        await anonymous.close()

    run(main())


def test_memory_transport_enforces_the_listeners_limits():
    async def main():
        hub = MemoryNetwork()
        small = Limits(max_frame_bytes=256)
        stats = ServeStats()

        async def nothing(msg):
            return None

        listener = await MemoryTransport(hub, limits=small).listen(
            "mem://n", lambda c: serve_connection(c, nothing, limits=small, stats=stats)
        )
        conn = await MemoryTransport(hub).connect("mem://n")
        await conn.send(Step(7, "s", 0, torch.zeros(1, 1, 256)))  # fine for the sender
        reply = await conn.recv()
        assert isinstance(reply, ErrorReply) and reply.code == "limit_exceeded"
        assert stats.protocol_errors == 1
        await conn.close()
        await listener.close()

    run(main())


# ------------------------------------------------------------------- hostile TCP peers


async def serve_echo_steps(stats: ServeStats, limits: Limits = Limits()):
    async def handler(msg):
        return StepResult(msg.rid, msg.session_id, msg.step, msg.hidden + 1)

    transport = TcpTransport(limits)
    listener = await transport.listen(
        "tcp://127.0.0.1:0",
        lambda conn: serve_connection(conn, handler, limits=limits, stats=stats),
    )
    return transport, listener


async def honest_calls(endpoint: str, n: int, pause: float = 0.0) -> int:
    """n Step calls over one connection; returns how many came back right."""
    client = RpcClient(await TcpTransport().connect(endpoint))
    ok = 0
    for i in range(n):
        x = torch.full((1, 1, 8), float(i))
        reply = await client.call(Step(0, "s", i, x), timeout=5)
        ok += int(torch.equal(reply.hidden, x + 1) and reply.step == i)
        await asyncio.sleep(pause)
    await client.close()
    return ok


async def raw_exchange(endpoint: str, data: bytes, *, shutdown: bool = False) -> bytes:
    """Send raw bytes on a plain socket; everything the server sends back until it closes."""
    host, port = parse_tcp_endpoint(endpoint)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    if shutdown:
        writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def read_replies(data: bytes) -> list:
    from layerchain.wire.codec import decode

    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(decode(data[: 4 + n]))
        data = data[4 + n :]
    return out


@pytest.mark.parametrize(
    "bad, code, closes",
    [
        (frame_from_header(["x"]), "version_mismatch", False),
        (frame_from_header(*step_header("int64")), "limit_exceeded", False),
        (frame_from_header(*step_header(shape=(8,))), "limit_exceeded", False),
        (struct.pack(">I", 7) + b"garbage", "frame_error", False),
        (b"\xff\xff\xff\xff" + b"junk" * 100, "limit_exceeded", True),  # 2**32-1 prefix
    ],
    ids=["version", "dtype", "shape", "garbage", "huge-prefix"],
)
def test_bad_frames_over_tcp_get_error_replies_while_honest_clients_are_served(bad, code, closes):
    async def main():
        stats = ServeStats()
        _, listener = await serve_echo_steps(stats)
        honest = asyncio.create_task(honest_calls(listener.endpoint, 20, pause=0.005))
        follow_up = b"" if closes else encode_bytes(Ping(77, 1))
        # with shutdown the server sees EOF after our frames; it answers, then closes
        raw = await raw_exchange(listener.endpoint, bad + follow_up, shutdown=True)
        replies = read_replies(raw)
        assert isinstance(replies[0], ErrorReply) and replies[0].code == code
        if code == "limit_exceeded" and not closes:
            assert replies[0].rid == 42  # the rid of the offending request
        if not closes:  # frame sync kept: the next request on the same connection is served
            assert replies[1:] == [Pong(77, 1)]
        else:
            assert len(replies) == 1
        assert await honest == 20
        assert stats.protocol_errors == 1 and stats.by_code == {code: 1}
        await listener.close()

    run(main())


def test_truncated_frame_then_eof_gets_a_frame_error():
    async def main():
        stats = ServeStats()
        _, listener = await serve_echo_steps(stats)
        frame = encode_bytes(Step(5, "s", 0, torch.zeros(1, 1, 64)))
        raw = await raw_exchange(listener.endpoint, frame[:100], shutdown=True)
        [reply] = read_replies(raw)
        assert isinstance(reply, ErrorReply) and reply.code == "frame_error"
        assert "truncated" in reply.message
        await listener.close()

    run(main())


def test_huge_prefix_on_a_blocking_socket_is_refused_without_allocating():
    async def main():
        stats = ServeStats()
        _, listener = await serve_echo_steps(stats)
        host, port = parse_tcp_endpoint(listener.endpoint)

        def hostile() -> bytes:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(struct.pack(">I", 2**32 - 1))
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                return b"".join(chunks)

        raw = await asyncio.to_thread(hostile)  # the server closes: recv sees EOF
        [reply] = read_replies(raw)
        assert reply.code == "limit_exceeded" and str(2**32 - 1) in reply.message
        assert await honest_calls(listener.endpoint, 3) == 3
        await listener.close()

    run(main())


def test_a_frame_declaring_64_mib_gets_the_same_deadline_as_any_frame_whatever_the_trickle():
    """Slowloris by declared length: the deadline counts from a frame's first byte and does not
    grow with the length it declares or with the pace of its bytes (the old rule gave a
    64 MiB frame read_timeout + 64 s, and reset the idle clock on every byte)."""

    async def main():
        limits = Limits(read_timeout_s=0.5)  # max_frame_bytes stays 64 MiB
        _, listener = await serve_echo_steps(ServeStats(), limits)
        host, port = parse_tcp_endpoint(listener.endpoint)

        async def trickle(first: bytes) -> float | None:
            reader, writer = await asyncio.open_connection(host, port)
            t0 = time.perf_counter()
            try:
                writer.write(first)
                for _ in range(40):  # one byte every 0.1 s for up to 4 s: never idle
                    await asyncio.sleep(0.1)
                    if await _eof_soon(reader):
                        return time.perf_counter() - t0
                    writer.write(b"\0")
                    await writer.drain()
            except ConnectionError:
                return time.perf_counter() - t0
            finally:
                writer.close()
            return None

        declared_64_mib = (64 * MiB - 1).to_bytes(4, "big")
        step = encode_bytes(Step(1, "s", 0, torch.zeros(1, 8, 64)))[:100]
        honest = asyncio.create_task(honest_calls(listener.endpoint, 40, pause=0.02))
        cut = await asyncio.gather(*(trickle(declared_64_mib) for _ in range(3)), trickle(step))
        assert all(t is not None and 0.4 < t < 1.2 for t in cut), cut
        assert await honest == 40
        await listener.close()

    run(main())


async def _eof_soon(reader: asyncio.StreamReader, wait: float = 0.001) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), wait)
    except asyncio.TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


def test_at_the_cap_a_newcomer_is_always_admitted_in_place_of_the_least_recently_active():
    """Unpinned connections give way first, by their last complete frame (a partial frame is
    no activity, so a staller goes before an idle client that just pinged); when every slot
    holds sessions, the pinned one least recently active gives way. The old rule refused the
    newcomer in both cases: partial frames were never evicted, pinned ones only after 60 s."""
    from layerchain.wire.messages import OpenSession, SessionOpened

    async def handler(msg):
        return SessionOpened(msg.rid, msg.session_id, 0)

    async def main():
        limits = Limits(max_connections=3, read_timeout_s=30)
        transport = TcpTransport(limits)
        listener = await transport.listen(
            "tcp://127.0.0.1:0", lambda conn: serve_connection(conn, handler, limits=limits)
        )
        host, port = parse_tcp_endpoint(listener.endpoint)
        clients = []

        async def client() -> RpcClient:
            clients.append(RpcClient(await transport.connect(listener.endpoint)))
            await asyncio.sleep(0.05)  # accepted, with a later accept time than the last one
            return clients[-1]

        pinned = await client()
        await pinned.call(OpenSession(0, "s", "m", 0, 1, 8), timeout=5)
        reader, writer = await asyncio.open_connection(host, port)  # a staller
        writer.write((64 * MiB - 1).to_bytes(4, "big") + bytes(1000))
        await asyncio.sleep(0.05)
        idle = await client()
        await idle.call(Ping(0, 1), timeout=5)
        for _ in range(5):  # the staller keeps its partial frame growing
            writer.write(bytes(100))
            await asyncio.sleep(0.02)
        first = await client()
        await first.call(Ping(0, 2), timeout=5)  # admitted in the staller's place
        assert await _eof_soon(reader, 1.0)
        second = await client()  # the idle client's place: its ping is older than first's
        await second.call(Ping(0, 3), timeout=5)
        with pytest.raises(PeerUnreachable):
            await idle.call(Ping(0, 4), timeout=5)
        await first.call(OpenSession(0, "t", "m", 0, 1, 8), timeout=5)
        await second.call(OpenSession(0, "u", "m", 0, 1, 8), timeout=5)
        await pinned.call(Ping(0, 5), timeout=5)  # all three pinned; the least recent: first
        await second.call(Ping(0, 6), timeout=5)
        newcomer = await client()
        await newcomer.call(Ping(0, 7), timeout=5)
        with pytest.raises(PeerUnreachable):
            await first.call(Ping(0, 8), timeout=5)
        await pinned.call(Ping(0, 9), timeout=5)
        await second.call(Ping(0, 10), timeout=5)
        assert (listener.evicted, listener.refused) == (3, 0)
        writer.close()
        for c in clients:
            await c.close()
        await listener.close()

    run(main())


def test_a_peer_that_stops_reading_replies_is_closed_after_the_read_timeout():
    """Replies wait for a slow reader at most read_timeout_s; then the connection closes and
    its requests' tasks end (before, a reply to a peer that never reads waited for ever)."""

    async def main():
        limits = Limits(read_timeout_s=0.5)
        _, listener = await serve_echo_steps(ServeStats(), limits)
        host, port = parse_tcp_endpoint(listener.endpoint)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, port))
        sock.setblocking(False)
        request = encode_bytes(Step(1, "s", 0, torch.zeros(1, 64, 512)))  # 128 KiB echoed
        loop = asyncio.get_running_loop()
        for _ in range(20):  # 2.5 MiB of replies that are never read
            await loop.sock_sendall(sock, request)
        t0 = time.perf_counter()
        while listener.connections and time.perf_counter() - t0 < 5:
            await asyncio.sleep(0.05)
        assert listener.connections == 0, "the connection of a peer that never reads is held"
        assert time.perf_counter() - t0 < 2.0
        assert await honest_calls(listener.endpoint, 3) == 3
        sock.close()
        await listener.close()

    run(main())


def test_listener_at_its_cap_admits_the_newcomer_and_close_ends_everything():
    async def main():
        transport = TcpTransport(Limits(max_connections=2))
        listener = await transport.listen("tcp://127.0.0.1:0", echo)
        conns = []
        for i in range(3):
            conns.append(await transport.connect(listener.endpoint))
            await conns[i].send(Ping(i, i))
            assert (await conns[i].recv()).rid == i
        with pytest.raises(PeerUnreachable):  # the first gave way to the third
            await conns[0].send(Ping(3, 3))
            await conns[0].recv()
        assert listener.connections == 2 and listener.evicted == 1
        await listener.close()
        with pytest.raises(PeerUnreachable):
            await conns[1].recv()
        for conn in conns:
            await conn.close()

    run(main())

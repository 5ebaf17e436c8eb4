"""Transports: messages cross TCP and memory intact; hostile peers get typed errors or a closed
connection while an honest client keeps being served."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest
import torch

from layerchain.errors import ConfigError, PeerUnreachable
from layerchain.wire.codec import Limits, encode_bytes
from layerchain.wire.messages import ErrorReply, Ping, Pong, Step, StepResult
from layerchain.wire.rpc import RpcClient, ServeStats, serve_connection
from layerchain.wire.tcp import parse_tcp_endpoint
from layerchain.wire.transport import (
    Connection,
    MemoryNetwork,
    MemoryTransport,
    TcpTransport,
    transport_for,
)
from test_wire_codec import assert_same, frame_from_header, sample_messages, step_header

pytestmark = pytest.mark.timeout(60)


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def echo(conn) -> None:
    """Send every received message straight back."""
    try:
        while True:
            await conn.send(await conn.recv())
    except PeerUnreachable:
        pass


@pytest.mark.parametrize("kind", ["tcp", "mem"])
def test_every_message_round_trips_through_both_transports(kind):
    async def main():
        transport = TcpTransport() if kind == "tcp" else MemoryTransport(MemoryNetwork())
        endpoint = "tcp://127.0.0.1:0" if kind == "tcp" else "mem://"
        listener = await transport.listen(endpoint, echo)
        conn = await transport.connect(listener.endpoint)
        assert isinstance(conn, Connection)
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


def test_trickling_client_is_cut_off_while_an_honest_client_is_served():
    async def main():
        stats = ServeStats()
        limits = Limits(read_timeout_s=0.3, min_read_bytes_per_s=1e6)
        _, listener = await serve_echo_steps(stats, limits)
        host, port = parse_tcp_endpoint(listener.endpoint)
        reader, writer = await asyncio.open_connection(host, port)
        frame = encode_bytes(Step(1, "s", 0, torch.zeros(1, 1, 64)))
        honest = asyncio.create_task(honest_calls(listener.endpoint, 40, pause=0.02))
        t0 = time.perf_counter()
        cut_after = None
        for byte in frame:  # one byte every 0.1 s: never idle 0.3 s, but never done either
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                cut_after = time.perf_counter() - t0
                break
            await asyncio.sleep(0.1)
            if reader.at_eof() or (await _eof_soon(reader)):
                cut_after = time.perf_counter() - t0
                break
        writer.close()
        assert cut_after is not None and cut_after < 1.5, cut_after
        assert await honest == 40
        await listener.close()

    run(main())


async def _eof_soon(reader: asyncio.StreamReader) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), 0.001)
    except asyncio.TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


def test_listener_caps_connections_and_close_ends_everything():
    async def main():
        transport = TcpTransport(Limits(max_connections=2))
        listener = await transport.listen("tcp://127.0.0.1:0", echo)
        conns = [await transport.connect(listener.endpoint) for _ in range(3)]
        for i, conn in enumerate(conns[:2]):
            await conn.send(Ping(i, i))
            assert (await conn.recv()).rid == i
        with pytest.raises(PeerUnreachable):  # the third was closed on accept
            await conns[2].send(Ping(3, 3))
            await conns[2].recv()
        await listener.close()
        with pytest.raises(PeerUnreachable):
            await conns[0].recv()
        for conn in conns:
            await conn.close()

    run(main())


def test_at_the_cap_a_newcomer_replaces_the_quietest_connection_that_holds_no_session(
    monkeypatch,
):
    from layerchain.wire import tcp
    from layerchain.wire.messages import OpenSession, SessionOpened

    monkeypatch.setattr(tcp, "PINNED_QUIET_S", 1.0)  # sessions left open give way after 1 s

    async def handler(msg):
        return SessionOpened(msg.rid, msg.session_id, 0)

    async def main():
        limits = Limits(max_connections=2)
        transport = TcpTransport(limits, evict_quiet_s=0.2)
        listener = await transport.listen(
            "tcp://127.0.0.1:0", lambda conn: serve_connection(conn, handler, limits=limits)
        )
        clients = []

        async def client() -> RpcClient:
            clients.append(RpcClient(await transport.connect(listener.endpoint)))
            return clients[-1]

        pinned, idle = await client(), await client()
        await pinned.call(OpenSession(0, "s", "m", 0, 1, 8), timeout=5)  # holds a session
        await idle.call(Ping(0, 1), timeout=5)
        with pytest.raises(PeerUnreachable):  # both busy just now: the newcomer is refused
            await (await client()).call(Ping(0, 2), timeout=5)
        await asyncio.sleep(0.3)  # both quiet now, but only one without a session
        newcomer = await client()
        await newcomer.call(Ping(0, 3), timeout=5)
        with pytest.raises(PeerUnreachable):
            await idle.call(Ping(0, 4), timeout=5)
        await pinned.call(Ping(0, 5), timeout=5)
        assert (listener.evicted, listener.refused) == (1, 1)
        await newcomer.call(OpenSession(0, "t", "m", 0, 1, 8), timeout=5)  # both hold sessions
        await asyncio.sleep(0.3)
        with pytest.raises(PeerUnreachable):
            await (await client()).call(Ping(0, 6), timeout=5)
        await asyncio.sleep(1.0)  # both silent for over PINNED_QUIET_S: the quieter goes
        await (await client()).call(Ping(0, 7), timeout=5)
        with pytest.raises(PeerUnreachable):
            await pinned.call(Ping(0, 8), timeout=5)
        await newcomer.call(Ping(0, 9), timeout=5)
        assert (listener.evicted, listener.refused) == (2, 2)
        for c in clients:
            await c.close()
        await listener.close()

    run(main())

"""RpcClient and serve_connection: rid matching, typed failures, per-connection limits."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from layerchain.errors import (
    InvalidOutput,
    LimitExceeded,
    PeerBusy,
    PeerTimeout,
    PeerUnreachable,
    RemoteError,
    UnknownSession,
)
from layerchain.wire.codec import Limits
from layerchain.wire.messages import (
    CloseSession,
    Info,
    OpenSession,
    Ping,
    Pong,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
)
from layerchain.wire.rpc import RpcClient, ServeStats, serve_connection
from layerchain.wire.transport import MemoryNetwork, MemoryTransport, TcpTransport

pytestmark = pytest.mark.timeout(60)


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def handler(msg):
    """A toy node: steps echo hidden*2 after a random delay; a few named failures."""
    if isinstance(msg, Step):
        await asyncio.sleep(random.uniform(0, 0.02))  # replies come back out of order
        if msg.session_id == "unknown":
            raise UnknownSession(f"no session {msg.session_id}")
        return StepResult(0, msg.session_id, msg.step, msg.hidden * 2)  # rid filled in for us
    if isinstance(msg, OpenSession):
        if msg.session_id == "full":
            raise PeerBusy("no cache room")
        return SessionOpened(msg.rid, msg.session_id, 100)
    if isinstance(msg, CloseSession):
        return SessionClosed(msg.rid, msg.session_id)
    if isinstance(msg, Info):
        if msg.rid % 2:
            raise ZeroDivisionError("a handler bug")
        return Pong(msg.rid, 0)  # the wrong reply type
    raise AssertionError(msg)


async def start(kind: str, stats: ServeStats, limits: Limits = Limits(), fn=handler):
    if kind == "tcp":
        transport = TcpTransport(limits)
    else:
        transport = MemoryTransport(MemoryNetwork(), limits=limits)
    listener = await transport.listen(
        "tcp://127.0.0.1:0" if kind == "tcp" else "mem://",
        lambda conn: serve_connection(conn, fn, limits=limits, stats=stats),
    )
    client = RpcClient(await transport.connect(listener.endpoint))
    return listener, client


@pytest.mark.parametrize("kind", ["tcp", "mem"])
def test_concurrent_calls_are_matched_by_rid(kind):
    async def main():
        stats = ServeStats()
        listener, client = await start(kind, stats)
        xs = [torch.full((1, 2, 4), float(i)) for i in range(50)]
        replies = await asyncio.gather(
            *(client.call(Step(0, f"s{i}", i, x), timeout=5) for i, x in enumerate(xs))
        )
        for i, (x, reply) in enumerate(zip(xs, replies)):
            assert reply.step == i and reply.session_id == f"s{i}"
            assert torch.equal(reply.hidden, x * 2)
        assert len({r.rid for r in replies}) == 50 and client.pending == 0
        assert (await client.call(Ping(0, 123), timeout=5)) == Pong(replies[-1].rid + 1, 123)
        assert stats.requests == 51 and stats.error_replies == 0
        await client.close()
        await listener.close()

    run(main())


def test_error_replies_become_typed_errors_and_the_connection_keeps_serving():
    async def main():
        stats = ServeStats()
        listener, client = await start("tcp", stats)
        with pytest.raises(PeerBusy, match="no cache room"):
            await client.call(OpenSession(0, "full", "m", 0, 3, 64), timeout=5)
        with pytest.raises(UnknownSession):
            await client.call(Step(0, "unknown", 0, torch.zeros(1, 1, 4)), timeout=5)
        with pytest.raises(RemoteError, match="internal error: ZeroDivisionError"):
            await client.call(Info(0), timeout=5)  # rid 1: the handler bug
        with pytest.raises(InvalidOutput):
            await client.call(Info(0), timeout=5)  # rid 2: answered with Pong
        with pytest.raises(LimitExceeded):  # refused locally before sending
            await client.call(Step(0, "s", 0, torch.zeros(4)), timeout=5)
        reply = await client.call(Step(0, "s", 1, torch.ones(1, 1, 4)), timeout=5)
        assert torch.equal(reply.hidden, torch.full((1, 1, 4), 2.0))
        assert stats.by_code == {"busy": 1, "unknown_session": 1, "remote_error": 1}
        await client.close()
        await listener.close()

    run(main())


def test_timeout_gives_peer_timeout_and_the_late_reply_is_dropped():
    async def slow(msg):
        await asyncio.sleep(0.3 if msg.step == 0 else 0)
        return StepResult(0, msg.session_id, msg.step, msg.hidden)

    async def main():
        listener, client = await start("tcp", ServeStats(), fn=slow)
        x = torch.zeros(1, 1, 4)
        with pytest.raises(PeerTimeout, match="within 0.05 s"):
            await client.call(Step(0, "s", 0, x), timeout=0.05)
        assert (await client.call(Step(0, "s", 1, x), timeout=5)).step == 1
        await asyncio.sleep(0.4)
        assert client.late_replies == 1 and client.pending == 0
        await client.close()
        await listener.close()

    run(main())


@pytest.mark.parametrize("kind", ["tcp", "mem"])
def test_server_dying_fails_pending_calls_with_peer_unreachable(kind):
    async def hang(msg):
        await asyncio.sleep(30)

    async def main():
        listener, client = await start(kind, ServeStats(), fn=hang)
        calls = [
            asyncio.create_task(client.call(Step(0, "s", i, torch.zeros(1, 1, 4)), timeout=10))
            for i in range(5)
        ]
        await asyncio.sleep(0.1)
        assert client.pending == 5
        await listener.close()  # the node goes away with requests in flight
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, PeerUnreachable) for r in results), results
        with pytest.raises(PeerUnreachable):
            await client.call(Ping(0, 1), timeout=1)
        await client.close()

    run(main())


def test_connect_to_nothing_is_peer_unreachable():
    async def main():
        with pytest.raises(PeerUnreachable):
            await TcpTransport().connect("tcp://127.0.0.1:1")
        with pytest.raises(PeerUnreachable):
            await MemoryTransport(MemoryNetwork()).connect("mem://nobody")

    run(main())


def test_sessions_per_connection_are_capped_and_tracked():
    async def main():
        stats = ServeStats()
        listener, client = await start("mem", stats, Limits(max_sessions_per_connection=3))
        for i in range(3):
            await client.call(OpenSession(0, f"s{i}", "m", 0, 3, 64), timeout=5)
        with pytest.raises(LimitExceeded, match="3 sessions"):
            await client.call(OpenSession(0, "s3", "m", 0, 3, 64), timeout=5)
        await client.call(CloseSession(0, "s0"), timeout=5)
        await client.call(OpenSession(0, "s3", "m", 0, 3, 64), timeout=5)
        assert stats.open_sessions == {"s1", "s2", "s3"}
        await client.close()
        await listener.close()

    run(main())


def test_inflight_requests_per_connection_are_bounded():
    running = 0
    peak = 0

    async def counting(msg):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return StepResult(0, msg.session_id, msg.step, msg.hidden)

    async def main():
        limits = Limits(max_inflight_per_connection=4)
        listener, client = await start("tcp", ServeStats(), limits, counting)
        x = torch.zeros(1, 1, 4)
        await asyncio.gather(*(client.call(Step(0, "s", i, x), timeout=10) for i in range(40)))
        assert peak == 4
        await client.close()
        await listener.close()

    run(main())


def test_roundtrip_benchmark_prints_the_per_hop_figure(capsys):
    from layerchain.bench.wire import roundtrip_us

    result = roundtrip_us(iterations=300, warmup=50)
    with capsys.disabled():
        print(f"\nwire round trip Step/StepResult [1,1,576] f32 over TCP: {result}")
    assert result["frame_bytes"] == 2344 and result["p50_us"] > 0


def test_the_wire_benchmark_measures_tls_beside_plaintext_in_one_run(capsys):
    from layerchain.bench.wire import side_by_side

    result = side_by_side(iterations=200, warmup=20, block=50)
    with capsys.disabled():
        print(f"\nwire round trip, TCP vs TLS: p50 {result['p50_us']} vs {result['tls_p50_us']} us")
    old = {"mode", "endpoint", "frame_bytes", "iterations", "p50_us", "p90_us", "p99_us", "mean_us"}
    assert old <= set(result) and result["endpoint"] == "tcp" and result["frame_bytes"] == 2344
    assert result["tls_cipher"].startswith("TLS_")  # a TLS 1.3 suite: it really was TLS
    assert result["tls_added_p50_us"] == round(result["tls_p50_us"] - result["p50_us"], 1)


def test_a_server_answers_only_the_documented_error_codes_and_a_client_trusts_only_those():
    """Node side: errors outside messages.ERROR_CODES leave as invalid_voucher (payments) or
    remote_error. Client side: a peer's code outside the set is a RemoteError, never, say,
    an InsufficientFunds or InvalidApiKey the caller would take for its own."""
    from layerchain.errors import (
        InsufficientFunds,
        InvalidApiKey,
        InvalidVoucher,
        LayerchainError,
        NoRoute,
        UserError,
    )
    from layerchain.wire.messages import ERROR_CODES, ErrorReply
    from layerchain.wire.rpc import peer_error

    raised = {"funds": InsufficientFunds("pay first"), "key": InvalidApiKey("who are you"),
              "route": NoRoute("nothing covers"), "busy": PeerBusy("full")}

    async def raising(msg):
        raise raised[msg.session_id]

    async def main():
        stats = ServeStats()
        listener, client = await start("mem", stats, fn=raising)
        caught = {}
        for name in raised:
            with pytest.raises(LayerchainError) as error:
                await client.call(OpenSession(0, name, "m", 0, 1, 8), timeout=5)
            caught[name] = error.value
        await client.close()
        await listener.close()
        return stats, caught

    stats, caught = run(main())
    assert set(stats.by_code) <= set(ERROR_CODES)
    assert stats.by_code == {"invalid_voucher": 1, "remote_error": 2, "busy": 1}
    assert isinstance(caught["busy"], PeerBusy)
    assert type(caught["funds"]) is InvalidVoucher  # what the voucher failed at, not our funds
    assert "insufficient_funds: pay first" in str(caught["funds"])
    assert type(caught["key"]) is RemoteError and type(caught["route"]) is RemoteError
    assert "invalid_api_key: who are you" in str(caught["key"])
    for code in ("insufficient_funds", "invalid_api_key", "no_route", "config_error", "x" * 99):
        error = peer_error(ErrorReply(1, code, "trust me"))
        assert type(error) is RemoteError and not isinstance(error, UserError), code
        assert len(str(error)) < 120
    assert isinstance(peer_error(ErrorReply(1, "invalid_voucher", "short")), InvalidVoucher)

"""Attacks on one node's doors: slow sockets that hold its connections, and sessions that
reserve its whole cache (issue 12, items 8 and 9).

Both aim at ``stage.target`` directly, over TCP, and judge the node the way a newcomer
does: can a fresh connection still get a ping answered, or a session of an honest size?
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import torch

from layerchain.bench.attacks.base import Outcome, Stage, Stopwatch
from layerchain.errors import LayerchainError
from layerchain.wire import (
    CloseSession,
    Info,
    InfoReply,
    OpenSession,
    Ping,
    RpcClient,
    SessionOpened,
    Step,
    TcpTransport,
    encode_bytes,
)
from layerchain.wire.codec import PREFIX_BYTES as PREFIX
from layerchain.wire.messages import MAX_STEP_TOKENS
from layerchain.wire.tcp import parse_tcp_endpoint

PING_TIMEOUT_S = 2.0  # the client's ping timeout (ClientConfig.ping_timeout_s)
HONEST_SESSION_TOKENS = 64  # what a probe asks for: a short chat


async def _probe_ping(endpoint: str) -> float | None:
    """Seconds for a fresh connection to get a Pong, or None if it got none in time."""
    t0 = time.perf_counter()
    rpc = None
    try:
        rpc = RpcClient(await asyncio.wait_for(TcpTransport().connect(endpoint), PING_TIMEOUT_S))
        await rpc.call(Ping(0, 7), PING_TIMEOUT_S)
        return time.perf_counter() - t0
    except (LayerchainError, OSError, asyncio.TimeoutError):
        return None
    finally:
        if rpc is not None:
            await rpc.close()


async def _probe_session(endpoint: str, stage: Stage) -> bool:
    """Whether a fresh connection is admitted a session of an honest size on the target."""
    rpc = None
    try:
        rpc = RpcClient(await asyncio.wait_for(TcpTransport().connect(endpoint), PING_TIMEOUT_S))
        sid = uuid.uuid4().hex
        reply = await rpc.call(OpenSession(0, sid, stage.model_id, stage.target.start,
                                           stage.target.end, HONEST_SESSION_TOKENS), 5.0)
        with contextlib.suppress(LayerchainError):
            await rpc.call(CloseSession(0, sid), 2.0)
        return isinstance(reply, SessionOpened)
    except (LayerchainError, OSError, asyncio.TimeoutError):
        return False
    finally:
        if rpc is not None:
            await rpc.close()


def largest_step_frame(hidden_size: int) -> int:
    """Body bytes of the largest Step any node must accept: ``MAX_STEP_TOKENS`` tokens in
    float32 (a node refuses a longer frame at once, so a slow sender declares this)."""
    step = Step(0, uuid.uuid4().hex, 0, torch.zeros(1, MAX_STEP_TOKENS, hidden_size))
    return len(encode_bytes(step)) - PREFIX


async def slowloris(stage: Stage) -> Outcome:
    """More sockets than the target's default connection cap, each declaring the largest
    step frame a node must accept and trickling one byte a second; every second a
    newcomer pings.

    Observed: the node held at least half its cap of slow sockets 2 s after they were all
    connected and had started their frames. Held: every newcomer got its Pong within the client's ping timeout."""
    from layerchain.node.config import NodeConfig  # the target runs with the default cap

    endpoint = stage.target.endpoint
    host, port = parse_tcp_endpoint(endpoint)
    cap = NodeConfig().max_connections
    sockets = cap + 64
    declared = largest_step_frame(stage.hidden_size)
    window = Stopwatch(stage.duration_s)
    readers: list[asyncio.StreamReader] = []
    cut = refused = 0

    async def trickler() -> None:
        nonlocal cut, refused
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            refused += 1
            return
        readers.append(reader)
        try:
            writer.write(declared.to_bytes(4, "big") + b"\0")
            while window:
                await asyncio.sleep(1.0)
                writer.write(b"\0")  # never idle, never done
                await writer.drain()
                if reader.at_eof():
                    cut += 1
                    return
        except ConnectionError:
            cut += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(trickler()) for _ in range(sockets)]
    placing = Stopwatch(10.0)  # 320 connects at once may queue in the node's accept backlog
    while placing and len(readers) + refused < sockets:
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.0)  # the frames are started
    connected = len(readers)
    held_at_2s = sum(not r.at_eof() for r in readers)
    latencies: list[float | None] = []
    while window:
        latencies.append(await _probe_ping(endpoint))
        await asyncio.sleep(1.0)
    await asyncio.gather(*tasks, return_exceptions=True)
    answered = [t for t in latencies if t is not None]
    details: dict[str, object] = {
        "slow_sockets": sockets,
        "declared_frame_bytes": declared,
        "connected": connected,
        "held_by_node_at_2s": held_at_2s,
        "cut_by_node": cut,
        "probes": len(latencies),
        "probes_answered": len(answered),
        "probe_s_max": round(max(answered), 3) if answered else None,
    }
    return Outcome(observed=held_at_2s >= cap // 2,
                   held=bool(latencies) and len(answered) == len(latencies), details=details)


async def session_squatting(stage: Stage) -> Outcome:
    """One connection asks the target for a session as long as its whole free cache, then
    for 16 more of an eighth of it each, and holds what it got; every second a newcomer
    asks for a session of ``HONEST_SESSION_TOKENS``.

    Observed: the squatter's requests were answered. Held: every newcomer got its session."""
    endpoint = stage.target.endpoint
    window = Stopwatch(stage.duration_s)
    rpc = RpcClient(await TcpTransport().connect(endpoint))
    reserved, answers = 0, {"opened": 0, "refused": 0}
    try:
        info = await rpc.call(Info(0), 5.0)
        free = info.free_cache_tokens if isinstance(info, InfoReply) else stage.max_cache_tokens
        for max_length in [free] + [max(1, free // 8)] * 16:
            try:
                await rpc.call(OpenSession(0, uuid.uuid4().hex, stage.model_id, stage.target.start,
                                           stage.target.end, max_length), 5.0)
                reserved += max_length
                answers["opened"] += 1
            except LayerchainError:
                answers["refused"] += 1
        probes: list[bool] = []
        while window:
            probes.append(await _probe_session(endpoint, stage))
            await asyncio.sleep(1.0)
    finally:
        await rpc.close()
    details: dict[str, object] = {
        "free_cache_tokens": free,
        "squatter_sessions": answers,
        "squatter_reserved_tokens": reserved,
        "probes": len(probes),
        "probes_admitted": sum(probes),
    }
    return Outcome(observed=sum(answers.values()) > 0, held=bool(probes) and all(probes),
                   details=details)

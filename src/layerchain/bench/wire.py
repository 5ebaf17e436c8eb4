"""Micro-benchmark of one hop's wire overhead: a Step/StepResult round trip on loopback.

``roundtrip_us()`` sends ``Step`` [1, 1, hidden] (a decode step: 2.3 KB for 576 float32)
to an echo server and waits for the ``StepResult``, ``iterations`` times, and reports
microseconds per round trip. Client and server share one event loop and one process, so
the figure is the CPU cost of both ends plus the kernel's loopback, with no model compute:
the per-hop overhead a chain adds to each token (DESIGN target: <= 300 us).

``mode="rpc"`` goes through ``RpcClient`` and ``serve_connection`` (what client and node
use); ``mode="raw"`` uses ``Connection.send/recv`` only, to show what the RPC layer costs.

``endpoint`` picks the transport: ``tcp://`` (plaintext), ``tls://`` (TLS 1.3 with a fresh
identity, what nodes serve by default) or ``mem://``. ``side_by_side()`` (``layerchain bench
wire``) measures plaintext and TLS in the same run, alternating blocks of round trips so
that both see the same machine load, and reports what TLS adds (DESIGN target: <= 100 us
on the p50 hop overhead).
"""

from __future__ import annotations

import asyncio
import ssl
import statistics
import time
from typing import Any

import torch

from layerchain.discovery.identity import Identity
from layerchain.wire.codec import encode_bytes
from layerchain.wire.messages import Step, StepResult
from layerchain.wire.rpc import RpcClient, serve_connection
from layerchain.wire.tcp import TcpConnection
from layerchain.wire.transport import Connection, Dialer, Listener


async def _echo(msg: Any) -> StepResult:
    return StepResult(msg.rid, msg.session_id, msg.step, msg.hidden, b"")


async def roundtrip_us_async(
    *,
    iterations: int = 2000,
    warmup: int = 200,
    hidden_size: int = 576,
    dtype: torch.dtype = torch.float32,
    endpoint: str = "tcp://127.0.0.1:0",
    mode: str = "rpc",
    tokens: int = 1,
) -> dict[str, Any]:
    """Round-trip statistics in microseconds (see the module docstring)."""
    hidden = torch.randn(1, tokens, hidden_size).to(dtype)  # [B=1, T=tokens, H]
    link = await _Link.open(endpoint, mode)
    try:
        times = await link.round_trips(hidden, warmup, iterations)
    finally:
        await link.close()
    return {
        "mode": mode,
        "endpoint": endpoint.split("://")[0],
        "frame_bytes": len(encode_bytes(Step(0, "bench", 0, hidden))),
        "iterations": iterations,
        **_stats(times),
    }


async def side_by_side_async(
    *,
    iterations: int = 2000,
    warmup: int = 200,
    hidden_size: int = 576,
    tokens: int = 1,
    mode: str = "rpc",
    block: int = 100,
) -> dict[str, Any]:
    """Plaintext TCP and TLS in one run, ``block`` round trips on each in turn.

    The old fields (``p50_us``...) are plaintext TCP's, as ``roundtrip_us`` reports them;
    ``tls_*`` are TLS's; ``tls_added_p50_us`` / ``tls_added_mean_us`` the difference."""
    hidden = torch.randn(1, tokens, hidden_size)  # [B=1, T=tokens, H] float32
    tcp = await _Link.open("tcp://127.0.0.1:0", mode)
    tls = await _Link.open("tls://127.0.0.1:0", mode)
    times: dict[str, list[float]] = {"tcp": [], "tls": []}
    try:
        await tcp.round_trips(hidden, warmup, 0)
        await tls.round_trips(hidden, warmup, 0)
        while len(times["tls"]) < iterations:
            n = min(block, iterations - len(times["tls"]))
            times["tcp"] += await tcp.round_trips(hidden, 0, n)
            times["tls"] += await tls.round_trips(hidden, 0, n)
        cipher = tls.cipher
    finally:
        await tcp.close()
        await tls.close()
    plain, secure = _stats(times["tcp"]), _stats(times["tls"])
    return {
        "mode": mode,
        "endpoint": "tcp",
        "frame_bytes": len(encode_bytes(Step(0, "bench", 0, hidden))),
        "iterations": iterations,
        **plain,
        **{f"tls_{key}": value for key, value in secure.items()},
        "tls_added_p50_us": round(secure["p50_us"] - plain["p50_us"], 1),
        "tls_added_mean_us": round(secure["mean_us"] - plain["mean_us"], 1),
        "tls_cipher": cipher,
    }


def _stats(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {
        "p50_us": round(statistics.median(times), 1),
        "p90_us": round(times[int(0.9 * (len(times) - 1))], 1),
        "p99_us": round(times[int(0.99 * (len(times) - 1))], 1),
        "mean_us": round(statistics.fmean(times), 1),
    }


class _Link:
    """An echo listener and one connection to it, on one endpoint scheme."""

    def __init__(self, listener: Listener, conn: Connection, mode: str) -> None:
        self.listener, self.conn, self.mode = listener, conn, mode
        self.client = RpcClient(conn)

    @classmethod
    async def open(cls, endpoint: str, mode: str) -> _Link:
        identity = Identity.generate()
        dialer = Dialer(identity, insecure=True)  # tcp:// is the point of comparison

        async def raw_echo(conn: Connection) -> None:
            try:
                while True:
                    msg = await conn.recv()
                    await conn.send(await _echo(msg))
            except Exception:
                return

        async def rpc_echo(conn: Connection) -> None:
            await serve_connection(conn, _echo)  # its tally is not needed here

        listener = await dialer.listen(endpoint, raw_echo if mode == "raw" else rpc_echo)
        conn = await dialer.connect(listener.endpoint, peer_id=identity.peer_id)
        return cls(listener, conn, mode)

    @property
    def cipher(self) -> str:
        """The TLS cipher suite of the connection, "" for plaintext or memory."""
        tls = self.conn.extra("ssl_object") if isinstance(self.conn, TcpConnection) else None
        cipher = tls.cipher() if isinstance(tls, ssl.SSLObject) else None
        return cipher[0] if cipher else ""

    async def round_trips(self, hidden: torch.Tensor, warmup: int, iterations: int) -> list[float]:
        """Microseconds of each of ``iterations`` round trips, after ``warmup`` unmeasured."""
        times = []
        for i in range(warmup + iterations):
            step = Step(i, "bench", i, hidden)
            t0 = time.perf_counter()
            if self.mode == "raw":
                await self.conn.send(step)
                await self.conn.recv()
            else:
                await self.client.call(step, timeout=5.0)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e6)
        return times

    async def close(self) -> None:
        await self.client.close()
        await self.listener.close()


def roundtrip_us(*, use_uvloop: bool = False, **options: Any) -> dict[str, Any]:
    """Sync wrapper of ``roundtrip_us_async``; ``use_uvloop`` runs it on uvloop if installed."""
    if use_uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
        try:
            return loop.run_until_complete(roundtrip_us_async(**options))
        finally:
            loop.close()
    return asyncio.run(roundtrip_us_async(**options))


def side_by_side(**options: Any) -> dict[str, Any]:
    """Sync wrapper of ``side_by_side_async`` (``layerchain bench wire``), on asyncio's loop
    (a TLS listener upgrades accepted sockets with ``loop.start_tls``, which uvloop does not
    do from a paused socket)."""
    return asyncio.run(side_by_side_async(**options))


if __name__ == "__main__":  # python -m layerchain.bench.wire
    import json

    for mode in ("raw", "rpc"):
        print(json.dumps(side_by_side(mode=mode)))

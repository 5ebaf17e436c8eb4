"""Micro-benchmark of one hop's wire overhead: a Step/StepResult round trip on loopback.

``roundtrip_us()`` sends ``Step`` [1, 1, hidden] (a decode step: 2.3 KB for 576 float32)
to an echo server and waits for the ``StepResult``, ``iterations`` times, and reports
microseconds per round trip. Client and server share one event loop and one process, so
the figure is the CPU cost of both ends plus the kernel's loopback, with no model compute:
the per-hop overhead a chain adds to each token (DESIGN target: <= 300 us).

``mode="rpc"`` goes through ``RpcClient`` and ``serve_connection`` (what client and node
use); ``mode="raw"`` uses ``Connection.send/recv`` only, to show what the RPC layer costs.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import torch

from layerchain.wire.codec import encode_bytes
from layerchain.wire.messages import Step, StepResult
from layerchain.wire.rpc import RpcClient, serve_connection
from layerchain.wire.transport import transport_for


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
) -> dict[str, Any]:
    """Round-trip statistics in microseconds (see the module docstring)."""
    transport = transport_for(endpoint)
    hidden = torch.randn(1, 1, hidden_size).to(dtype)  # [B=1, T=1, H]

    async def raw_echo(conn: Any) -> None:
        try:
            while True:
                msg = await conn.recv()
                await conn.send(await _echo(msg))
        except Exception:
            return

    async def rpc_echo(conn: Any) -> None:
        await serve_connection(conn, _echo)  # its tally is not needed here

    listener = await transport.listen(endpoint, raw_echo if mode == "raw" else rpc_echo)
    conn = await transport.connect(listener.endpoint)
    client = RpcClient(conn)
    times: list[float] = []
    try:
        for i in range(warmup + iterations):
            step = Step(i, "bench", i, hidden)
            t0 = time.perf_counter()
            if mode == "raw":
                await conn.send(step)
                await conn.recv()
            else:
                await client.call(step, timeout=5.0)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e6)
    finally:
        await client.close()
        await listener.close()
    times.sort()
    return {
        "mode": mode,
        "endpoint": endpoint.split("://")[0],
        "frame_bytes": len(encode_bytes(Step(0, "bench", 0, hidden))),
        "iterations": iterations,
        "p50_us": round(statistics.median(times), 1),
        "p90_us": round(times[int(0.9 * (len(times) - 1))], 1),
        "p99_us": round(times[int(0.99 * (len(times) - 1))], 1),
        "mean_us": round(statistics.fmean(times), 1),
    }


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


if __name__ == "__main__":  # python -m layerchain.bench.wire
    import json

    for mode in ("raw", "rpc"):
        print(json.dumps(roundtrip_us(mode=mode)))

"""Benchmark: what the OpenAI-compatible gateway adds to a generation, side by side.

On one fresh local swarm, the same greedy chat request is decoded first by a client in this
process (``Swarm.stream``) and then through ``layerchain api serve`` in its own process, read
as server-sent events over HTTP. Per-token times are the gaps between tokens (direct) or
between content chunks (gateway); ``ttft_s`` is from sending the request to the first token.
Last, ``concurrency`` requests at once through the gateway give the aggregate tokens/s.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from layerchain.bench.swarm import _p50
from layerchain.errors import LayerchainError
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import even_spans

MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def direct_stream(initial_peers: list[str], model: str, max_tokens: int) -> tuple[list[float], str, float]:
    """Token gaps (s), text and time to first token of one greedy chat in this process."""
    from layerchain.client import Swarm
    from layerchain.model import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    with Swarm(initial_peers, model=model) as client:
        client.generate("warm up", SamplingParams(max_new_tokens=4))
        t0 = time.perf_counter()
        stamps, text = [], []
        for event in client.stream(MESSAGES, params):
            stamps.append(time.perf_counter())
            text.append(event.text)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return gaps, "".join(text), stamps[0] - t0 if stamps else 0.0


def gateway_stream(url: str, max_tokens: int) -> tuple[list[float], str, float]:
    """The same through the gateway: gaps between content chunks, text, time to first."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300)
    body = json.dumps({"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise LayerchainError(f"the gateway answered {response.status}: {response.read()[:300]!r}")
    stamps, text = [], []
    for raw in response:  # one SSE line at a time
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        content = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
        if content:
            stamps.append(time.perf_counter())
            text.append(content)
    conn.close()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return gaps, "".join(text), stamps[0] - t0 if stamps else 0.0


def _start_gateway(initial_peer: str, model: str, log: Path) -> tuple[subprocess.Popen, str]:
    from layerchain.local import node_env

    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "layerchain", "api", "serve", "--initial-peers", initial_peer,
             "--model", model, "--port", "0", "--data-dir", str(log.parent / "gateway"),
             "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=node_env(),
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"at (http://[\d.]+:\d+) ", log.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise LayerchainError(f"the gateway did not start: {log.read_text(errors='replace')[-500:]}")


def run_gateway_bench(
    model: str = DEFAULT_MODEL, nodes: int = 3, max_new_tokens: int = 32, concurrency: int = 4
) -> dict:
    from layerchain.local import swarm_down, swarm_up
    from layerchain.model import resolve_model

    state = Path(tempfile.mkdtemp(prefix="layerchain-bench-gateway-"))
    proc = None
    try:
        local = swarm_up(state, even_spans(resolve_model(model).num_blocks, nodes), model=model)
        direct_gaps, direct_text, direct_ttft = direct_stream(
            local.initial_peers, model, max_new_tokens)
        proc, url = _start_gateway(local.initial_peers[0], model, state / "gateway.log")
        gateway_stream(url, 4)  # warm up: the gateway's first route and connections
        gw_gaps, gw_text, gw_ttft = gateway_stream(url, max_new_tokens)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            runs = list(pool.map(lambda _: gateway_stream(url, max_new_tokens), range(concurrency)))
        wall = time.perf_counter() - t0
        tokens = sum(len(gaps) + 1 for gaps, _, _ in runs)
        direct_tps, gw_tps = 1.0 / _p50(direct_gaps), 1.0 / _p50(gw_gaps)
        return {
            "direct_tps": round(direct_tps, 2),
            "gateway_tps": round(gw_tps, 2),
            "ratio": round(gw_tps / direct_tps, 3),
            "direct_ttft_s": round(direct_ttft, 3),
            "gateway_ttft_s": round(gw_ttft, 3),
            "concurrency": concurrency,
            "concurrent_tokens_per_s": round(tokens / wall, 2),
            "identical_text": gw_text == direct_text,
            "tokens": len(gw_gaps) + 1,
            "nodes": nodes,
        }
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        swarm_down(state, quiet=True)

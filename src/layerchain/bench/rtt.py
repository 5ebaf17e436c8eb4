"""Benchmark: generation speed against the round-trip time between hosts (issue 13).

Four emulated hosts (``bench.netlab``), each on its own subnet of one router: a client and
three nodes serving ``0:10``, ``10:20``, ``20:30`` of the model, so every token crosses 3
hops. The router's delay line puts the same round trip between every pair of hosts; each
``rtt_ms`` a client per mode (processes on the client host, TLS to every node as by
default) runs ``runs`` greedy generations, after one warm-up, in rounds that visit every RTT
and mode once (so the drift of a shared machine's load hits every point alike); a point is
their median tokens/s and time to first token. Modes (``modes``): ``pull``, the client
sends each hop its input and gets its output back (``ms_per_token`` grows by ``hops x
rtt_ms``: one round trip per hop per token, nothing more; TLS adds no round trip once a
session is open), and ``push``, each hop forwards its output straight to the next
(``client.push``: ``hops + 1`` one-way transfers, so ``(hops + 1) / 2 x rtt_ms``). This is the analogue of Petals' table (3 servers: 1.71 steps/s at < 5 ms, 1.23
at 100 ms RTT). Needs root (network namespaces), iptables and NetfilterQueue.

``{"points": [{"rtt_ms", "mode", "tokens_per_s", "ttft_s", "ms_per_token",
"measured_rtt_ms"}], "hops", "transport" ("tls": what the nodes announce), "model",
"max_new_tokens", "runs", "modes", "identical"}``: ``measured_rtt_ms`` is the TCP round trip
client -> first node as measured (p50), so the delay line's accuracy shows next to each
figure; ``identical`` whether every generation gave the same tokens (greedy: it must).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from layerchain.bench.netlab import (
    Lab,
    LabError,
    RemoteClient,
    start_bootstrap,
    start_node,
    tcp_rtt_ms,
    wait_node,
)
from layerchain.errors import ConfigError
from layerchain.model.spec import DEFAULT_MODEL

PROMPT = "Write a short poem about the sea."
NODE_HOSTS = ("h1", "h2", "h3")
CLIENT_HOST = "c"
MAX_RTT_MS = 10_000.0  # a round trip beyond 10 s is a typo, not a network
MODES = ("pull", "push")  # client-driven hops, hops forwarding to each other (client.push)


def parse_rtts(text: str) -> list[float]:
    """``"0,5,25"`` -> [0.0, 5.0, 25.0]; ConfigError for anything else."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--rtt-ms takes comma-separated milliseconds, got {text!r}",
                          hint="e.g. --rtt-ms 0,5,25,50,100") from None
    if not values or any(not 0.0 <= v <= MAX_RTT_MS for v in values):
        raise ConfigError(f"--rtt-ms values must be in 0..{MAX_RTT_MS:g} ms, got {text!r}",
                          hint="e.g. --rtt-ms 0,5,25,50,100")
    return values


def _spans(num_blocks: int, hops: int) -> list[str]:
    cuts = [round(i * num_blocks / hops) for i in range(hops + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:])]


def run_rtt_bench(
    rtts_ms: Sequence[float] = (0.0, 5.0, 25.0, 50.0, 100.0),
    *,
    model: str = DEFAULT_MODEL,
    max_new_tokens: int = 32,
    runs: int = 2,
    threads: int = 1,
    modes: Sequence[str] = MODES,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Tokens/s and TTFT of a 3-hop route at each round trip of ``rtts_ms`` and each of
    ``modes`` (see module)."""
    from layerchain.model import resolve_model

    if runs < 1 or max_new_tokens < 1:
        raise ConfigError("bench rtt needs --runs >= 1 and --max-new-tokens >= 1")
    if not modes or any(mode not in MODES for mode in modes):
        raise ConfigError(f"bench rtt modes are {', '.join(MODES)}, got {list(modes)}")
    say = on_progress or (lambda _: None)
    spec = resolve_model(model)
    spans = _spans(spec.num_blocks, len(NODE_HOSTS))
    workdir = Path(tempfile.mkdtemp(prefix="layerchain-rtt-"))
    points: list[dict[str, object]] = []
    with Lab.create(workdir) as lab:
        lab.add_router("r")
        for host in (CLIENT_HOST, *NODE_HOSTS):
            lab.add_subnet(f"s-{host}", router="r", hosts=[host])
        lab.add_default_routes()
        peers = start_bootstrap(lab, NODE_HOSTS[0])
        started = [(host, *start_node(lab, host, f"node-{host}", span, peers, model=model,
                                      threads=threads))
                   for host, span in zip(NODE_HOSTS, spans)]
        nodes = [wait_node(lab, host, f"node-{host}", proc, data_dir)
                 for host, proc, data_dir in started]
        transports = {str(n.info["endpoint"]).split("://", 1)[0] for n in nodes}
        say(f"3 nodes serve {', '.join(spans)} on {', '.join(NODE_HOSTS)}; logs in {workdir}")
        clients: dict[str, RemoteClient] = {}
        tokens: set[tuple[int, ...]] = set()  # every generation's tokens
        try:
            for mode in modes:  # push forced on or off: ClientConfig.push
                clients[mode] = RemoteClient(lab, CLIENT_HOST, peers, {"push": mode == "push"})
            measured: dict[float, float] = {}
            for rtt in rtts_ms:  # the delay line's accuracy, next to each figure
                lab.set_delay("r", rtt)
                measured[rtt] = tcp_rtt_ms(lab, CLIENT_HOST, NODE_HOSTS[0], samples=20)["p50"]
            for client in clients.values():  # warm-up: route, sessions
                client.generate(PROMPT, max_new_tokens, model=model)
            results: dict[tuple[float, str], list[dict[str, object]]] = {
                (rtt, mode): [] for rtt in rtts_ms for mode in modes}
            for round_ in range(runs):  # interleaved: a shared machine's drift hits all alike
                for rtt in rtts_ms:
                    lab.set_delay("r", rtt)
                    for mode, client in clients.items():
                        result = client.generate(PROMPT, max_new_tokens, model=model)
                        if result["event"] != "result":
                            raise LabError(f"generation at {rtt:g} ms ({mode}) failed: {result}")
                        results[rtt, mode].append(result)
                        tokens.add(tuple(result["token_ids"]))  # type: ignore[arg-type]
                        say(f"round {round_ + 1}/{runs}, rtt {rtt:g} ms, {mode}: "
                            f"{float(result['tokens_per_s']):.2f} tokens/s")  # type: ignore[arg-type]
            for rtt in rtts_ms:
                for mode in modes:
                    runs_at = results[rtt, mode]
                    tps = statistics.median(float(r["tokens_per_s"])  # type: ignore[arg-type]
                                            for r in runs_at)
                    points.append({
                        "rtt_ms": rtt,
                        "mode": mode,
                        "tokens_per_s": round(tps, 3),
                        "ttft_s": round(statistics.median(
                            float(r["ttft_s"]) for r in runs_at), 3),  # type: ignore[arg-type]
                        "ms_per_token": round(1000.0 / tps, 1) if tps > 0 else None,
                        "measured_rtt_ms": round(measured[rtt], 2),
                    })
        finally:
            for client in clients.values():
                client.close()
    return {"points": points, "hops": len(NODE_HOSTS), "transport": ",".join(sorted(transports)),
            "model": spec.name,
            "max_new_tokens": max_new_tokens, "runs": runs, "modes": list(modes),
            "identical": len(tokens) == 1}

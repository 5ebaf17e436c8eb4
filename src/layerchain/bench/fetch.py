"""``layerchain bench fetch``: how fast a span's files come from peers (issue 20.3).

A local swarm of ``seeders`` nodes, each serving (and so seeding) the blocks ``blocks``, is
started (``layerchain.local``); then this process fetches the block files of ``blocks`` (10 blocks of
SmolLM2 by default: about 142 MB of float32 safetensors) into a fresh directory with
``layerchain.fetch`` over the nodes' TLS links, once from one peer and once from all of
them (``FetchConfig.max_peers``). Every file is verified against the manifest, as always.

Figures per run: ``bytes`` received, ``seconds`` (the whole fetch: DHT read, manifests,
files, hashing), ``mb_per_s`` (10^6 bytes per second) and ``peers`` (those that delivered
files). The top level is the run from the most peers; ``runs`` lists every run. Loopback on
one machine: the seeders, their TLS and hashing share its cores with the fetcher, and each
seeder sends at most ``NodeConfig.seed_connection_mbps`` per connection.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from layerchain.fetch import FetchConfig, fetch_from_swarm
from layerchain.local.launcher import swarm_down, swarm_up
from layerchain.model import resolve_model
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import Span

DEFAULT_BLOCKS = Span(10, 20)


def run_fetch_bench(model: str = DEFAULT_MODEL, blocks: Span = DEFAULT_BLOCKS,
                    seeders: int = 3, peer_counts: tuple[int, ...] = (1, 3)) -> dict[str, Any]:
    """Start the seeders, fetch ``blocks`` once per entry of ``peer_counts``; the figures."""
    spec = resolve_model(model)
    blocks.check_within(spec.num_blocks)
    with tempfile.TemporaryDirectory(prefix="layerchain-bench-fetch-") as tmp:
        state = Path(tmp) / "swarm"
        swarm = swarm_up(state, [blocks] * seeders, model=model, timeout_s=600.0)
        try:
            runs = []
            for count in peer_counts:
                report = asyncio.run(fetch_from_swarm(
                    swarm.initial_peers, spec.weights_id, Path(tmp) / f"fetch-{count}",
                    blocks=blocks, config=FetchConfig(max_peers=count)))
                runs.append({"bytes": report.bytes, "seconds": round(report.seconds, 3),
                             "mb_per_s": round(report.mb_per_s, 1),
                             "peers": len(report.peers)})
        finally:
            swarm_down(state, quiet=True)
    return {**runs[-1], "blocks": str(blocks), "model_id": spec.weights_id, "runs": runs}

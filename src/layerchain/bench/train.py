"""Benchmark: fine-tuning through a local swarm vs the same in one process (issue 18).

``run_train_bench`` trains the same adapter (the same seed, data and steps, so the same
losses) twice: with every block in this process (``LocalBlocks``) and through ``nodes``
node processes on loopback splitting the blocks evenly (``RemoteBlocks``: each step's
forward and backward cross every hop). It reports fine-tuning tokens/s both ways and their
ratio, and where the swarm's time goes: waiting on hops (the peers' compute and the wire)
vs the client (embeddings, head, loss, optimizer). ``dp_speedup_2_peers`` is
``train.dp.measure_dp_speedup(2)`` (None when ``dp`` is off or it fails, with the reason).

On one machine the nodes share its cores and run one after the other (a pipeline without
overlap), so the swarm cannot beat one process here; the figure says what the protocol
costs. Seed 003's ~1.5x for model parallelism assumes nodes on separate machines.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import Span

log = logging.getLogger(__name__)

TASK = Path(__file__).parents[3] / "examples" / "finetune" / "pirate.jsonl"


def even_spans(num_blocks: int, nodes: int) -> list[Span]:
    """``nodes`` consecutive spans covering ``[0, num_blocks)``, sizes differing by <= 1."""
    edges = [round(i * num_blocks / nodes) for i in range(nodes + 1)]
    return [Span(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def run_train_bench(model: str = DEFAULT_MODEL, nodes: int = 3, steps: int = 3,
                    method: str = "prompt", batch_size: int = 2, data: Path | None = None,
                    dp: bool = True, on_progress: Callable[[str], None] | None = None
                    ) -> dict[str, Any]:
    """The figures (module docstring); ``on_progress`` gets a line per phase (the
    fine-tuning figures before the data-parallel measurement, which takes minutes)."""
    from layerchain.client import Swarm
    from layerchain.local import swarm_down, swarm_up
    from layerchain.model import load_head, load_span, resolve_model
    from layerchain.model.light_tokenizer import load_client_tokenizer
    from layerchain.train.data import encode, read_records
    from layerchain.train.finetune import FinetuneConfig, LocalBlocks, Trainer, train
    from layerchain.train.remote import RemoteBlocks

    spec = resolve_model(model)
    tokenizer = load_client_tokenizer(spec)
    examples = [encode(r, tokenizer) for r in read_records(data or TASK)]
    config = FinetuneConfig(method=method, steps=steps + 1, batch_size=batch_size)

    def rate(stats: list[Any]) -> float:  # the first step warms up (allocations, connections)
        timed = stats[1:]
        return sum(s.tokens for s in timed) / max(1e-9, sum(s.seconds for s in timed))

    span = load_span(spec, 0, spec.num_blocks)
    local_stats = train(Trainer(spec, load_head(spec), config, tokenizer=tokenizer), examples,
                        LocalBlocks(span))
    del span
    state = Path(tempfile.mkdtemp(prefix="layerchain-train-bench-"))
    try:
        local = swarm_up(state, even_spans(spec.num_blocks, nodes), model=model, insecure=True)
        with Swarm(local.initial_peers, model=model, insecure=True, audit_rate=0.0) as client:
            core = client.core
            blocks = RemoteBlocks(core, client.run)
            swarm_stats = train(Trainer(core.spec, core.head, config, tokenizer=core.tokenizer),
                                examples, blocks)
    finally:
        swarm_down(state, quiet=True)
    swarm_tps, local_tps = rate(swarm_stats), rate(local_stats)
    seconds = sum(s.seconds for s in swarm_stats)
    result: dict[str, Any] = {
        "finetune_tokens_per_s": round(swarm_tps, 2),
        "finetune_local_tokens_per_s": round(local_tps, 2),
        "ratio": round(swarm_tps / local_tps, 3) if local_tps else None,
        "dp_speedup_2_peers": None,
        "method": method, "nodes": nodes, "steps": steps, "batch_size": batch_size,
        "tokens_per_step": round(sum(s.tokens for s in swarm_stats) / len(swarm_stats), 1),
        # where the swarm's time goes: waiting on hops vs the client's own work
        "swarm_hop_share": round(blocks.hop_seconds / seconds, 3) if seconds else None,
        "swarm_client_s_per_step": round((seconds - blocks.hop_seconds) / len(swarm_stats), 3),
        "swarm_hop_s_per_step": round(blocks.hop_seconds / len(swarm_stats), 3),
        # the same math both ways: the losses agree to float rounding
        "max_loss_difference": round(max(abs(a.loss - b.loss)
                                         for a, b in zip(local_stats, swarm_stats, strict=True)), 6),
    }
    if on_progress is not None:
        on_progress(f"fine-tuning: {result}")
    if dp:
        try:
            from layerchain.train.dp import measure_dp_speedup

            result["dp_speedup_2_peers"] = round(measure_dp_speedup(peers=2), 3)
        except Exception as error:  # noqa: BLE001 - the fine-tuning figures stand on their own
            log.warning("dp_speedup_2_peers not measured: %s", error)
            result["dp_error"] = str(error)[:200]
    return result

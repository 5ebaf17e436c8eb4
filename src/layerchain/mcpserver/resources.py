"""What the MCP server's resources show: pure functions from snapshots to JSON.

* ``llm://models``: ``models_json`` - the models the swarm's catalog lists (``layerchain
  models --json``'s rows), plus any model this server has a client open for that the
  catalog does not list (nodes of older versions announce no catalog entry), each with
  ``"open"``: whether this server runs inference on it now.
* ``llm://nodes``: ``nodes_json`` - the peers serving each open model (``SwarmState``).
* ``training://jobs``, ``training://checkpoints``, ``training://metrics``: from the job
  records (``train.jobs.JobRecord``) the training processes write.
* ``training://data_shards``: the assignments ``llm_data_shard`` made, and the shard
  strategy of each data-parallel job.
* ``llm://performance`` is ``swarms.PerformanceLog.to_json``.

Nothing here does I/O: ``server.py`` reads the swarm and the job store and passes the
snapshots in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from layerchain.client.state import SwarmState
from layerchain.discovery.catalog import ModelEntry
from layerchain.mcpserver.requests import ShardAssignment
from layerchain.train.jobs import JobRecord

RECENT_LOSSES = 20  # losses a job row of training://jobs shows (training://metrics: all kept)
SHARD_FACTS = ("run_id", "strategy", "target_batch_size", "parallelism")  # what a dp job's
# record says of its sharding (train.dp)


def capacity_tokens_per_s(state: SwarmState) -> float:
    """The swarm's capacity for the model, tokens/s: a server announcing ``c`` ms per block
    over ``n`` blocks adds ``1000 / (c * n)`` to each block of its span; the model's is its
    least-served block's (``discovery.catalog.coverage``'s rule, from the client's view)."""
    capacity = [0.0] * state.num_blocks
    for node in state.nodes:
        end = min(node.end, state.num_blocks)
        if node.start < end and node.ms_per_block > 0:
            adds = 1000.0 / (node.ms_per_block * (node.end - node.start))
            for block in range(node.start, end):
                capacity[block] += adds
    return min(capacity) if capacity else 0.0


def open_model_json(spec: Any, state: SwarmState) -> dict[str, Any]:
    """A model this server has a client for, as a catalog row (CONTRACTS C's fields)."""
    return {
        "model_id": spec.model_id, "name": spec.name, "family": spec.family,
        "num_blocks": spec.num_blocks, "hidden_size": spec.hidden_size, "dtype": spec.dtype,
        "servers": len(state.nodes),
        "blocks_served": sum(1 for n in state.coverage if n),
        "replicas": list(state.coverage),
        "throughput_tokens_per_s": round(capacity_tokens_per_s(state), 3),
    }


def models_json(catalog: Sequence[ModelEntry], open_models: Iterable[tuple[Any, SwarmState]]
                ) -> dict[str, Any]:
    """``llm://models``: the catalog's rows, then the open models it does not list."""
    open_rows = {spec.model_id: open_model_json(spec, state) for spec, state in open_models}
    rows = [{**entry.to_json(), "open": entry.model_id in open_rows} for entry in catalog]
    listed = {entry.model_id for entry in catalog}
    rows += [{**row, "open": True} for model_id, row in open_rows.items() if model_id not in listed]
    return {"models": rows}


def nodes_json(models: Iterable[tuple[str, SwarmState]]) -> dict[str, Any]:
    """``llm://nodes``: (model name, state) of each open model -> one row per peer: id,
    span, price, speed, load (as announced), free cache, measured RTT, banned."""
    rows = []
    for name, state in models:
        for n in state.nodes:
            load = None if n.load is None else {
                "sessions": n.load.sessions, "queued_steps": round(n.load.queued_steps, 3),
                "step_ms": round(n.load.step_ms, 3)}
            rows.append({
                "peer_id": n.peer_id, "model": name, "model_id": state.model_id,
                "span": [n.start, n.end], "blocks": n.end - n.start,
                "endpoint": n.endpoint,
                "price_per_block": n.price_per_block,  # credits per block per token
                "ms_per_block": round(n.ms_per_block, 3),  # ms per block per token, announced
                "load": load, "free_cache_tokens": n.free_cache_tokens,
                "rtt_ms": None if n.rtt_ms is None else round(n.rtt_ms, 2),
                "banned": n.banned, "version": n.version,
            })
    return {"nodes": rows}


def job_json(record: JobRecord) -> dict[str, Any]:
    """A job as ``training://jobs`` lists it: its record, the losses cut to the last few."""
    row = record.to_json()
    row["losses"] = row["losses"][-RECENT_LOSSES:]
    row["loss_first"] = record.losses[0] if record.losses else None
    return row


def jobs_json(records: Sequence[JobRecord]) -> dict[str, Any]:
    return {"jobs": [job_json(r) for r in records]}


def checkpoints_json(records: Sequence[JobRecord]) -> dict[str, Any]:
    """``training://checkpoints``: every job's saved states, newest last, and its output."""
    return {"checkpoints": [
        {"job_id": r.job_id, "kind": r.kind, "status": r.status, "step": r.step, "out": r.out,
         "checkpoints": list(r.checkpoints), "latest": r.checkpoints[-1] if r.checkpoints else None}
        for r in records if r.checkpoints or r.out
    ]}


def figures(record: JobRecord) -> dict[str, float]:
    """The numbers a job reports beside its loss (``extra``: tokens/s, samples/s ...)."""
    return {k: v for k, v in record.extra.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def metrics_json(records: Sequence[JobRecord]) -> dict[str, Any]:
    """``training://metrics``: per job, its step, loss curve (as kept) and reported figures."""
    return {"metrics": [
        {"job_id": r.job_id, "kind": r.kind, "status": r.status, "step": r.step,
         "loss": r.loss, "loss_first": r.losses[0] if r.losses else None,
         "losses": list(r.losses), "peers": len(r.peers), "figures": figures(r),
         "updated": r.updated}
        for r in records
    ]}


def data_shards_json(assignments: Sequence[ShardAssignment], records: Sequence[JobRecord]
                     ) -> dict[str, Any]:
    """``training://data_shards``: the recent ``llm_data_shard`` assignments (sizes, not
    indices) and the sharding of data-parallel jobs, as their records say."""
    jobs: list[dict[str, Any]] = []
    for r in records:
        if r.kind in ("dp", "federated"):
            row: dict[str, Any] = {"job_id": r.job_id, "kind": r.kind, "status": r.status,
                                   "peers": list(r.peers)}
            for key in SHARD_FACTS:
                if key in r.extra:
                    row[key] = r.extra[key]
            jobs.append(row)
    return {"assignments": [a.to_json(with_indices=False) for a in assignments], "jobs": jobs}

"""CLI commands ``layerchain train dp`` (data-parallel / federated training over the swarm's
DHT, ``train.dp``) and ``layerchain train status`` (the job records, ``train.jobs``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from layerchain.cli.generate import InitialPeersOpt, ModelOpt
from layerchain.errors import ConfigError
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.train.dp import PARALLELISMS, DPConfig
from layerchain.train.jobs import JobRecord, JobStore
from layerchain.train.sharding import STRATEGIES, parse_shard

_D = DPConfig(data=Path("-"), initial_peers=())  # the defaults, once

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def dp(
    data: Annotated[Path, typer.Option("--data", help="JSONL training data (text or chat).")],
    initial_peers: InitialPeersOpt = None,
    shard_strategy: Annotated[str, typer.Option(
        "--shard-strategy", help=f"How samples go to peers: {', '.join(STRATEGIES)}.")
    ] = _D.shard_strategy,
    target_batch_size: Annotated[int, typer.Option(
        "--target-batch-size", help="Samples of all peers together per optimizer step.")
    ] = _D.target_batch_size,
    model: ModelOpt = DEFAULT_MODEL,
    steps: Annotated[int, typer.Option(
        "--steps", help="data: the run's optimizer steps; federated: this peer's local steps.")
    ] = _D.steps,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(
        "--checkpoint-dir", help="Checkpoints shared by the run's peers "
        "(default $LAYERCHAIN_HOME/train/checkpoints).")] = None,
    run_id: Annotated[str, typer.Option(
        "--run-id", help="Peers with the same run id train together.")] = _D.run_id,
    parallelism: Annotated[str, typer.Option(
        "--parallelism", help=f"{' or '.join(PARALLELISMS)}: average gradients every step, "
        "or parameters every --average-every local steps.")] = _D.parallelism,
    average_every: Annotated[int, typer.Option(
        "--average-every", help="federated: local steps between averaging rounds.")
    ] = _D.average_every,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", help="This peer's shard I/N (0-based); default: the next index among the "
        "run's peers on the DHT.")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Samples per local step.")] = _D.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate.")] = _D.lr,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", help="Tokens per example (longer ones are cut).")] = _D.max_tokens,
    seed: Annotated[int, typer.Option("--seed", help="Shard and batch-order seed.")] = _D.seed,
    checkpoint_every: Annotated[int, typer.Option(
        "--checkpoint-every", help="Optimizer steps between checkpoints.")] = _D.checkpoint_every,
    min_peers: Annotated[int, typer.Option(
        "--min-peers", help="Wait until this many peers joined the run before training.")
    ] = _D.min_peers,
    matchmaking_time: Annotated[float, typer.Option(
        "--matchmaking-time", help="Seconds a round waits for peers to join its group.")
    ] = _D.matchmaking_time_s,
    json_out: JsonOpt = False,
) -> None:
    """Train a model that fits this machine together with other peers: each trains on its
    shard of --data and they average through hivemind's Optimizer over the swarm's DHT."""
    if not initial_peers:
        raise ConfigError("train dp needs the swarm's DHT",
                          hint="pass --initial-peers ADDR (printed by a node or `swarm up`)")
    config = DPConfig(
        data=data, initial_peers=tuple(initial_peers), model=model,
        shard_strategy=shard_strategy, shard=parse_shard(shard) if shard else None,
        target_batch_size=target_batch_size, batch_size=batch_size, steps=steps, lr=lr,
        parallelism=parallelism, average_every=average_every, run_id=run_id,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        max_tokens=max_tokens, seed=seed, matchmaking_time_s=matchmaking_time,
        min_peers=min_peers,
    )
    from layerchain.train.dp import run_peer

    result = run_peer(config)
    if json_out:
        typer.echo(json.dumps(result.to_json()))
        return
    typer.echo(
        f"job {result.job_id}: {result.steps} steps (from {result.start_epoch}), shard "
        f"{result.shard[0]}/{result.shard[1]}, loss {result.loss_first:.4f} -> "
        f"{result.loss_last:.4f}, {result.samples_per_s:.2f} samples/s, "
        f"{len(result.peers)} peers\ncheckpoint {result.checkpoint}"
    )


def status(json_out: JsonOpt = False) -> None:
    """List training jobs (this machine's job records): kind, status, step, loss, peers and
    checkpoints."""
    records = JobStore().list()
    if json_out:
        typer.echo(json.dumps({"jobs": [r.to_json() for r in records]}))
        return
    if not records:
        typer.echo("no training jobs")
        return
    typer.echo(f"{'JOB':<14}{'KIND':<11}{'STATUS':<9}{'STEP':>6}{'LOSS':>10}{'PEERS':>7}  "
               "UPDATED   CHECKPOINT")
    for record in records:
        typer.echo(_row(record))
        if record.error:
            typer.echo(f"{'':<14}error: {record.error}")


def _row(record: JobRecord) -> str:
    loss = record.loss
    loss_text = "-" if loss is None or math.isnan(loss) else f"{loss:.4f}"
    updated = time.strftime("%H:%M:%S", time.localtime(record.updated))
    checkpoint = record.checkpoints[-1] if record.checkpoints else "-"
    return (f"{record.job_id:<14}{record.kind:<11}{record.status:<9}{record.step:>6}"
            f"{loss_text:>10}{len(record.peers):>7}  {updated:<9} {checkpoint}")


def register(app: typer.Typer) -> None:
    """Adds ``dp`` and ``status`` to the ``train`` sub-app."""
    app.command("dp")(dp)
    app.command("status")(status)

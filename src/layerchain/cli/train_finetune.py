"""CLI command ``layerchain train finetune``: fine-tune an adapter through the swarm.

The client joins the swarm as for ``generate``, trains a prompt-tuning prefix or a LoRA
head (``train.finetune``) with the blocks' forward and backward computed by the peers
(``train.remote``; paid like inference when ``--ledger`` is given), and writes ``--out``:
``adapter.json`` + ``adapter.safetensors`` (``generate --adapter DIR``, ``Swarm(...,
adapter=DIR)``) and ``loss.png``. The run is a ``finetune`` job record (``train status``).
``--json`` prints ``{"steps", "loss_first", "loss_last", "tokens_per_s", "out"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from layerchain.cli.generate import (
    ContractOpt,
    DataDirOpt,
    DEFAULT_DATA_DIR,
    DepositOpt,
    InitialPeersOpt,
    InsecureOpt,
    LedgerOpt,
    ModelOpt,
    payment_options,
)
from layerchain.errors import ConfigError, LayerchainError
from layerchain.model.spec import DEFAULT_MODEL

# the defaults of train.finetune.FinetuneConfig (not imported here: it loads torch)
DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_VIRTUAL, DEFAULT_RANK, DEFAULT_MAX_TOKENS = 20, 4, 8, 8, 128


def finetune(
    data: Annotated[Path, typer.Option("--data", help="JSONL training data: one "
                                       '{"text": ...} or {"messages": [...]} per line.')],
    out: Annotated[Path, typer.Option("--out", help="Directory the adapter and loss.png "
                                      "are written to.")],
    initial_peers: InitialPeersOpt = None,
    method: Annotated[str, typer.Option(
        "--method", metavar="prompt|lora",
        help="prompt: train a prefix of virtual tokens (backward crosses every hop); "
        "lora: a low-rank update of the LM head (forward only on the peers).")] = "prompt",
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = DEFAULT_STEPS,
    json_out: Annotated[bool, typer.Option("--json", help='Print one JSON object {"steps", '
                                           '"loss_first", "loss_last", "tokens_per_s", '
                                           '"out"}.')] = False,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", help="Adam's learning rate (default: 0.03 for prompt, 0.01 for lora).")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Examples per optimizer step.")] = DEFAULT_BATCH,
    virtual_tokens: Annotated[int, typer.Option(
        "--virtual-tokens", help="Prefix length (--method prompt).")] = DEFAULT_VIRTUAL,
    lora_rank: Annotated[int, typer.Option(
        "--lora-rank", help="LoRA rank (--method lora).")] = DEFAULT_RANK,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", help="Tokens an example keeps (its start).")] = DEFAULT_MAX_TOKENS,
    seed: Annotated[int, typer.Option("--seed", help="Data order and initialisation.")] = 0,
    insecure: InsecureOpt = False,
    ledger: LedgerOpt = None,
    contract: ContractOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    deposit: DepositOpt = None,
) -> None:
    """Fine-tune an adapter (prompt tuning or LoRA) through the swarm's frozen blocks."""
    from layerchain.train.data import encode, read_records
    from layerchain.train.finetune import FinetuneConfig, Trainer, train, write_outputs
    from layerchain.train.jobs import JobStore
    from layerchain.train.remote import RemoteBlocks

    config = FinetuneConfig(method=method, steps=steps, lr=lr, batch_size=batch_size,
                            virtual_tokens=virtual_tokens, lora_rank=lora_rank,
                            max_tokens=max_tokens, seed=seed)
    records = read_records(data)  # ConfigError naming a bad line, before joining anything
    if not initial_peers:
        raise ConfigError("train finetune needs --initial-peers",
                          hint="start a swarm with `layerchain swarm up`")
    from layerchain.client import Swarm

    store = JobStore()
    job = store.create("finetune", out=str(out), extra={
        "method": method, "model": model, "data": str(data), "steps_planned": steps})
    try:
        with Swarm(initial_peers, model=model, insecure=insecure, audit_rate=0.0,
                   **payment_options(data_dir, ledger, deposit, contract)) as swarm:
            core = swarm.core
            examples = [encode(r, core.tokenizer, config.max_tokens) for r in records]
            trainer = Trainer(core.spec, core.head, config, tokenizer=core.tokenizer)
            blocks = RemoteBlocks(core, swarm.run)

            def on_step(step: int, stats: object) -> None:
                store.update(job.job_id, loss=getattr(stats, "loss"), peers=sorted(blocks.peers))
                if not json_out:
                    typer.echo(f"step {step + 1}/{steps}: loss {getattr(stats, 'loss'):.4f}",
                               err=True)

            stats = train(trainer, examples, blocks, on_step)
            result = write_outputs(trainer, stats, out)
    except (LayerchainError, KeyboardInterrupt) as error:
        store.update(job.job_id, status="failed", error=str(error) or type(error).__name__)
        raise
    store.update(job.job_id, status="done", checkpoint=str(out), extra={
        "tokens_per_s": round(result.tokens_per_s, 2), "recoveries": blocks.recoveries,
        "cost": blocks.cost})
    if json_out:
        typer.echo(json.dumps(result.to_json()))
    else:
        typer.echo(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {len(stats)} "
                   f"steps, {result.tokens_per_s:.1f} tokens/s; adapter in {out} "
                   f"(generate --adapter {out}), curve in {out / 'loss.png'}")


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the ``train`` sub-app."""
    app.command("finetune")(finetune)

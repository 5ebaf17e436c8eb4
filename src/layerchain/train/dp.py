"""Data-parallel and federated training of a model that fits one node, over the swarm's DHT.

Each peer (one process: ``layerchain train dp``) holds the whole model, trains on its shard of
the data (``train.sharding``) and averages with the others through ``hivemind.Optimizer`` on
the swarm's own DHT (``train.dp_dht.SharedDHT`` over a ``HivemindDiscovery`` joined through
``--initial-peers``); peers of one run share ``run_id``. Anchors: hivemind's ``Optimizer``
(collaborative training over a DHT), DiLoCo / federated averaging.

* ``data`` parallelism: every local batch's gradients accumulate until the peers together
  have ``target_batch_size`` samples (hivemind's *epoch*); then one all-reduce of gradients
  and one identical optimizer step on every peer. ``steps`` counts these global steps: a peer
  trains until the run reaches epoch ``steps``, whenever it joined.
* ``federated``: each peer applies its own optimizer step after every local batch and the
  peers average parameters (and optimizer statistics) every ``average_every`` local steps:
  hivemind's ``use_local_updates`` with an epoch of ``average_every x batch_size x N``
  samples, N the planned number of shards. hivemind counts the run's samples from progress
  reports refreshed every 0.2-0.5 s, so a round is K local steps per peer only while steps
  are slower than that and peers run at one speed; fast steps overshoot (measured with a
  tiny model: K=2 became 4). ``steps`` counts this peer's local steps.

Which shard a peer trains on: ``shard=(I, N)`` (``--shard I/N``) for a planned run; without
it, from the run's roster on the DHT: each peer stores its join time under the run's roster
key (sub-keyed by its peer id, refreshed every step), waits until ``min_peers`` peers are
there (``--min-peers``), and takes its rank by join time among them (``shard_from_roster``).
A peer joining later takes the next index of a larger ``N`` while the others keep theirs, so
some samples are then seen by two peers (training stays correct, only less even).

Joining and leaving: a peer that joins late first loads the latest checkpoint of the run
(below), then hivemind brings it up to the run's current state from a live peer
(``load_state_from_peers``) if the run is further; averaging rounds whose partner left time
out (``averaging_timeout_s``) and the step proceeds with the gradients at hand.

Checkpoints: a peer saves ``{checkpoint_dir}/{run_id}/step-{EPOCH:06d}-{PEER}.pt`` (model
state dict, optimizer state dict with hivemind's epoch, local step, model id) every
``checkpoint_every`` epochs and at the end, written atomically, keeping only its newest file.
The checkpoint directory is shared by the peers of a run (a shared disk, or a copy: a new
peer only needs the newest file); ``latest_checkpoint`` is the file with the highest epoch.

At the end of a data-parallel run, every peer reports done on the DHT, waits (at most
``averaging_timeout_s``) for the others of the roster, and joins one last blocking state
averaging round: a round that failed during the run (a late partner, a loaded machine)
would otherwise leave the peers a step apart.

Every run writes a ``train.jobs`` record (kind "dp" or "federated": one loss per global
step, peers, checkpoints). ``measure_dp_speedup`` (``train.dp_bench``) is ``bench train``'s
figure.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerchain.errors import ConfigError, LayerchainError, PeerTimeout
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.train.data import IGNORE_INDEX, Example, encode, read_records, record_key
from layerchain.train.jobs import JobStore, jobs_home
from layerchain.train.dp_bench import measure_dp_speedup
from layerchain.train.sharding import STRATEGIES, assign, check_shards

__all__ = ["DPConfig", "DPResult", "measure_dp_speedup", "run_peer"]

if TYPE_CHECKING:
    import torch

    from layerchain.model.spec import ModelSpec
    from layerchain.train.dp_dht import SharedDHT

PARALLELISMS = ("data", "federated")
CHECKPOINT_RE = re.compile(r"^step-(\d{6,})-([A-Za-z0-9]+)\.pt$")


@dataclass(frozen=True)
class DPConfig:
    """One peer of a data-parallel (or federated) run. Every field is a ``train dp`` flag."""

    data: Path  # JSONL training data (train.data); each peer reads its shard of it
    initial_peers: tuple[str, ...]  # multiaddrs of the swarm's DHT
    model: str = DEFAULT_MODEL  # a model reference (resolve_model): name, .gguf, HF or shard dir
    shard_strategy: str = "round_robin"  # train.sharding.STRATEGIES
    shard: tuple[int, int] | None = None  # (I, N): this peer's shard; None: from the DHT
    target_batch_size: int = 32  # samples, summed over peers, per global optimizer step
    batch_size: int = 4  # samples per local forward/backward
    steps: int = 10  # data: the run's global steps; federated: this peer's local steps
    lr: float = 1e-4  # AdamW learning rate
    parallelism: str = "data"  # PARALLELISMS
    average_every: int = 4  # federated: local steps between parameter averaging rounds
    run_id: str = "layerchain-dp"  # peers with the same run id train together
    checkpoint_dir: Path | None = None  # None: $LAYERCHAIN_HOME/train/checkpoints
    checkpoint_every: int = 1  # global steps (epochs) between checkpoints
    max_tokens: int = 64  # tokens per example (longer ones are cut)
    seed: int = 0  # the shard seed (random, hash strategies) and the batch order
    matchmaking_time_s: float = 2.0  # how long a round waits for peers to join its group
    averaging_timeout_s: float = 20.0  # an all-reduce still running after this is abandoned
    host: str = "127.0.0.1"  # where this peer's DHT listens
    min_peers: int = 1  # wait (up to wait_peers_s) until this many peers joined the run
    wait_peers_s: float = 120.0  # give up waiting for min_peers after this many seconds

    def __post_init__(self) -> None:
        if self.parallelism not in PARALLELISMS:
            raise ConfigError(f"unknown parallelism {self.parallelism!r}",
                              hint=f"use one of {', '.join(PARALLELISMS)}")
        if self.shard_strategy not in STRATEGIES:
            raise ConfigError(f"unknown shard strategy {self.shard_strategy!r}",
                              hint=f"use one of {', '.join(STRATEGIES)}")
        for name in ("target_batch_size", "batch_size", "steps", "average_every",
                     "checkpoint_every", "max_tokens", "min_peers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.batch_size > self.target_batch_size:
            raise ConfigError("--batch-size is larger than --target-batch-size",
                              hint="the target is the samples of all peers per optimizer step")
        if not self.lr > 0:
            raise ConfigError("--lr must be positive")
        if self.shard is not None:
            check_shards(self.shard[1])
            if not 0 <= self.shard[0] < self.shard[1]:
                raise ConfigError(f"shard index {self.shard[0]} is outside 0..{self.shard[1] - 1}")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.run_id):
            raise ConfigError(f"bad run id {self.run_id!r}: use letters, digits, - and _")

    @property
    def kind(self) -> str:
        """The job kind this run records."""
        return "dp" if self.parallelism == "data" else "federated"

    @property
    def checkpoints(self) -> Path:
        """This run's checkpoint directory."""
        root = self.checkpoint_dir or jobs_home().parent / "checkpoints"
        return root / self.run_id


@dataclass(frozen=True)
class DPResult:
    """What one peer's run did (``to_json`` is ``train dp --json``'s output)."""

    steps: int  # data: global steps (epochs) the run reached; federated: local steps
    local_steps: int  # forward/backward passes this peer made
    loss_first: float  # this peer's first batch loss
    loss_last: float  # mean loss of this peer's batches in the run's last global step
    samples_per_s: float  # this peer's samples per second of training (start-up excluded)
    peers: tuple[str, ...]  # peer ids seen in the run (this one first)
    checkpoint: str  # this peer's newest checkpoint
    job_id: str
    start_epoch: int = 0  # the epoch this peer started from (a checkpoint's, or 0)
    resumed_from: str = ""  # the checkpoint it loaded, if any
    shard: tuple[int, int] = (0, 1)
    samples: int = 0  # samples in this peer's shard
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "local_steps": self.local_steps,
            "loss_first": self.loss_first, "loss_last": self.loss_last,
            "samples_per_s": self.samples_per_s, "peers": list(self.peers),
            "checkpoint": self.checkpoint, "job_id": self.job_id,
            "start_epoch": self.start_epoch, "resumed_from": self.resumed_from,
            "shard": f"{self.shard[0]}/{self.shard[1]}", "samples": self.samples,
        }


# ---- pure helpers ----


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest epoch in ``directory`` (ties: the newest file)."""
    best: tuple[int, float, Path] | None = None
    for path in directory.glob("step-*.pt") if directory.is_dir() else ():
        match = CHECKPOINT_RE.match(path.name)
        if match is None:
            continue
        try:
            key = (int(match.group(1)), path.stat().st_mtime, path)
        except OSError:  # another peer replaced it meanwhile
            continue
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def shard_from_roster(roster: Mapping[str, float], me: str, min_peers: int = 1
                      ) -> tuple[int, int]:
    """This peer's shard ``(I, N)`` from the run's roster (peer id -> join time): ``I`` its
    rank by (join time, peer id), ``N`` the roster's size (at least ``min_peers`` and ``I + 1``).

    Peers that read the same roster agree; a peer joining later takes the next index with
    a larger ``N`` while the others keep theirs (their shards may then overlap)."""
    if me not in roster:
        raise ValueError("this peer is not in the roster")
    ranked = sorted(roster, key=lambda peer: (roster[peer], peer))
    index = ranked.index(me)
    return index, max(len(ranked), min_peers, index + 1)


def checkpoint_name(epoch: int, peer: str) -> str:
    """``step-{epoch:06d}-{last 8 chars of the peer id}.pt``."""
    return f"step-{epoch:06d}-{peer[-8:]}.pt"


def batches(num_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of example indices: a seeded shuffle per pass, cut into batches."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(num_examples))
            rng.shuffle(fresh)
            order.extend(fresh)
        yield order[:batch_size]
        del order[:batch_size]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` ([B, T] int64 each)."""
    import torch

    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- the model ----


def load_trainable(spec: ModelSpec) -> torch.nn.Module:
    """The whole model of ``spec`` as a trainable fp32 transformers ``CausalLM`` (weights from
    its source: GGUF, HF directory or shard directory); ConfigError if some are missing."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(spec.config, dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}
    names = list(model.state_dict())
    for index in range(spec.num_blocks):
        prefix = f"model.layers.{index}."
        block = [k[len(prefix):] for k in names if k.startswith(prefix)]
        for name, tensor in spec.source.block_state(index, block).items():
            state[prefix + name] = tensor
    for name, tensor in spec.source.head_state().items():
        state[name if name == "lm_head.weight" else f"model.{name}"] = tensor
    missing, _unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(spec.config, "tie_word_embeddings", False))
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing:
        raise ConfigError(f"model {spec.name} lacks weights for {', '.join(missing[:3])}")
    model.train()
    return model


# ---- one peer's run ----


def run_peer(config: DPConfig, jobs: JobStore | None = None) -> DPResult:
    """Train as one peer of ``config.run_id`` until the run reaches its last step.

    Blocking; must run on the process's main thread (hivemind's averager sets a signal
    handler). Joins the DHT, writes and updates the job record (status "failed" with the
    error's line if the run fails), leaves the DHT at the end.
    """
    from layerchain.discovery.dht import HivemindDiscovery
    from layerchain.model.resolve import resolve_model
    from layerchain.model.tokenizer import load_tokenizer
    from layerchain.train.dp_dht import SharedDHT

    records = read_records(config.data)
    spec = resolve_model(config.model)
    tokenizer = load_tokenizer(spec)
    model = load_trainable(spec)
    store = jobs or JobStore()
    discovery = asyncio.run(HivemindDiscovery.create(config.initial_peers, host=config.host))
    dht = None
    job = None
    try:
        dht = asyncio.run(SharedDHT.attach(discovery))
        me = str(dht.peer_id)
        job = store.create(config.kind, out=str(config.checkpoints), peers=[me], extra={
            "run_id": config.run_id, "model": spec.name, "model_id": spec.model_id,
            "strategy": config.shard_strategy, "parallelism": config.parallelism,
            "target_batch_size": config.target_batch_size,
        })
        result = _train(config, spec, model, tokenizer, records, dht, store, job.job_id, me)
        store.update(job.job_id, status="done", peers=result.peers,
                     extra={"samples_per_s": result.samples_per_s})
        return result
    except BaseException as error:
        if job is not None:
            line = str(error) if isinstance(error, LayerchainError) else repr(error)
            store.update(job.job_id, status="failed", error=line[:300])
        raise
    finally:
        if dht is not None:
            dht.shutdown()
        asyncio.run(discovery.close())


def _train(config: DPConfig, spec: ModelSpec, model: torch.nn.Module, tokenizer: Any,
           records: list[dict[str, Any]], dht: SharedDHT, store: JobStore, job_id: str, me: str
           ) -> DPResult:
    import hivemind
    import torch

    directory = config.checkpoints
    directory.mkdir(parents=True, exist_ok=True)
    resumed = latest_checkpoint(directory)
    saved: dict[str, Any] | None = None
    if resumed is not None:
        saved = torch.load(resumed, map_location="cpu", weights_only=True)
        if saved.get("model_id") != spec.model_id:
            raise ConfigError(f"checkpoint {resumed} is of another model",
                              hint="give this run its own --run-id or --checkpoint-dir")
        model.load_state_dict(saved["model"])
    num_shards = config.shard[1] if config.shard else 1
    federated = config.parallelism == "federated"
    target = (config.average_every * config.batch_size * num_shards if federated
              else config.target_batch_size)
    optimizer = hivemind.Optimizer(
        dht=dht, run_id=config.run_id, params=model.parameters(),
        optimizer=partial(torch.optim.AdamW, lr=config.lr),
        batch_size_per_step=config.batch_size, target_batch_size=target,
        use_local_updates=federated, matchmaking_time=config.matchmaking_time_s,
        averaging_timeout=config.averaging_timeout_s, average_state_every=1,
        load_state_timeout=max(30.0, config.averaging_timeout_s), verbose=False,
        # a matchmaking request must time out well within the matchmaking window
        averager_opts={"request_timeout": min(3.0, config.matchmaking_time_s * 0.75)},
        # peers learn the run's sample count from progress reports: refresh them often, so
        # fast local steps overshoot an epoch (federated: K steps) by less
        tracker_opts={"min_refresh_period": 0.2, "default_refresh_period": 0.5},
    )
    try:
        if saved is not None:
            optimizer.load_state_dict(saved["optimizer"])
        start_epoch = optimizer.local_epoch
        roster = _wait_for_peers(dht, config, me)
        joined = roster[me]
        shard = config.shard or shard_from_roster(roster, me, config.min_peers)
        indices = assign([record_key(r) for r in records], shard[1], config.shard_strategy,
                         seed=config.seed)[shard[0]]
        if not indices:
            raise ConfigError(f"shard {shard[0]}/{shard[1]} of {config.data} holds no records",
                              hint="use fewer shards or more data")
        examples = [encode(records[i], tokenizer, config.max_tokens) for i in indices]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        local_steps = 0

        def finished() -> bool:  # data: the run's global step; federated: our local steps
            return (local_steps >= config.steps if federated
                    else optimizer.local_epoch >= config.steps)
        peers: dict[str, None] = dict.fromkeys([me, *sorted(roster, key=roster.__getitem__)])
        losses: list[float] = []
        epoch_losses: list[float] = []
        last_mean = float("nan")
        checkpoint = ""
        order = batches(len(examples), config.batch_size, config.seed + shard[0])
        started = time.perf_counter()
        while not finished():
            epoch = optimizer.local_epoch
            batch = collate([examples[i] for i in next(order)], pad_id)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            local_steps += 1
            value = loss.item()
            losses.append(value)
            epoch_losses.append(value)
            if optimizer.local_epoch != epoch:  # a global step happened (or we caught up)
                last_mean = sum(epoch_losses) / len(epoch_losses)
                epoch_losses = []
                peers.update(dict.fromkeys(_join_roster(dht, config.run_id, me, joined)))
                saving = (optimizer.local_epoch % config.checkpoint_every == 0
                          and not finished())  # the last one: below
                if saving:
                    checkpoint = _save(directory, model, optimizer, spec, me, local_steps)
                store.update(job_id, loss=last_mean, step=optimizer.local_epoch,
                             checkpoint=checkpoint if saving else None, peers=tuple(peers))
        elapsed = time.perf_counter() - started
        # the last round's state averaging runs in the background (hivemind's
        # delay_state_averaging): apply it; then one last round with every peer still in
        # the run, so that they end with the same parameters
        optimizer.state_averager.step(wait_for_delayed_updates=True)
        if not federated:
            _final_average(optimizer, dht, config, me, joined)
        checkpoint = _save(directory, model, optimizer, spec, me, local_steps)
        store.update(job_id, checkpoint=checkpoint)
        if math.isnan(last_mean) and epoch_losses:
            last_mean = sum(epoch_losses) / len(epoch_losses)
        return DPResult(
            steps=local_steps if federated else optimizer.local_epoch, local_steps=local_steps,
            loss_first=losses[0] if losses else float("nan"), loss_last=last_mean,
            samples_per_s=local_steps * config.batch_size / elapsed if elapsed > 0 else 0.0,
            peers=tuple(peers), checkpoint=checkpoint, job_id=job_id, start_epoch=start_epoch,
            resumed_from=str(resumed or ""), shard=shard, samples=len(examples),
        )
    finally:
        optimizer.shutdown()


ROSTER_TTL_S = 300.0  # a roster entry lives this long; peers refresh theirs every step


def _roster_key(run_id: str) -> str:
    return f"{run_id}_layerchain_roster"


def _join_roster(dht: SharedDHT, run_id: str, me: str, joined: float) -> dict[str, float]:
    """Store (or refresh) this peer's roster entry; the run's roster, peer id -> join time.

    Sub-keyed by the libp2p peer id's bytes (a training entry to ``dp_dht``'s validator)."""
    from hivemind.p2p import PeerID
    from hivemind.utils import get_dht_time

    peer = PeerID.from_base58(me)
    dht.store(_roster_key(run_id), joined, get_dht_time() + ROSTER_TTL_S, subkey=peer.to_bytes())
    found = dht.get(_roster_key(run_id), latest=True)
    roster = {me: joined}
    if found is not None and isinstance(found.value, dict):
        for subkey, entry in found.value.items():
            value = getattr(entry, "value", None)
            if isinstance(subkey, bytes) and isinstance(value, (int, float)):
                roster[str(PeerID(subkey))] = float(value)
    return roster


def _final_average(optimizer: Any, dht: SharedDHT, config: DPConfig, me: str, joined: float
                   ) -> None:
    """A barrier, then one blocking state-averaging round: report this peer done, wait (at
    most ``averaging_timeout_s``) until every peer of the roster did, then average parameters
    and optimizer state with them. An averaging round that failed during the run (a late
    partner, a loaded machine) otherwise leaves peers a step or two apart at the end."""
    from hivemind.p2p import PeerID
    from hivemind.utils import get_dht_time

    key = f"{config.run_id}_layerchain_done"
    subkey = PeerID.from_base58(me).to_bytes()
    dht.store(key, optimizer.local_epoch, get_dht_time() + ROSTER_TTL_S, subkey=subkey)
    deadline = time.monotonic() + config.averaging_timeout_s
    roster = _join_roster(dht, config.run_id, me, joined)
    if set(roster) == {me}:
        return  # alone: nobody to average with
    while time.monotonic() < deadline:
        roster = _join_roster(dht, config.run_id, me, joined)
        found = dht.get(key, latest=True)
        done = set(found.value) if found is not None and isinstance(found.value, dict) else set()
        if {PeerID.from_base58(peer).to_bytes() for peer in roster} <= done:
            break
        time.sleep(0.3)
    optimizer.state_averager.step(
        averaging_round=True, delay_averaging=False,
        averaging_opts={"timeout": config.averaging_timeout_s})
    optimizer.state_averager.step(wait_for_delayed_updates=True)  # applies the result


def _wait_for_peers(dht: SharedDHT, config: DPConfig, me: str) -> dict[str, float]:
    """Join the run's roster and wait until it holds ``config.min_peers`` peers; the roster.
    PeerTimeout if they do not come within ``config.wait_peers_s``."""
    joined = time.time()
    deadline = time.monotonic() + config.wait_peers_s
    while True:
        roster = _join_roster(dht, config.run_id, me, joined)
        if len(roster) >= config.min_peers:
            return roster
        if time.monotonic() > deadline:
            raise PeerTimeout(
                f"only {len(roster)} of {config.min_peers} peers joined run {config.run_id!r} "
                f"within {config.wait_peers_s:.0f} s",
                hint="start the other peers with the same --run-id and --initial-peers")
        time.sleep(0.5)


def _save(directory: Path, model: torch.nn.Module, optimizer: Any, spec: ModelSpec,
          me: str, local_steps: int) -> str:
    """Write this peer's checkpoint for the current epoch atomically; drop its older ones."""
    import torch

    epoch = optimizer.local_epoch
    path = directory / checkpoint_name(epoch, me)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "local_steps": local_steps, "model_id": spec.model_id}, tmp)
    os.replace(tmp, path)
    for old in directory.glob(f"step-*-{me[-8:]}.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return str(path)

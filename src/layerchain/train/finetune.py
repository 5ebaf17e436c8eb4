"""Fine-tuning through the swarm: the client trains an adapter, the blocks stay frozen.

Petals-style: the client holds the head (embeddings, final norm, LM head) and the trainable
parameters, a prompt-tuning prefix (``train.prompt``) or a LoRA update of the LM head
(``train.lora``); the blocks in between run where they are served (``train.remote``:
``TrainForward``/``TrainBackward`` through a route of hops) or, for the one-process
reference and the benchmark, in a local span (``LocalBlocks``): the same loss, the same
gradients, so exactness is checked, not hoped for (tests/test_train_finetune.py).

One optimizer step (Adam) takes ``batch_size`` examples (``train.data``: loss on assistant
turns), right-padded into micro-batches of at most ``MAX_TRAIN_TOKENS`` tokens (B x (N + T),
N the virtual tokens) that each make one forward and one backward per hop; the loss is the
mean over the step's loss tokens. Right padding is exact with causal attention: a real
token never attends to a later (padded) position, and padded labels carry no loss.
LoRA alone needs no backward through the blocks (its parameters sit after them): only the
forward crosses the wire. Examples are taken in a seeded shuffle, epoch after epoch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from layerchain.errors import ConfigError
from layerchain.model.head import Head
from layerchain.train.adapter import adapter_of, save_adapter
from layerchain.train.data import IGNORE_INDEX, Example
from layerchain.train.lora import DEFAULT_ALPHA, DEFAULT_RANK, LoraHead
from layerchain.train.prompt import DEFAULT_VIRTUAL_TOKENS, PromptPrefix
from layerchain.wire.messages import MAX_TRAIN_TOKENS

METHODS = ("prompt", "lora")
DEFAULT_LR = {"prompt": 0.03, "lora": 0.01}  # Adam, per method (measured on the shipped task)
BlocksFn = Callable[[torch.Tensor], torch.Tensor]  # [B, T, H] -> [B, T, H], differentiable


class Blocks(Protocol):
    """Where the frozen blocks run: ``open(max_tokens, requests)`` gives a function through
    all of them for one optimizer step (``requests`` calls of at most ``max_tokens``)."""

    def open(self, max_tokens: int, requests: int) -> AbstractContextManager[BlocksFn]: ...


@dataclass
class LocalBlocks:
    """All blocks in this process: one ``SpanModel`` over ``[0, L)`` (stateless forward,
    autograd through it): the reference the swarm's gradients must equal."""

    span: Any

    @contextmanager
    def open(self, max_tokens: int, requests: int) -> Iterator[BlocksFn]:
        yield lambda x: self.span.forward(x)


@dataclass(frozen=True)
class FinetuneConfig:
    """What to train and how (CLI flags of ``train finetune`` come from these)."""

    method: str = "prompt"  # "prompt": a prefix of virtual tokens; "lora": the LM head's
    steps: int = 20  # optimizer steps
    lr: float | None = None  # Adam's learning rate; None: DEFAULT_LR[method]
    batch_size: int = 4  # examples per optimizer step
    virtual_tokens: int = DEFAULT_VIRTUAL_TOKENS  # prefix length (method "prompt")
    lora_rank: int = DEFAULT_RANK  # (method "lora")
    lora_alpha: float = DEFAULT_ALPHA  # LoRA's scale is alpha / rank
    max_tokens: int = 128  # tokens one example keeps (the start)
    seed: int = 0  # the data order and LoRA's initialisation

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("--steps and --batch-size must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        n = self.virtual_tokens if self.method == "prompt" else 0
        if not 2 <= self.max_tokens <= MAX_TRAIN_TOKENS - n:
            raise ConfigError(
                f"--max-tokens must be in 2..{MAX_TRAIN_TOKENS - n} (one request carries "
                f"{MAX_TRAIN_TOKENS} tokens with the {n} virtual ones), got {self.max_tokens}"
            )

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass(frozen=True)
class StepStats:
    """One optimizer step: its loss (mean over its loss tokens), tokens through the blocks
    (virtual ones included, padding not) and seconds."""

    loss: float
    tokens: int
    seconds: float


@dataclass(frozen=True)
class FinetuneResult:
    """A finished run; ``to_json`` is ``train finetune --json``'s object."""

    losses: tuple[float, ...]
    tokens: int  # through the blocks, all steps
    seconds: float  # in steps (the blocks, the head, the optimizer)
    out: str  # the adapter's directory ("" when not written)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"steps": len(self.losses), "loss_first": round(self.losses[0], 4),
                "loss_last": round(self.losses[-1], 4),
                "tokens_per_s": round(self.tokens_per_s, 2), "out": self.out}


@dataclass(frozen=True)
class Batch:
    """Right-padded examples: ids and labels [B, T] (labels IGNORE_INDEX on padding)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    tokens: int  # real tokens (no padding)


def make_batches(examples: Sequence[Example], pad_id: int, virtual_tokens: int,
                 max_tokens: int = MAX_TRAIN_TOKENS) -> list[Batch]:
    """``examples`` in order, as few right-padded batches as keep each one's B x (N + T)
    within ``max_tokens``."""
    groups: list[list[Example]] = []
    for example in examples:
        group = groups[-1] if groups else None
        if group is not None:
            width = max(len(e.input_ids) for e in (*group, example)) + virtual_tokens
            if (len(group) + 1) * width <= max_tokens:
                group.append(example)
                continue
        groups.append([example])
    batches = []
    for group in groups:
        width = max(len(e.input_ids) for e in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(group):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        batches.append(Batch(ids, labels, sum(len(e.input_ids) for e in group)))
    return batches


class Trainer:
    """The client's trainable parameters, their optimizer and the loss (module docstring)."""

    def __init__(self, spec: Any, head: Head, config: FinetuneConfig, *, tokenizer: Any = None,
                 pad_id: int | None = None) -> None:
        if head.projection is not None:
            raise ConfigError("fine-tuning needs the float32 head; use --dtype fp32")
        self.spec, self.head, self.config = spec, head, config
        self.prefix = (PromptPrefix.from_text(head, tokenizer, config.virtual_tokens)
                       if config.method == "prompt" else None)
        self.lora = (LoraHead(spec.hidden_size, spec.vocab_size, config.lora_rank,
                              config.lora_alpha, seed=config.seed)
                     if config.method == "lora" else None)
        eos = list(spec.shape.eos_token_id) if hasattr(spec, "shape") else []
        self.pad_id = pad_id if pad_id is not None else (eos[0] if eos else 0)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=config.learning_rate)

    @property
    def virtual_tokens(self) -> int:
        return 0 if self.prefix is None else self.prefix.virtual_tokens

    def parameters(self) -> list[torch.nn.Parameter]:
        modules = [m for m in (self.prefix, self.lora) if m is not None]
        return [p for module in modules for p in module.parameters()]

    def loss_sum(self, batch: Batch, blocks: BlocksFn) -> tuple[torch.Tensor, int]:
        """The summed cross-entropy of ``batch``'s labels (differentiable in the trained
        parameters) and how many labels it covers."""
        n = self.virtual_tokens
        x = self.head.embed(batch.input_ids).clone()  # [B, T, H], out of inference mode
        if self.prefix is not None:
            x = self.prefix(x)  # [B, N + T, H]
        y = blocks(x)  # [B, N + T, H]
        t = batch.input_ids.shape[1]
        normed = self.head.norm(y[:, n : n + t - 1])  # positions predicting tokens 1..T-1
        logits = F.linear(normed, self.head.lm_head)  # [B, T - 1, V]
        if self.lora is not None:
            logits = logits + self.lora(normed)
        targets = batch.labels[:, 1:].to(logits.device)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, int((targets != IGNORE_INDEX).sum())

    def step(self, examples: Sequence[Example], blocks: Blocks) -> StepStats:
        """One optimizer step over ``examples`` (gradients accumulated over micro-batches)."""
        t0 = time.perf_counter()
        batches = make_batches(examples, self.pad_id, self.virtual_tokens)
        count = sum(e.loss_tokens for e in examples)
        widest = max(b.input_ids.numel() + b.input_ids.shape[0] * self.virtual_tokens
                     for b in batches)
        total = 0.0
        self.optimizer.zero_grad()
        with blocks.open(widest, len(batches)) as run:
            for batch in batches:
                loss, _ = self.loss_sum(batch, run)
                (loss / count).backward()
                total += float(loss.detach())
        self.optimizer.step()
        tokens = sum(b.tokens + b.input_ids.shape[0] * self.virtual_tokens for b in batches)
        return StepStats(total / count, tokens, time.perf_counter() - t0)

    def adapter(self) -> Any:
        return adapter_of(self.spec, self.prefix, self.lora)


def batches_of(examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless batches of ``batch_size`` examples: a seeded shuffle per epoch."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]


def train(trainer: Trainer, examples: Sequence[Example], blocks: Blocks,
          on_step: Callable[[int, StepStats], None] | None = None) -> list[StepStats]:
    """``trainer.config.steps`` optimizer steps; ``on_step(step, stats)`` after each."""
    if not examples:
        raise ConfigError("no training examples")
    config = trainer.config
    stats = []
    batches = batches_of(examples, config.batch_size, config.seed)
    for step in range(config.steps):
        stats.append(trainer.step(next(batches), blocks))
        if on_step is not None:
            on_step(step, stats[-1])
    return stats


def write_outputs(trainer: Trainer, stats: Sequence[StepStats], out: Path) -> FinetuneResult:
    """The adapter and the loss curve (``loss.png``) under ``out``; the run's result."""
    save_adapter(trainer.adapter(), out)
    losses = tuple(s.loss for s in stats)
    plot_losses(losses, out / "loss.png", title=f"{trainer.config.method} on {trainer.spec.name}")
    return FinetuneResult(losses, sum(s.tokens for s in stats), sum(s.seconds for s in stats),
                          str(out))


def plot_losses(losses: Sequence[float], path: Path, title: str = "") -> None:
    """A PNG of the loss per step (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over loss tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

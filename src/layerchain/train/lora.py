"""LoRA on the client-side head: a trainable low-rank update of the LM head.

``logits = lm_head(norm(h)) + (alpha / r) * norm(h) @ A^T @ B^T`` with A [r, H] and B [V, r]
(Hu et al. 2021; ``model.adapter.lora_delta`` computes it, for training and generation
alike). B starts at zero, so the adapted model starts exactly as the base model; A starts
with Kaiming-uniform rows as in the reference implementation. The head's own weights (and
the remote blocks) stay frozen: only A and B train. It changes what the model says after
the blocks' last hidden state (an answer style, a fixed vocabulary), not what the blocks
compute; prompt tuning (``train.prompt``) reaches inside the blocks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from layerchain.errors import ConfigError
from layerchain.model.adapter import lora_delta

DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0


class LoraHead(nn.Module):
    """The trainable LoRA update of an LM head of ``vocab_size`` x ``hidden_size``."""

    def __init__(self, hidden_size: int, vocab_size: int, rank: int = DEFAULT_RANK,
                 alpha: float = DEFAULT_ALPHA, seed: int = 0) -> None:
        super().__init__()
        if not 1 <= rank <= hidden_size:
            raise ConfigError(f"--lora-rank must be in 1..{hidden_size}, got {rank}")
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(hidden_size)  # kaiming_uniform_(a=sqrt(5)) of a [r, H] weight
        a = (torch.rand(rank, hidden_size, generator=generator) * 2 - 1) * bound
        self.a = nn.Parameter(a)  # [r, H]
        self.b = nn.Parameter(torch.zeros(vocab_size, rank))  # [V, r]
        self.scale = alpha / rank

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        """normed [..., H] (the final norm's output) -> the logits' change [..., V]."""
        return lora_delta(normed, self.a, self.b, self.scale)

"""Prompt tuning: N trainable virtual tokens' embeddings put before every sequence.

The client trains ``PromptPrefix.embeddings`` [N, H] and nothing else of the model; the
remote blocks see N more positions at the start of each sequence (positions 0..N-1, so
every token after them attends to them). Initialised from the embedding rows of a text's
tokens (Lester et al. 2021: better than random vectors, whose norms the blocks never saw),
the prefix starts as a plausible input: hops' output checks (``client.rules``) and the
model's own norms are met from the first step. Saved as ``Adapter.prefix``
(``model.adapter``), which the ``Decoder`` puts before a prompt at generation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerchain.errors import ConfigError
from layerchain.model.head import Head

DEFAULT_VIRTUAL_TOKENS = 8
INIT_TEXT = "Answer the question with the facts you were taught, briefly and exactly."


class PromptPrefix(nn.Module):
    """Trainable virtual tokens' embeddings [N, H], prepended to [B, T, H] embeddings."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        if embeddings.dim() != 2 or embeddings.shape[0] < 1:
            raise ConfigError(f"a prefix must be [N >= 1, H], got {list(embeddings.shape)}")
        self.embeddings = nn.Parameter(embeddings.detach().clone().float())  # [N, H]

    @classmethod
    def from_text(cls, head: Head, tokenizer: Any, virtual_tokens: int = DEFAULT_VIRTUAL_TOKENS,
                  text: str = INIT_TEXT) -> PromptPrefix:
        """A prefix of ``virtual_tokens`` embedding rows of ``text``'s tokens (repeated if
        the text is shorter)."""
        if virtual_tokens < 1:
            raise ConfigError(f"--virtual-tokens must be at least 1, got {virtual_tokens}")
        ids = list(tokenizer.encode(text, add_special_tokens=False)) or [0]
        ids = (ids * (virtual_tokens // len(ids) + 1))[:virtual_tokens]
        rows = head.embed(torch.tensor([ids], dtype=torch.long))[0].clone()  # [N, H]
        return cls(rows.cpu())

    @property
    def virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds [B, T, H] -> [B, N + T, H], the prefix first in every sequence."""
        prefix = self.embeddings.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([prefix, embeds], dim=1)

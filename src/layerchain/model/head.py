"""The head of a model: token embeddings in, final norm and LM head out.

The client holds the head, so no token id or sampled text is ever sent (DESIGN "Model
runtime"); but the head's tensors are public: the rows ``embed`` returns map back to their
ids exactly (the first hop reads them unless the client keeps blocks ``--private-blocks``),
and the last hop can apply ``logits`` to its own output. ``embed`` turns ids into the hidden states the first span takes (including gemma's
``sqrt(hidden_size)`` scaling); ``logits`` applies the final norm and the LM head (tied to the
embeddings or not) to the hidden states the last span returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layerchain.errors import ModelFileError
from layerchain.model.spec import ModelSpec


class Head(nn.Module):
    """Embeddings, final norm and LM head of one model (float32, eval, no gradients)."""

    def __init__(self, spec: ModelSpec, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        config = spec.config
        family = spec.family_info
        self.hidden_size, self.vocab_size = spec.hidden_size, spec.vocab_size
        self.embed_tokens = nn.Parameter(
            state["embed_tokens.weight"], requires_grad=False
        )  # [V, H]
        self.norm = family.rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm.load_state_dict({"weight": state["norm.weight"]})
        tied = "lm_head.weight" not in state
        self.lm_head = (
            self.embed_tokens
            if tied
            else nn.Parameter(state["lm_head.weight"], requires_grad=False)
        )  # [V, H]
        # gemma scales embeddings by sqrt(H), computed in float32 as GemmaTextScaledWordEmbedding
        self.embed_scale = torch.tensor(config.hidden_size**0.5) if family.embed_scale else None
        self.eval().requires_grad_(False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids LongTensor [B, T] -> hidden states [B, T, H] float32."""
        with torch.inference_mode():
            hidden = F.embedding(ids, self.embed_tokens)
            if self.embed_scale is not None:
                hidden = hidden * self.embed_scale.to(hidden.dtype)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] -> logits [B, T, V] float32 (slice to the last token first if
        only that one is needed: the LM head is the biggest matmul of a small model)."""
        with torch.inference_mode():
            return F.linear(self.norm(hidden), self.lm_head)


def load_head(spec: ModelSpec) -> Head:
    """The head of ``spec``, reading only the embedding, final-norm and LM-head tensors."""
    state = spec.source.head_state()
    embed = state.get("embed_tokens.weight")
    if embed is None or embed.shape != (spec.vocab_size, spec.hidden_size):
        shape = None if embed is None else list(embed.shape)
        raise ModelFileError(
            f"{spec.name}: embeddings of shape {shape}, expected "
            f"[{spec.vocab_size}, {spec.hidden_size}]"
        )
    return Head(spec, state)

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
from layerchain.model.device import resolve_device
from layerchain.model.quant import compact_head_tables, release_freed_memory
from layerchain.model.spec import ModelSpec


class HeadNorm(nn.Module):
    """The final RMS norm, without transformers' modeling module (whose import pulls in
    ``torch._dynamo``: most of a client's start-up). It runs exactly the ops of the family's
    own class (``LlamaRMSNorm`` and its copies; ``GemmaRMSNorm`` when ``offset``), so its
    output is bit-identical (tests/test_startup.py compares them on every registered family)."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [H]
        self.eps, self.offset = eps, offset

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> normed [..., H] in hidden's dtype."""
        if self.offset:  # GemmaRMSNorm: (x * w) in float32, then cast
            x = hidden.float()
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return (normed * (1.0 + self.weight.float())).type_as(hidden)
        x = hidden.to(torch.float32)  # LlamaRMSNorm: cast, then x * w
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(hidden.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}"


class Head(nn.Module):
    """Embeddings, final norm and LM head of one model (float32, eval, no gradients)."""

    def __init__(self, spec: ModelSpec, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        shape = spec.shape  # not spec.config: building that imports transformers
        family = spec.family_info
        self.hidden_size, self.vocab_size = spec.hidden_size, spec.vocab_size
        self.embed_tokens = nn.Parameter(
            state["embed_tokens.weight"], requires_grad=False
        )  # [V, H]
        self.norm = HeadNorm(state["norm.weight"], shape.rms_norm_eps, family.norm_offset)
        tied = "lm_head.weight" not in state
        self.lm_head = (
            self.embed_tokens
            if tied
            else nn.Parameter(state["lm_head.weight"], requires_grad=False)
        )  # [V, H]
        # gemma scales embeddings by sqrt(H), computed in float32 as GemmaTextScaledWordEmbedding
        self.embed_scale = torch.tensor(shape.hidden_size**0.5) if family.embed_scale else None
        self.softcap = shape.final_logit_softcapping  # gemma 3: cap * tanh(logits / cap)
        # compact forms (``compact``): ids -> rows and hidden -> logits modules; None: fp32
        self.rows: nn.Module | None = None
        self.projection: nn.Module | None = None
        self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        """Where the head's tables live (``load_head(..., device=)``)."""
        return next(self.norm.parameters()).device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids LongTensor [B, T] (any device) -> hidden states [B, T, H] float32 on
        ``device``."""
        ids = ids.to(self.device)  # no copy on the CPU
        with torch.inference_mode():
            if self.rows is not None:
                hidden: torch.Tensor = self.rows(ids)
            else:
                hidden = F.embedding(ids, self.embed_tokens)
            if self.embed_scale is not None:
                hidden = hidden * self.embed_scale.to(hidden.dtype)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] (any device) -> logits [B, T, V] float32 in CPU memory, where
        the sampler draws (slice to the last token first if only that one is needed: the LM
        head is the biggest matmul of a small model)."""
        with torch.inference_mode():
            normed = self.norm(hidden.to(self.device))
            if self.projection is not None:
                logits: torch.Tensor = self.projection(normed)
            else:
                logits = F.linear(normed, self.lm_head)
            if self.softcap is not None:  # as Gemma3ForCausalLM: divide, tanh, multiply
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return logits.to(device="cpu", dtype=torch.float32)  # no copy on the CPU

    def compact(self, dtype: str) -> Head:
        """Hold the embeddings and LM head in ``dtype`` (concrete; fp32: unchanged), dropping
        the float32 tables (``quant.compact_head_tables``: int4 keeps this table in int8)."""
        if dtype != "fp32":
            self.rows, self.projection = compact_head_tables(
                self.embed_tokens, self.lm_head, dtype
            )
            self.embed_tokens = self.lm_head = nn.Parameter(torch.empty(0), requires_grad=False)
        return self


def load_head(
    spec: ModelSpec, *, dtype: str | None = None, device: str | torch.device = "cpu"
) -> Head:
    """The head of ``spec``, reading only the embedding, final-norm and LM-head tensors,
    held in ``dtype`` (concrete, see ``quant.resolve_dtype``; ``Head.compact``; None: the
    spec's own form, ``spec.dtype``) on ``device``
    (a ``model.device`` name or a ``torch.device``; ConfigError if this machine has none)."""
    dtype = spec.dtype if dtype is None else dtype
    place = resolve_device(device) if isinstance(device, str) else device
    state = spec.source.head_state()
    embed = state.get("embed_tokens.weight")
    if embed is None or embed.shape != (spec.vocab_size, spec.hidden_size):
        shape = None if embed is None else list(embed.shape)
        raise ModelFileError(
            f"{spec.name}: embeddings of shape {shape}, expected "
            f"[{spec.vocab_size}, {spec.hidden_size}]"
        )
    head = Head(spec, state)
    del state, embed  # the float32 tables live in the head alone: compact can free them
    if dtype != "fp32":
        head.compact(dtype)
        release_freed_memory()  # back to the OS (see quant)
    return head.to(place)

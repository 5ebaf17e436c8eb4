"""``ModelShape``: the few config fields a client's head and decode loop need, without
transformers.

A ``PretrainedConfig`` costs the client its start-up: building even a ``LlamaConfig``
imports transformers' validators, which import ``torch.distributed.tensor`` (about 0.6 s on an
idle machine, 5 s under load; docs/BENCHMARKS.md "Start-up"). A spec carries this record
instead and builds the full config only when a span is built (nodes, ``generate --local``).
A GGUF file's shape is read straight from its metadata (``gguf_file.gguf_shape``), by the
same key mapping transformers' GGUF loader uses; any other source derives it from its config
(``shape_of``). No torch or transformers: ``layerchain.model.spec`` imports this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerchain.model.families import family_for

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModelShape:
    """What the head, the tokenizer's stop rule and the context check read of a config;
    each field has the value the transformers config of the same model has."""

    model_type: str  # transformers' ``model_type``: the family's key (``families``)
    num_hidden_layers: int  # blocks
    hidden_size: int  # H
    vocab_size: int  # V
    rms_norm_eps: float  # the final norm's epsilon
    tie_word_embeddings: bool  # the LM head is the embedding table
    eos_token_id: tuple[int, ...]  # ids that end a generation (may be empty)
    max_position_embeddings: int | None  # the context length, if the config states one
    # gemma 2/3: logits = cap * tanh(logits / cap) after the LM head (None: none)
    final_logit_softcapping: float | None = None


def shape_of(config: PretrainedConfig) -> ModelShape:
    """The shape of a transformers config; UnsupportedArchitecture for a family we cannot run
    (its config may lack these fields)."""
    family_for(str(config.model_type))
    eos = getattr(config, "eos_token_id", None)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
    context = getattr(config, "max_position_embeddings", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    return ModelShape(
        model_type=str(config.model_type),
        num_hidden_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        rms_norm_eps=float(config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        eos_token_id=eos_ids,
        max_position_embeddings=None if context is None else int(context),
        final_logit_softcapping=None if softcap is None else float(softcap),
    )

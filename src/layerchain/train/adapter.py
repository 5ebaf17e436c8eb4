"""The adapter fine-tuning writes: ``DIR/adapter.json`` + ``DIR/adapter.safetensors``.

The format and ``load_adapter`` live in ``layerchain.model.adapter`` (the client applies
adapters and must not import the trainer); this module turns trained modules into an
``Adapter`` and re-exports the loader for ``layerchain.train`` users.
"""

from __future__ import annotations

from typing import Any

from layerchain.model.adapter import Adapter, load_adapter, save_adapter
from layerchain.train.lora import LoraHead
from layerchain.train.prompt import PromptPrefix

__all__ = ["Adapter", "adapter_of", "load_adapter", "save_adapter"]


def adapter_of(spec: Any, prefix: PromptPrefix | None, lora: LoraHead | None) -> Adapter:
    """The ``Adapter`` holding ``prefix`` and/or ``lora``'s current values for ``spec``."""
    return Adapter(
        method="prompt" if lora is None else "lora",
        model_id=spec.model_id,
        name=spec.name,
        hidden_size=spec.hidden_size,
        vocab_size=spec.vocab_size,
        prefix=None if prefix is None else prefix.embeddings.detach().cpu().clone(),
        lora_a=None if lora is None else lora.a.detach().cpu().clone(),
        lora_b=None if lora is None else lora.b.detach().cpu().clone(),
        lora_scale=1.0 if lora is None else lora.scale,
    )

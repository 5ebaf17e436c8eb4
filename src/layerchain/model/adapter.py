"""Trained adapters of a model's head: a prompt-tuning prefix and a LoRA update of the LM head.

Fine-tuning through the swarm (``layerchain.train``) trains only what the client holds; the
remote blocks stay frozen. What it trains is one ``Adapter``:

* ``prefix`` [N, H]: N virtual tokens' embeddings, put before the prompt's embeddings in
  the first input of a generation (prompt tuning, Lester et al. 2021; Petals' "ptune");
  they take the cache positions 0..N-1 on every hop;
* ``lora_a`` [r, H], ``lora_b`` [V, r]: a low-rank update of the LM head (LoRA, Hu et al.
  2021): ``logits = lm_head(norm(h)) + scale * norm(h) @ A^T @ B^T``.

On disk an adapter is a directory: ``adapter.json`` (``FORMAT``, method, the model's id,
name, hidden and vocabulary sizes, the tensors' shapes, LoRA's scale) and
``adapter.safetensors`` (the tensors). It lives here, in the model layer, because the client
(``Swarm(..., adapter=DIR)``) applies it and must not import the trainer;
``layerchain.train.adapter`` writes it. ``Adapter.apply`` gives a head with the LoRA update
merged into its LM head; the prefix goes to the ``Decoder`` (``prefix=``), which puts it
before the prompt.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from layerchain.errors import ConfigError
from layerchain.model.head import Head

FORMAT = 1  # adapter.json's format; bump when its fields change
METHODS = ("prompt", "lora")
CONFIG_FILE = "adapter.json"
TENSORS_FILE = "adapter.safetensors"


def lora_delta(normed: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
               ) -> torch.Tensor:
    """LoRA's change of the logits: normed [..., H] -> [..., V] = scale * normed A^T B^T."""
    return scale * F.linear(F.linear(normed, a), b)


@dataclass(frozen=True, eq=False)
class Adapter:
    """What fine-tuning trained (see the module docstring); tensors float32 on the CPU."""

    method: str  # one of METHODS: what was trained
    model_id: str  # the id of the weights it was trained on (``ModelSpec.model_id``)
    name: str  # the model's name, for messages
    hidden_size: int
    vocab_size: int
    prefix: torch.Tensor | None = None  # [N, H] virtual tokens' embeddings
    lora_a: torch.Tensor | None = None  # [r, H]
    lora_b: torch.Tensor | None = None  # [V, r]
    lora_scale: float = 1.0  # LoRA's alpha / r

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown adapter method {self.method!r}; use one of {METHODS}")
        h, v = self.hidden_size, self.vocab_size
        if self.prefix is not None and (self.prefix.dim() != 2 or self.prefix.shape[1] != h):
            raise ConfigError(f"an adapter's prefix must be [N, {h}], got {list(self.prefix.shape)}")
        if (self.lora_a is None) != (self.lora_b is None):
            raise ConfigError("an adapter's LoRA needs both lora_a and lora_b")
        if self.lora_a is not None and self.lora_b is not None:
            rank = self.lora_a.shape[0]
            if (self.lora_a.dim() != 2 or self.lora_a.shape[1] != h
                    or tuple(self.lora_b.shape) != (v, rank)):
                raise ConfigError(
                    f"an adapter's LoRA must be A [r, {h}] and B [{v}, r], got "
                    f"{list(self.lora_a.shape)} and {list(self.lora_b.shape)}"
                )
        for name in ("prefix", "lora_a", "lora_b"):
            tensor = getattr(self, name)
            if tensor is not None and not torch.isfinite(tensor).all():
                raise ConfigError(f"an adapter's {name} holds non-finite values")

    @property
    def virtual_tokens(self) -> int:
        """Positions the prefix takes before every prompt (0 without one)."""
        return 0 if self.prefix is None else int(self.prefix.shape[0])

    def check(self, spec: Any) -> None:
        """ConfigError unless this adapter was trained on ``spec``'s weights (same id)."""
        if self.model_id != spec.model_id:
            raise ConfigError(
                f"the adapter was trained on model {self.name} ({self.model_id[:12]}), not on "
                f"{spec.name} ({spec.model_id[:12]})",
                hint="generate with the model (and --dtype) the adapter was trained with",
            )

    def apply(self, head: Head) -> Head:
        """``head`` with the LoRA update merged into a copy of its LM head
        (``W + scale * B A``, [V, H]: the same logits as ``lora_delta`` added, up to float
        rounding); ``head`` itself when there is none. The embeddings stay the head's own,
        tied or not. A compact head (int8/int4 tables) takes no LoRA: ConfigError."""
        if self.lora_a is None or self.lora_b is None:
            return head
        if head.projection is not None:
            raise ConfigError("a LoRA adapter needs the float32 head", hint="use --dtype fp32")
        adapted = copy.copy(head)  # a shallow copy: same modules and tables...
        adapted._parameters = dict(head._parameters)  # ...but its own parameter slots
        a, b = self.lora_a.to(head.device), self.lora_b.to(head.device)
        merged = head.lm_head.detach() + self.lora_scale * (b @ a)  # [V, H]
        adapted.lm_head = torch.nn.Parameter(merged, requires_grad=False)
        return adapted


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write ``adapter`` to the directory ``path`` (created); returns it."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(adapter, name).detach().cpu().float().contiguous()
               for name in ("prefix", "lora_a", "lora_b") if getattr(adapter, name) is not None}
    save_file(tensors, str(directory / TENSORS_FILE))
    config = {
        "format": FORMAT, "method": adapter.method, "model_id": adapter.model_id,
        "name": adapter.name, "hidden_size": adapter.hidden_size,
        "vocab_size": adapter.vocab_size, "lora_scale": adapter.lora_scale,
        "virtual_tokens": adapter.virtual_tokens,
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return directory


def load_adapter(path: str | Path) -> Adapter:
    """The adapter in directory ``path``; ConfigError (one line) if it is missing, of
    another format, or its tensors do not match its ``adapter.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(path)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{directory} holds no adapter ({CONFIG_FILE} is missing)",
                          hint="`layerchain train finetune --out DIR` writes one") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {directory / CONFIG_FILE}: {error}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"{directory / CONFIG_FILE} is not an adapter of format {FORMAT}")
    try:
        tensors = load_file(str(directory / TENSORS_FILE))
    except (OSError, SafetensorError) as error:
        raise ConfigError(f"cannot read {directory / TENSORS_FILE}: {error}") from None
    shapes = config.get("shapes", {})
    if {k: list(v.shape) for k, v in tensors.items()} != shapes:
        raise ConfigError(f"{directory / TENSORS_FILE} does not hold the tensors "
                          f"{CONFIG_FILE} lists ({shapes})")
    try:
        return Adapter(
            method=str(config["method"]), model_id=str(config["model_id"]),
            name=str(config["name"]), hidden_size=int(config["hidden_size"]),
            vocab_size=int(config["vocab_size"]), prefix=tensors.get("prefix"),
            lora_a=tensors.get("lora_a"), lora_b=tensors.get("lora_b"),
            lora_scale=float(config.get("lora_scale", 1.0)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{directory / CONFIG_FILE} lacks a field: {error}") from None

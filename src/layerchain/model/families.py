"""The registry of model families: which transformers classes run a block of each.

A family names transformers' own decoder-layer, rotary-embedding and RMS-norm classes, so a
span computes exactly what ``AutoModelForCausalLM`` computes. Adding a family is one
``register_family`` call (STYLE rule 12); nothing else in ``layerchain.model`` names a family.
Classes are imported lazily: importing ``layerchain.model`` does not import every architecture.

What a family may need besides its classes is a field of ``Family``: gemma's scaled embeddings
and ``(1 + w)`` norms, gemma 3's rotary table per layer type (local and global layers rotate
with different bases), and a mixture-of-experts family's checkpoint layout
(``family_experts.ExpertLayout``: checkpoints keep one matrix per expert, transformers fuses
them). Registered: llama (and Llama 3.x rope scaling, read from the config by
``LlamaRotaryEmbedding``), mistral, qwen2, qwen3, phi3, gemma, gemma3_text, and the
mixture-of-experts families qwen3_moe, mixtral and olmoe (tests/test_families.py checks each
against ``AutoModelForCausalLM``). An image-text checkpoint whose text model is one of them
(gemma3: Gemma 3 4B-27B) is served as that text model (``MULTIMODAL``, ``text_model_of``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import TYPE_CHECKING

from layerchain.errors import UnsupportedArchitecture
from layerchain.model.family_experts import MIXTRAL_EXPERTS, QWEN_EXPERTS, ExpertLayout

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    """How to build the pieces of one architecture family.

    ``module`` is the transformers modeling module; ``prefix`` the class-name prefix in it
    (``Llama`` gives ``LlamaDecoderLayer``, ``LlamaRotaryEmbedding``, ``LlamaRMSNorm``).
    """

    name: str  # our family name, also the transformers ``model_type``
    module: str  # e.g. "transformers.models.llama.modeling_llama"
    prefix: str  # e.g. "Llama"
    embed_scale: bool = False  # gemma multiplies embeddings by sqrt(hidden_size)
    # gemma's RMSNorm scales by (1 + weight), in float32 (head.HeadNorm); GGUF files store
    # these norms' weights as (1 + weight) (llama.cpp's convert_hf_to_gguf), read back minus 1
    norm_offset: bool = False
    # the rotary embedding takes the layer type (gemma3: "sliding_attention" layers rotate with
    # rope_local_base_freq, "full_attention" ones with rope_theta): one (cos, sin) per type
    rope_per_layer_type: bool = False
    experts: ExpertLayout | None = None  # mixture of experts: how checkpoints store them

    @cached_property
    def _mod(self) -> ModuleType:
        return importlib.import_module(self.module)

    def _class(self, suffix: str) -> type[nn.Module]:
        cls: type[nn.Module] = getattr(self._mod, f"{self.prefix}{suffix}")
        return cls

    @property
    def decoder_layer(self) -> type[nn.Module]:
        return self._class("DecoderLayer")

    @property
    def rotary_embedding(self) -> type[nn.Module]:
        return self._class("RotaryEmbedding")

    @property
    def rms_norm(self) -> type[nn.Module]:
        return self._class("RMSNorm")


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family to the registry (keyed by transformers ``model_type``)."""
    FAMILIES[family.name] = family
    return family


def family_for(model_type: str) -> Family:
    """The family running ``model_type``; UnsupportedArchitecture if there is none."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedArchitecture(
            f"model type {model_type!r} is not supported",
            hint=f"supported families: {', '.join(sorted(FAMILIES))}",
        )
    return family


register_family(Family("llama", "transformers.models.llama.modeling_llama", "Llama"))
register_family(Family("mistral", "transformers.models.mistral.modeling_mistral", "Mistral"))
register_family(Family("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2"))
register_family(Family("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3"))
register_family(Family("phi3", "transformers.models.phi3.modeling_phi3", "Phi3"))
register_family(
    Family(
        "gemma",
        "transformers.models.gemma.modeling_gemma",
        "Gemma",
        embed_scale=True,
        norm_offset=True,
    )
)
register_family(
    Family(
        "gemma3_text",
        "transformers.models.gemma3.modeling_gemma3",
        "Gemma3",
        embed_scale=True,
        norm_offset=True,
        rope_per_layer_type=True,
    )
)
register_family(
    Family(
        "qwen3_moe",
        "transformers.models.qwen3_moe.modeling_qwen3_moe",
        "Qwen3Moe",
        experts=QWEN_EXPERTS,
    )
)
register_family(
    Family("mixtral", "transformers.models.mixtral.modeling_mixtral", "Mixtral", experts=MIXTRAL_EXPERTS)
)
register_family(
    Family("olmoe", "transformers.models.olmoe.modeling_olmoe", "Olmoe", experts=QWEN_EXPERTS)
)


def sliding_window_of(config: PretrainedConfig, layer_idx: int) -> int | None:
    """The attention window of global layer ``layer_idx`` (None: full causal attention).

    Mirrors transformers: a config with ``layer_types`` (qwen2) slides only its
    ``"sliding_attention"`` layers; otherwise ``sliding_window`` (mistral, phi3) applies to all.
    """
    value = getattr(config, "sliding_window", None)
    window = None if value is None else int(value)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


@dataclass(frozen=True)
class TextOf:
    """A multimodal checkpoint whose text model is a registered family: a node serves (and a
    client's head embeds) only its text model's blocks, read under ``prefix``."""

    config_attr: str  # the text model's config inside the checkpoint's ("text_config")
    prefix: str  # what precedes the text model's "model.layers.N..." / "lm_head" tensor names


# gemma3 (Gemma 3 4B/12B/27B, image-text): the gemma3_text model under "language_model."
MULTIMODAL: dict[str, TextOf] = {"gemma3": TextOf("text_config", "language_model.")}


def text_model_of(config: PretrainedConfig) -> tuple[PretrainedConfig, str]:
    """(the config spans run, the checkpoint prefix of its tensors): a multimodal config's
    text model (``MULTIMODAL``), else the config itself with no prefix."""
    text = MULTIMODAL.get(str(config.model_type))
    if text is None:
        return config, ""
    inner: PretrainedConfig = getattr(config, text.config_attr)
    return inner, text.prefix


def rope_key_of(family: Family, config: PretrainedConfig, layer_idx: int) -> str | None:
    """Which rotary table global layer ``layer_idx`` uses: its layer type for a family with
    one table per type (gemma3: local and global layers rotate with different bases), else
    None (one table for every layer)."""
    if not family.rope_per_layer_type:
        return None
    return str(config.layer_types[layer_idx])

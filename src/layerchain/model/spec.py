"""The ``ModelSpec`` record: a resolved model's identity, architecture and weight source.

A spec says what a model *is* (name, format, path, content id, transformers config, family)
and where its tensors come from (a ``WeightSource``). Turning what a user types into a spec
is ``resolve.resolve_model``; how the id is computed is ``digest``. This module imports
nothing else of ``layerchain.model`` but the family registry, so every other module of the
package may import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from layerchain.model.families import Family, family_for

if TYPE_CHECKING:  # annotations only: torch and transformers load when a model does
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2"  # the model every command and config uses unless told otherwise

ModelKind = Literal["gguf", "hf", "shards"]  # a GGUF file, a HF directory, a shard directory


class WeightSource(Protocol):
    """Where a model's weights, config and tokenizer come from (see ``weights``, ``shards``).

    Tensors are float32 and named as transformers' modules name them: block tensors relative
    to the decoder layer (``self_attn.q_proj.weight``), head tensors ``embed_tokens.weight``,
    ``norm.weight`` and, when untied, ``lm_head.weight``.
    """

    path: Path  # the .gguf file or the directory

    def config(self) -> PretrainedConfig: ...

    def model_id(self) -> str: ...  # hex sha256 of the weights' content (see ``digest``)

    def block_state(self, index: int, names: Iterable[str]) -> dict[str, torch.Tensor]: ...

    def head_state(self) -> dict[str, torch.Tensor]: ...

    def tokenizer(self) -> PreTrainedTokenizerBase: ...


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A resolved model: where its weights are, its architecture, and its content id.

    Two specs are equal when their model ids are: the id, not the path, is the identity.
    """

    name: str  # what to show a user: "smollm2", the file or directory name
    kind: ModelKind
    path: Path  # the .gguf file or the directory
    model_id: str  # hex sha256 of the weights' content (see ``digest``)
    config: PretrainedConfig = field(repr=False)
    source: WeightSource = field(repr=False)  # reads single tensors and the tokenizer

    @property
    def family(self) -> str:
        return self.family_info.name

    @property
    def family_info(self) -> Family:
        return family_for(self.config.model_type)

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelSpec) and other.model_id == self.model_id

    def __hash__(self) -> int:
        return hash(self.model_id)

"""The ``ModelSpec`` record: a resolved model's identity, architecture and weight source.

A spec says what a model *is* (name, format, path, content id, shape, family; the full
transformers config on first use) and where its tensors come from (a ``WeightSource``). Turning what a user types into a spec
is ``resolve.resolve_model``; the id is the hash of the model's shard manifest (``manifest``). This module imports
nothing else of ``layerchain.model`` but the family registry, ``shape`` and ``dtypes``, so
every other module of the package may import it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from layerchain.errors import ConfigError
from layerchain.model.dtypes import check_dtype  # torch-free
from layerchain.model.families import Family, family_for
from layerchain.model.shape import ModelShape

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

    def shape(self) -> ModelShape: ...  # what the head needs; cheap (no transformers for GGUF)

    def block_state(self, index: int, names: Iterable[str]) -> dict[str, torch.Tensor]: ...

    def head_state(self) -> dict[str, torch.Tensor]: ...

    def tokenizer(self) -> PreTrainedTokenizerBase: ...


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A resolved model: where its weights are, its architecture, and its content id.

    Two specs are equal when their model ids are: the id, not the path, is the identity.
    ``shape`` is read at resolve time; ``config``, transformers' full config, is built on
    first use (a span needs it; the client's head and tokenizer do not).

    The id names the weights *and the form they compute in* (``dtype``, see
    ``model/quant.py``): a span held in int8 returns slightly different hidden states than the
    same span in fp32 (further apart than an audit tolerates, docs/BENCHMARKS.md "Compact
    weights"), so each form is a model of its own to records, routes, receipts, audits and
    evidence. Nodes and clients of one form find each other; an auditor recomputes a receipt
    in the form its model id names (``form_model_id``); a node in int8 is never compared with
    an fp32 recomputation. ``in_form`` gives the spec of another form.
    """

    name: str  # what to show a user: "smollm2", the file or directory name
    kind: ModelKind
    path: Path  # the .gguf file or the directory
    model_id: str  # hex id of the model in its form: its manifest's hash in fp32 (``manifest``)
    shape: ModelShape = field(repr=False)
    source: WeightSource = field(repr=False)  # reads single tensors and the tokenizer
    dtype: str = "fp32"  # the form the weights compute in (a concrete ``model.dtypes`` name)
    weights_id: str = ""  # hex sha256 of the weights' manifest, whatever the form ("": model_id)

    def __post_init__(self) -> None:
        if not self.weights_id:  # a spec straight from its files: the fp32 form
            object.__setattr__(self, "weights_id", self.model_id)

    def in_form(self, dtype: str) -> ModelSpec:
        """This model computed in ``dtype`` (concrete: ``quant.resolve_dtype`` first), with
        that form's id."""
        return replace(self, dtype=dtype, model_id=form_model_id(self.weights_id, dtype))

    @cached_property
    def config(self) -> PretrainedConfig:
        """transformers' config of the model (imports transformers: about 1 s idle)."""
        return self.source.config()

    @property
    def family(self) -> str:
        return self.family_info.name

    @property
    def family_info(self) -> Family:
        return family_for(self.shape.model_type)

    @property
    def num_blocks(self) -> int:
        return self.shape.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.shape.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.shape.vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelSpec) and other.model_id == self.model_id

    def __hash__(self) -> int:
        return hash(self.model_id)


def form_model_id(weights_id: str, dtype: str) -> str:
    """The model id of the weights ``weights_id`` computed in ``dtype``: the weights' own id
    in fp32 (the reference form, unchanged from before forms existed), else
    ``sha256(weights_id + "/" + dtype)`` in hex. ConfigError for a name that is not a concrete
    form (``auto`` must be resolved first)."""
    if check_dtype(dtype) == "auto":
        raise ConfigError("a model's form is a concrete dtype", hint="resolve 'auto' first (quant.resolve_dtype)")
    if dtype == "fp32":
        return weights_id
    return hashlib.sha256(f"{weights_id}/{dtype}".encode()).hexdigest()

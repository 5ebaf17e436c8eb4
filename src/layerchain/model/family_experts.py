"""Mixture-of-experts checkpoints: from one matrix per expert to transformers' fused experts.

transformers (5.x) holds a block's experts as two fused parameters of its ``mlp.experts``
module, E experts of intermediate size I over hidden size H:
``gate_up_proj`` [E, 2I, H] (expert e's gate rows, then its up rows) and ``down_proj``
[E, H, I]; the router is ``mlp.gate.weight`` [E, H]. Files keep the experts apart:

* a Hugging Face checkpoint, one matrix per expert and kind (``mlp.experts.{e}.gate_proj.weight``
  [I, H]; mixtral: ``block_sparse_moe.experts.{e}.w1.weight``, router
  ``block_sparse_moe.gate.weight``), which transformers fuses as it loads
  (``transformers.conversion_mapping``: ``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``);
* a GGUF file, one stacked tensor per kind (``blk.{i}.ffn_gate_exps.weight`` [E, I, H],
  ``ffn_up_exps`` [E, I, H], ``ffn_down_exps`` [E, H, I]; llama.cpp's ``convert_hf_to_gguf``).

The functions here name the checkpoint tensors a fused parameter is made of and make it, so a
weight source hands out module-named tensors (``spec.WeightSource``) whatever the file, and a
shard directory stores the fused form. A span of a mixture-of-experts model thus holds all the
experts of its own blocks and nothing of the others'. No I/O here (the caller passes ``read``),
no transformers, and torch only when a function runs: the family registry imports this module,
and ``layerchain.model.spec`` must stay cheap to import (tests/test_model_imports.py).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FUSED_GATE_UP = "mlp.experts.gate_up_proj"  # [E, 2I, H]
FUSED_DOWN = "mlp.experts.down_proj"  # [E, H, I]


@dataclass(frozen=True)
class ExpertLayout:
    """Where a family's Hugging Face checkpoints keep one block's router and experts."""

    module: str  # the MoE module's name in checkpoints ("mlp"; mixtral: "block_sparse_moe")
    gate: str  # per-expert matrix names: gate [I, H], up [I, H], down [H, I]
    up: str
    down: str
    count: str  # the config attribute holding E ("num_experts"; mixtral: "num_local_experts")


QWEN_EXPERTS = ExpertLayout("mlp", "gate_proj", "up_proj", "down_proj", "num_experts")  # + olmoe
MIXTRAL_EXPERTS = ExpertLayout("block_sparse_moe", "w1", "w3", "w2", "num_local_experts")


def checkpoint_name(layout: ExpertLayout, name: str) -> str:
    """The checkpoint name of module tensor ``name`` (relative to the layer) when it is stored
    as it is: the router and everything outside the MoE module (mixtral renames ``mlp.``)."""
    if name.startswith("mlp."):
        return f"{layout.module}.{name.removeprefix('mlp.')}"
    return name


def expert_parts(layout: ExpertLayout, name: str, num_experts: int) -> tuple[str, ...]:
    """Checkpoint names (relative to the layer) of the per-expert matrices fused into module
    tensor ``name``, in the order ``fuse_experts`` takes them; () when ``name`` is not fused."""
    if name == FUSED_GATE_UP:
        kinds: tuple[str, ...] = (layout.gate, layout.up)
    elif name == FUSED_DOWN:
        kinds = (layout.down,)
    else:
        return ()
    prefix = f"{layout.module}.experts"
    return tuple(f"{prefix}.{e}.{kind}.weight" for kind in kinds for e in range(num_experts))


def fuse_experts(name: str, parts: Sequence[torch.Tensor], num_experts: int) -> torch.Tensor:
    """The fused tensor ``name`` from its per-expert matrices (``expert_parts`` order):
    gate_up [E, 2I, H] = cat(stack(gates), stack(ups), dim=1); down [E, H, I] = stack(downs)."""
    import torch

    if name == FUSED_GATE_UP:
        gates, ups = torch.stack(list(parts[:num_experts])), torch.stack(list(parts[num_experts:]))
        return torch.cat((gates, ups), dim=1)
    return torch.stack(list(parts))  # [E, H, I]


def hf_block_state(
    layout: ExpertLayout,
    num_experts: int,
    names: Iterable[str],
    prefix: str,
    stored: Container[str],
    read: Callable[[dict[str, str]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Module-named tensors of one block from a Hugging Face checkpoint.

    ``prefix``: the block's checkpoint prefix (``model.layers.{i}.``); ``stored``: the names
    the checkpoint has; ``read({key: checkpoint name}) -> {key: tensor}`` reads them all at once.
    A tensor stored under its module name (a checkpoint saved fused) is read as it is; a fused
    one otherwise is made from its experts' matrices; the rest under ``checkpoint_name``."""
    plain: dict[str, str] = {}
    fused: dict[str, tuple[str, ...]] = {}
    for name in names:
        parts = () if prefix + name in stored else expert_parts(layout, name, num_experts)
        if parts:
            fused[name] = parts
        else:
            plain[name] = prefix + (name if prefix + name in stored else checkpoint_name(layout, name))
    wanted = dict(plain)
    for name, parts in fused.items():
        wanted.update({f"{name}#{i}": prefix + part for i, part in enumerate(parts)})
    got = read(wanted)
    out = {name: got[name] for name in plain}
    for name, parts in fused.items():
        out[name] = fuse_experts(name, [got[f"{name}#{i}"] for i in range(len(parts))], num_experts)
    return out


def gguf_expert_parts(name: str, index: int) -> tuple[str, ...]:
    """GGUF tensor names whose stacked tensors make fused ``name`` of block ``index``, in the
    order ``fuse_stacked`` takes them; () when ``name`` is not fused."""
    if name == FUSED_GATE_UP:
        return (f"blk.{index}.ffn_gate_exps.weight", f"blk.{index}.ffn_up_exps.weight")
    if name == FUSED_DOWN:
        return (f"blk.{index}.ffn_down_exps.weight",)
    return ()


def fuse_stacked(name: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fused ``name`` from a GGUF file's stacked tensors: gate_up [E, 2I, H] =
    cat(gate [E, I, H], up [E, I, H], dim=1); down [E, H, I] as stored."""
    import torch

    return torch.cat(list(parts), dim=1) if name == FUSED_GATE_UP else parts[0]

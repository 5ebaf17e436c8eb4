"""The model runtime: spans of decoder blocks, the head, tokenizers, sampling. No networks.

What a node needs::

    spec = resolve_model(DEFAULT_MODEL)      # "smollm2", or a .gguf path, a HF dir, a shard dir
    span = load_span(spec, 7, 23)            # only blocks 7..22 are read and held
    cache = span.new_cache(max_length=2048)  # one per session
    out = span.forward(hidden, cache)        # [B, T, H] -> [B, T, H], positions continue

What a client needs (the decode loop; ``generate.Decoder`` implements it without I/O)::

    head, tok = load_head(spec), load_tokenizer(spec)
    ids = encode_prompt(tok, "What is the capital of France?")   # chat template applied
    sampler, stop = Sampler(params), StopChecker(tok, params)
    hidden = head.embed(torch.tensor([ids]))                      # [1, P, H]
    history = list(ids)
    while True:
        for hop in route:                                         # spans 0..L in order
            hidden = hop.forward(hidden)                          # each hop keeps its cache
        token = sampler.next_token(head.logits(hidden[:, -1:])[0, -1], history)
        history.append(token)
        text, done = stop.feed(token)                             # stream ``text``
        if done:
            break
        hidden = head.embed(torch.tensor([[token]]))              # [1, 1, H]

``generate_local`` runs exactly this with one span over all blocks: the reference output.

Modules, each importing only those above it (no cycle)::

    family_experts                     MoE checkpoints' per-expert matrices -> fused experts
    families  digest  gguf_file        the family registry, content ids, the GGUF reader
    device                             --device names -> torch devices, the reply dtype rule
    shape                              ModelShape: what the head needs of a config
    spec                               the ModelSpec record and the WeightSource protocol
    params                             SamplingParams, a plain record
    tokenizer  span  head  sampling    what runs: built from a spec
    light_tokenizer                    the client's tokenizer from its card (no transformers)
    weights  shards                    weight sources: GGUF, HF directory, shard directory
    manifest                           a model's shard manifest from any source; the id is its hash
    resolve                            a model reference -> ModelSpec (knows every source)
    manifest_worker                    a node's manifest built in a child process (no transformers)
    generate                           the decode loop and the single-process reference

Model ids, file formats and the exactness contract are described in ``manifest``,
``shards`` and ``span``. transformers (about 1 s to import) loads when a model is first resolved, not
when this package is imported; nor does torch: the names below load their module on first
use (PEP 562), so ``layerchain.model.spec`` or ``.params`` is cheap to import (the CLI's
start-up, ``tests/test_startup.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from layerchain.model.generate import DecodeResult, Decoder, LocalModel, generate_local
    from layerchain.model.head import Head, load_head
    from layerchain.model.params import SamplingParams
    from layerchain.model.sampling import Sampler, StopChecker
    from layerchain.model.resolve import resolve_model
    from layerchain.model.shards import convert_to_shards, read_manifest, verify_file
    from layerchain.model.span import KVCache, SpanModel, causal_mask, load_span
    from layerchain.model.spec import DEFAULT_MODEL, ModelSpec
    from layerchain.model.tokenizer import encode_prompt, load_tokenizer

_LAZY = {  # name -> the module defining it
    "DecodeResult": "layerchain.model.generate",
    "Decoder": "layerchain.model.generate",
    "LocalModel": "layerchain.model.generate",
    "generate_local": "layerchain.model.generate",
    "Head": "layerchain.model.head",
    "load_head": "layerchain.model.head",
    "Sampler": "layerchain.model.sampling",
    "SamplingParams": "layerchain.model.params",
    "StopChecker": "layerchain.model.sampling",
    "resolve_model": "layerchain.model.resolve",
    "convert_to_shards": "layerchain.model.shards",
    "read_manifest": "layerchain.model.shards",
    "verify_file": "layerchain.model.shards",
    "KVCache": "layerchain.model.span",
    "SpanModel": "layerchain.model.span",
    "causal_mask": "layerchain.model.span",
    "load_span": "layerchain.model.span",
    "DEFAULT_MODEL": "layerchain.model.spec",
    "ModelSpec": "layerchain.model.spec",
    "encode_prompt": "layerchain.model.tokenizer",
    "load_tokenizer": "layerchain.model.tokenizer",
}

__all__ = [
    "DEFAULT_MODEL",
    "DecodeResult",
    "Decoder",
    "Head",
    "KVCache",
    "LocalModel",
    "ModelSpec",
    "Sampler",
    "SamplingParams",
    "SpanModel",
    "StopChecker",
    "causal_mask",
    "convert_to_shards",
    "encode_prompt",
    "generate_local",
    "load_head",
    "load_span",
    "load_tokenizer",
    "read_manifest",
    "resolve_model",
    "verify_file",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value

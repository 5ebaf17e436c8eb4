"""A model's form (``--dtype``) is part of its id (``ModelSpec.in_form``).

A span in int8 returns hidden states further from fp32's than an audit tolerates
(docs/BENCHMARKS.md, "Compact weights"), so an int8 node must never be routed with, audited
against or judged by an fp32 recomputation: each form is a model of its own. These tests
fail if the form stops being part of the id (an fp32 client would then find int8 nodes and
its audits would accuse them).
"""

from __future__ import annotations

import asyncio

import pytest
from memswarm import MemorySwarm

from layerchain.client import AsyncSwarm, ClientConfig
from layerchain.discovery import MemoryDiscovery
from layerchain.errors import ConfigError, LayerchainError
from layerchain.model import LocalModel, SamplingParams, load_head, load_span, load_tokenizer
from layerchain.model.spec import form_model_id
from layerchain.wire import MemoryTransport

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def test_each_form_has_its_own_id_and_fp32_keeps_the_weights_id(smollm2_spec):
    fp32 = smollm2_spec.in_form("fp32")
    assert fp32.model_id == smollm2_spec.model_id == smollm2_spec.weights_id
    ids = {name: smollm2_spec.in_form(name).model_id for name in ("bf16", "fp16", "int8", "int4")}
    assert len(set(ids.values())) == 4 and smollm2_spec.model_id not in ids.values()
    int8 = smollm2_spec.in_form("int8")
    assert int8.weights_id == smollm2_spec.weights_id and int8.dtype == "int8"
    assert int8 != smollm2_spec and int8.in_form("fp32") == smollm2_spec  # round trip
    assert form_model_id(smollm2_spec.weights_id, "int8") == int8.model_id  # deterministic
    for bad in ("auto", "int3"):
        with pytest.raises(ConfigError):
            smollm2_spec.in_form(bad)


def test_a_span_and_head_load_in_their_specs_form(tiny_model):
    from layerchain.model import resolve_model

    spec = resolve_model(tiny_model)
    fp32, int8 = load_span(spec, 0, 2), load_span(spec.in_form("int8"), 0, 2)
    assert int8.spec.model_id != fp32.spec.model_id
    assert int8.parameter_bytes() < fp32.parameter_bytes() / 2  # the int8 matrices, not fp32
    assert load_span(spec.in_form("int8"), 0, 2, dtype="fp32").parameter_bytes() == fp32.parameter_bytes()


def test_an_fp32_client_does_not_route_through_int8_nodes_and_an_int8_client_does(
    tiny_model, tmp_path
):
    async def main():
        swarm = MemorySwarm(tiny_model)
        fp32 = swarm.spec
        swarm.spec = fp32.in_form("int8")  # the nodes serve the int8 form
        try:
            for start, end in ((0, 2), (2, 4)):
                await swarm.add_node(start, end, tmp_path)
            plain = AsyncSwarm(
                spec=fp32, head=load_head(fp32), tokenizer=load_tokenizer(fp32),
                discovery=MemoryDiscovery(swarm.hub), transport=MemoryTransport(swarm.wire),
                config=ClientConfig(discovery_wait_s=0.5),
            )
            with pytest.raises(LayerchainError):  # nobody serves the fp32 model here
                await plain.generate(PROMPT, PARAMS)
            return await swarm.client().generate(PROMPT, PARAMS)
        finally:
            await swarm.close()

    result = asyncio.run(asyncio.wait_for(main(), 120))
    from layerchain.model import resolve_model

    local = LocalModel(resolve_model(tiny_model), dtype="int8")
    assert result.token_ids == local.generate(PROMPT, PARAMS).token_ids

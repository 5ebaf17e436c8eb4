"""End to end: a 3-node swarm holding its weights in int8 (`swarm up --dtype int8`).

A chain of int8 spans computes what one int8 process computes (the same kernels on the same
inputs, block by block), so the swarm must match ``LocalModel(dtype="int8")`` token for token;
and that process agrees with fp32 above ``quant.AGREEMENT_FLOOR`` (teacher-forced greedy
tokens, ``bench.compute``), so the swarm does too.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from layerchain.cli.main import app
from layerchain.local import LocalSwarm, swarm_down
from layerchain.model import DEFAULT_MODEL, LocalModel, SamplingParams, resolve_model
from layerchain.model.quant import AGREEMENT_FLOOR

pytestmark = pytest.mark.slow

PROMPTS = ["Name three rivers in Europe.", "What is the capital of France?"]
PARAMS = SamplingParams(max_new_tokens=24)


@pytest.fixture(scope="module")
def int8_swarm(tmp_path_factory):
    state = tmp_path_factory.mktemp("swarm-int8")
    # `swarm up` in this process (the nodes are processes of their own): no interpreter start
    done = CliRunner().invoke(app, ["swarm", "up", "--state-dir", str(state), "--nodes", "3",
                                    "--dtype", "int8"])
    assert done.exit_code == 0, done.output
    yield LocalSwarm.load(state)
    swarm_down(state, quiet=True)


def test_int8_swarm_matches_int8_process_and_agrees_with_fp32(int8_swarm):
    from layerchain.bench.compute import greedy_continuation, prompt_ids, teacher_forced_agreement
    from layerchain.client import Swarm

    spec = resolve_model(DEFAULT_MODEL)
    local = LocalModel(spec, dtype="int8")
    expected = [local.generate(p, PARAMS).token_ids for p in PROMPTS]
    with Swarm(int8_swarm.initial_peers, model=DEFAULT_MODEL, dtype="int8") as client:
        got = [client.generate(p, PARAMS).token_ids for p in PROMPTS]
    assert got == expected
    # bench.compute.agreement_with_fp32(spec, ["int8"], tokens=16, prompts=PROMPTS), with the
    # int8 process above (quantized once, not twice)
    encoded = prompt_ids(spec, PROMPTS)
    fp32 = LocalModel(spec)
    references = [greedy_continuation(fp32, ids, 16) for ids in encoded]
    del fp32
    scores = [teacher_forced_agreement(local, ids, ref) for ids, ref in zip(encoded, references)]
    assert sum(scores) / len(scores) >= AGREEMENT_FLOOR, scores


def test_swarm_up_refuses_an_unknown_dtype_before_starting_nodes(tmp_path):
    done = CliRunner().invoke(app, ["swarm", "up", "--state-dir", str(tmp_path), "--nodes", "1",
                                    "--dtype", "bogus"])
    assert done.exit_code != 0 and "dtype" in done.output
    assert not (tmp_path / "swarm.json").exists()  # refused before any process started

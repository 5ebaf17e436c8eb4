"""End to end (issue 20.2): a swarm of node processes serving two models lists both, with
their coverage, in ``layerchain models --json`` (the real command, joined to the real DHT).

The models: SmolLM2 (the GGUF file; one node over blocks 0:4 of 30, so its listing shows a
partial coverage) and a tiny random llama (a Hugging Face directory, 4 blocks; two nodes over
0:2 and 1:4, so block 1 has two replicas). One swarm, started once, three nodes at once.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from typer.testing import CliRunner

from layerchain.cli.main import app
from layerchain.cli.models import read_models
from layerchain.local import LocalSwarm, swarm_down
from layerchain.local.launcher import (
    process_start,
    start_bootstrap,
    start_node,
    stop_pids,
    wait_ready,
)
from layerchain.model import DEFAULT_MODEL, resolve_model
from layerchain.types import Span

pytestmark = pytest.mark.slow

LISTED_WITHIN_S = 60.0  # nodes announce their catalog entry once their manifest is built


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_model_dir, smollm2_spec):
    # smollm2_spec: SmolLM2's manifest (its id) is built once in this session's
    # LAYERCHAIN_HOME, which the nodes inherit, instead of by a node as it starts
    state = tmp_path_factory.mktemp("swarm-catalog")
    tiny = str(tiny_model_dir("llama"))
    pid, peers = start_bootstrap(state)
    swarm = LocalSwarm(state, peers, pid, bootstrap_started=process_start(pid))
    swarm.save()
    try:
        procs = [start_node(state, f"node-{i}", span, peers, model=model)
                 for i, (model, span) in enumerate([(DEFAULT_MODEL, Span(0, 4)),
                                                    (tiny, Span(0, 2)), (tiny, Span(1, 4))])]
        for proc, _ in procs:
            swarm.nodes.append({"pid": proc.pid, "started": process_start(proc.pid)})
        swarm.save()
        for i, (proc, data_dir) in enumerate(procs):
            swarm.nodes[i] = wait_ready(proc, data_dir, state / f"node-{i}.log", 180)
        swarm.save()
    except BaseException:
        swarm_down(state, quiet=True)
        raise
    yield swarm, tiny
    swarm_down(state, quiet=True)


def test_models_json_lists_both_models_with_their_coverage(two_models):
    swarm, tiny = two_models
    smol, small = resolve_model(DEFAULT_MODEL), resolve_model(tiny)  # cached: cheap
    deadline = time.monotonic() + LISTED_WITHIN_S
    while True:  # the listing settles once every node has announced (entry, then records)
        listed = {m.model_id: m for m in asyncio.run(read_models(swarm.initial_peers))}
        servers = {i: m.coverage.servers for i, m in listed.items()}
        if servers == {smol.model_id: 1, small.model_id: 2} or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    result = CliRunner().invoke(app, ["models", "--initial-peers", swarm.initial_peers[0],
                                      "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["model_id"]: row for row in json.loads(result.stdout)["models"]}
    assert set(rows) == {smol.model_id, small.model_id}, rows
    assert rows[smol.model_id] == {
        "model_id": smol.model_id, "name": smol.name, "family": "llama", "num_blocks": 30,
        "hidden_size": 576, "dtype": "fp32", "servers": 1, "blocks_served": 4,
        "replicas": [1] * 4 + [0] * 26, "throughput_tokens_per_s": 0.0}
    row = rows[small.model_id]
    assert (row["num_blocks"], row["hidden_size"], row["servers"], row["blocks_served"]) == \
        (4, 64, 2, 4)
    assert row["replicas"] == [1, 2, 1, 1] and row["throughput_tokens_per_s"] > 0


def test_a_stopped_node_leaves_the_catalog_and_the_coverage(two_models):
    """SIGTERM: the node withdraws its catalog entry and its records before it exits."""
    swarm, tiny = two_models
    small = resolve_model(tiny)
    stop_pids([swarm.processes()[2]])  # the tiny model's node over 1:4
    listed = {m.model_id: m for m in asyncio.run(read_models(swarm.initial_peers))}
    left = listed[small.model_id]
    assert left.announced_by == 1 and left.coverage.servers == 1
    assert left.coverage.replicas == (1, 1, 0, 0) and left.coverage.throughput_tokens_per_s == 0

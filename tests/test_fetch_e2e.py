"""End to end (issue 20.3): a node with nothing local fetches its span from two others, one
of which corrupts every piece it seeds (refused by name, fetched from the other), then
serves; a client with nothing local fetches the head and tokenizer the same way; the text
through the fetched node is the single-process reference's, token for token."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from typer.testing import CliRunner

from layerchain.cli.main import app
from layerchain.local import swarm_down, swarm_up
from layerchain.local.launcher import start_node, wait_ready
from layerchain.model import DEFAULT_MODEL, SamplingParams, resolve_model
from layerchain.model.shards import block_file
from layerchain.types import Span

pytestmark = pytest.mark.slow

PROMPT = "Name three rivers in Europe."
PARAMS = SamplingParams(max_new_tokens=6)
FETCHED = Span(10, 13)  # the fetching node's span: free, so a price-only route goes through it


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """Two priced seeders, 0:13 and 10:30 (the second corrupts what it seeds), and a free
    node started with ``--model MODEL_ID --blocks 10:13`` and an empty LAYERCHAIN_HOME."""
    state = tmp_path_factory.mktemp("fetch-swarm")
    model_id = resolve_model(DEFAULT_MODEL).model_id  # the GGUF's id: its manifest's hash
    # both hold the fetched span 10:13; together they cover the model without the fetcher
    swarm = swarm_up(state, [Span(0, 13), Span(10, 30)],
                     node_args=[("--price", "1"), ("--price", "1", "--seed-misbehave", "corrupt")])
    home = tmp_path_factory.mktemp("fetcher-home")
    proc = None
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("LAYERCHAIN_HOME", str(home))  # nothing of the model there
            proc, data_dir = start_node(state, "fetcher", FETCHED, swarm.initial_peers,
                                        model=model_id, extra_args=("--price", "0"))
        node = wait_ready(proc, data_dir, state / "fetcher.log", timeout_s=180)
        yield swarm, node, model_id, home, state
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        swarm_down(state, quiet=True)


def test_a_node_fetches_its_span_from_peers_refusing_a_liar_then_serves_exactly(
    fetched, reference, tmp_path, monkeypatch
):
    swarm, node, model_id, home, state = fetched
    liar = swarm.nodes[1]["peer_id"]
    fetched_dir = home / "models" / model_id
    assert sorted(p.name for p in fetched_dir.iterdir()) == sorted(
        ["manifest.json", *(block_file(i) for i in range(FETCHED.start, FETCHED.end))])
    log = (state / "fetcher.log").read_text()
    assert f"from {liar}" in log and "refused block_0" in log  # the liar's files, by name

    client_home = tmp_path / "client-home"  # the client has nothing local either
    monkeypatch.setenv("LAYERCHAIN_HOME", str(client_home))
    # `layerchain generate` in this process (CliRunner): no interpreter start of its own
    done = CliRunner().invoke(app, [
        "generate", "--model", model_id, "--prompt", PROMPT,
        "--max-new-tokens", str(PARAMS.max_new_tokens), "--alpha", "1", "--json",
        *[arg for peer in swarm.initial_peers for arg in ("--initial-peers", peer)]])
    assert done.exit_code == 0, done.output[-2000:]
    result = json.loads(done.stdout)
    assert {"peer_id": node["peer_id"], "start": FETCHED.start, "end": FETCHED.end} in (
        result["route"])  # the cheapest route goes through the fetched span
    assert result["token_ids"] == list(reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids)
    assert (client_home / "models" / model_id / "head.safetensors").is_file()

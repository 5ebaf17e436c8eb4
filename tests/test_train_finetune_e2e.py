"""Fine-tuning through a 3-node local swarm of real processes (the default model): the loss
on the shipped task (examples/finetune/pirate.jsonl) falls below a threshold in a few steps,
a node killed with -9 mid-step is replaced by its replica and the run goes on, the trained
adapter changes the greedy answer as intended (``generate --adapter``), and ``train
finetune`` writes its adapter, loss curve, job record and JSON."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layerchain.cli.main import app
from layerchain.local import swarm_down, swarm_up
from layerchain.model import SamplingParams
from layerchain.train.data import encode, read_records
from layerchain.train.finetune import FinetuneConfig, Trainer, train, write_outputs
from layerchain.train.jobs import JobStore
from layerchain.train.remote import RemoteBlocks
from layerchain.types import Span

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

TASK = Path(__file__).parents[1] / "examples" / "finetune" / "pirate.jsonl"
HELD_OUT = "What is the capital of Peru?"  # not in the task
GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    state = tmp_path_factory.mktemp("finetune-swarm")
    local = swarm_up(state, [Span(0, 15), Span(15, 30), Span(15, 30)], insecure=True)
    try:
        yield local
    finally:
        swarm_down(state, quiet=True)


def test_lora_through_three_nodes_learns_the_style_and_survives_a_kill(swarm, tmp_path):
    from layerchain.client import Swarm

    pids = {n["peer_id"]: n["pid"] for n in swarm.nodes}
    killed: list[int] = []
    with Swarm(swarm.initial_peers, insecure=True, audit_rate=0.0) as client:
        core = client.core
        before = client.generate(HELD_OUT, GREEDY).text
        examples = [encode(r, core.tokenizer) for r in read_records(TASK)]
        trainer = Trainer(core.spec, core.head, FinetuneConfig(method="lora", steps=6,
                                                               batch_size=2, lr=0.03))
        blocks = RemoteBlocks(core, client.run)

        class KillOnThirdStep:
            """The swarm's blocks; at the third step the route's 15:30 node is killed -9
            after the session opened, before its forward."""

            def __init__(self) -> None:
                self.steps = 0

            @contextlib.contextmanager
            def open(self, max_tokens, requests):
                self.steps += 1
                with blocks.open(max_tokens, requests) as through:
                    if self.steps == 3:
                        victim = blocks.current.hops[-1].hop.peer_id
                        os.kill(pids[victim], signal.SIGKILL)
                        killed.append(pids[victim])
                    yield through

        stats = train(trainer, examples, KillOnThirdStep())
        result = write_outputs(trainer, stats, tmp_path / "adapter")
    losses = [s.loss for s in stats]
    assert len(killed) == 1 and len(stats) == 6  # the steps after the kill completed
    assert blocks.recoveries == 1
    assert losses[0] > 4.0 and min(losses[-2:]) < 2.5, losses  # measured: 4.8 -> ~1.4
    assert (tmp_path / "adapter" / "loss.png").stat().st_size > 0
    assert result.tokens_per_s > 0
    # the greedy answer now starts as the task's answers do
    out = CliRunner().invoke(app, [
        "generate", "--initial-peers", swarm.initial_peers[0], "--insecure", "--adapter",
        str(tmp_path / "adapter"), "--prompt", HELD_OUT, "-n", "4", "--temperature", "0",
        "--audit-rate", "0", "--json"])
    assert out.exit_code == 0, out.output
    after = json.loads(out.stdout.strip().splitlines()[-1])["text"]
    assert not before.startswith("Arr") and after.startswith("Arr!"), (before, after)


def test_train_finetune_command_prompt_tuning(swarm, tmp_path):
    out = tmp_path / "prompt"
    result = CliRunner().invoke(app, [
        "train", "finetune", "--initial-peers", swarm.initial_peers[0], "--insecure",
        "--data", str(TASK), "--method", "prompt", "--steps", "1", "--batch-size", "1",
        "--virtual-tokens", "4", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) == {"steps", "loss_first", "loss_last", "tokens_per_s", "out"}
    assert summary["steps"] == 1 and summary["loss_first"] > 0 and summary["out"] == str(out)
    assert {p.name for p in out.iterdir()} >= {"adapter.json", "adapter.safetensors", "loss.png"}
    assert json.loads((out / "adapter.json").read_text())["virtual_tokens"] == 4
    job = next(j for j in JobStore().list() if j.out == str(out))
    assert job.kind == "finetune" and job.status == "done" and len(job.losses) == 1
    assert job.peers  # the peers that computed its forward and backward

"""``layerchain train dp`` with real processes on a real DHT (a bootstrap process): two peers
train a tiny llama data-parallel, taking their shards from the run's roster; a third joins
mid-run from the latest checkpoint; the two that ran the whole run hold the same parameters
after averaging (to one late step), and the joiner is near them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from layerchain.train.dp import CHECKPOINT_RE
from layerchain.train.dp_bench import wait_for_file
from layerchain.train.jobs import JobStore

pytestmark = pytest.mark.slow

STEPS = 6  # the run's global optimizer steps
JOIN_AT = 2  # the third peer starts once a checkpoint of this epoch exists
TIMEOUT_S = 240.0


# The joining peer's process imports torch, transformers and hivemind first, then waits for
# the run's checkpoint of epoch JOIN_AT before it runs `layerchain train dp`: so it joins
# mid-run however slow start-up is on a loaded machine.
JOINER = """
import sys, time
from pathlib import Path
import torch, transformers.models.llama.modeling_llama
from hivemind import Optimizer
from layerchain.train.dp import CHECKPOINT_RE, latest_checkpoint
directory, join_at = Path(sys.argv[1]), int(sys.argv[2])
while True:
    path = latest_checkpoint(directory)
    if path is not None and int(CHECKPOINT_RE.match(path.name).group(1)) >= join_at:
        break
    time.sleep(0.1)
sys.argv = ["layerchain", *sys.argv[3:]]
from layerchain.cli.main import main
main()
"""


def _popen(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "layerchain", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _popen_joiner(directory: Path, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", JOINER, str(directory), str(JOIN_AT), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str], deadline: float) -> dict:
    out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _epoch(path: Path | None) -> int:
    match = CHECKPOINT_RE.match(path.name) if path else None
    return int(match.group(1)) if match else -1


def _params(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_peers_average_and_a_joining_peer_starts_from_the_latest_checkpoint(
    tiny_model_dir, tmp_path: Path
) -> None:
    model = tiny_model_dir("llama", tokenizer=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(
        json.dumps({"text": f"Item {i} is {('red', 'blue', 'green')[i % 3]} and weighs {i} g."})
        + "\n" for i in range(24)))
    checkpoints = tmp_path / "checkpoints"
    addresses = tmp_path / "bootstrap.addr"
    procs: list[subprocess.Popen[str]] = []
    boot = subprocess.Popen(
        [sys.executable, "-m", "layerchain.discovery.bootstrap", "--host", "127.0.0.1",
         "--port", "0", "--print-addresses-to", str(addresses)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = wait_for_file(addresses, 60.0, boot).splitlines()[0]
        common = ["train", "dp", "--initial-peers", address, "--data", str(data),
                  "--model", str(model), "--shard-strategy", "hash", "--steps", str(STEPS),
                  "--target-batch-size", "8", "--batch-size", "2", "--lr", "3e-3",
                  "--max-tokens", "24", "--matchmaking-time", "2", "--run-id", "e2e",
                  "--checkpoint-dir", str(checkpoints), "--json"]
        deadline = time.monotonic() + TIMEOUT_S
        procs += [_popen([*common, "--min-peers", "2"]) for _ in range(2)]
        procs.append(_popen_joiner(checkpoints / "e2e", common))  # no --min-peers
        first, second, joiner = (_result(p, deadline) for p in procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)  # reaps it and closes its pipes
        boot.terminate()
        boot.wait(10)

    # the first two took disjoint shards from the roster and trained together to the end
    assert {first["shard"], second["shard"]} == {"0/2", "1/2"}
    assert first["steps"] == second["steps"] == joiner["steps"] == STEPS
    assert set(first["peers"]) >= {first["peers"][0], second["peers"][0]}
    assert first["loss_last"] < first["loss_first"]

    # the joiner started from the newest checkpoint there was, not from scratch
    assert JOIN_AT <= joiner["start_epoch"] < STEPS and joiner["local_steps"] > 0
    assert _epoch(Path(joiner["resumed_from"])) == joiner["start_epoch"]

    # averaging: the peers hold the same parameters, which moved away from the start
    a, b, c = (_params(r["checkpoint"]) for r in (first, second, joiner))
    from safetensors.torch import load_file

    start = {f"{k}": v for k, v in load_file(model / "model.safetensors").items()}
    moved = max(float((a[k] - start[k]).abs().max()) for k in start if k in a)
    assert moved > 1e-3
    # equal when they averaged every round; averaging never waits for a late peer, so on a
    # loaded machine one of them may take its last step alone (one step apart, ~lr): apart
    # from the first round on (no averaging), they would be about `moved` apart
    assert _max_diff(a, b) < moved / 3
    # the joiner followed the run from its checkpoint (it may finish its last step alone
    # when the others have left: averaging never waits for a late peer)
    assert _max_diff(a, c) < moved / 2

    # every peer wrote its job record: kind, losses, peers, checkpoints
    for result in (first, second, joiner):
        job = JobStore().get(result["job_id"])
        assert job.kind == "dp" and job.status == "done"
        assert job.step == STEPS and job.losses and job.checkpoints[-1] == result["checkpoint"]
    assert len(JobStore().get(first["job_id"]).peers) >= 2

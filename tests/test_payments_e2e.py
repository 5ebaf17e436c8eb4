"""End to end on a 3-node priced swarm of real processes: `layerchain demo --json`.

The nodes charge 1, 2 and 3 credits per block per token, the client pays through channels
on one SQLite ledger file, the nodes redeem; afterwards every node's credits must equal its
reservation fee (opening the session) plus the tokens it computed x its blocks x its price,
the client must have spent exactly their sum, and `layerchain ledger verify` must pass on
the ledger file, anchored by the checkpoints the nodes kept in their data directories.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from layerchain.cli.main import app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def layerchain(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "layerchain", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def test_demo_pays_each_node_tokens_times_blocks_times_price(tmp_path):
    from layerchain.market import reservation_amount
    from layerchain.model import load_tokenizer, resolve_model
    from layerchain.model.tokenizer import encode_prompt

    prompt = "What is the capital of France?"
    done = layerchain(
        "demo", "--json", "--state-dir", str(tmp_path), "--prompt", prompt,
        "--max-new-tokens", "12", "--prices", "1,2,3", "--credits", "500000",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["text"] == "The capital of France is Paris."

    prompt_tokens = len(encode_prompt(load_tokenizer(resolve_model("smollm2")), prompt))
    tokens = prompt_tokens + len(out["token_ids"]) - 1  # the last token is never pushed
    max_length = prompt_tokens + 12  # each hop's cache reservation
    payments = out["payments"]
    assert [n["price"] for n in payments["nodes"]] == [1, 2, 3]
    for node in payments["nodes"]:
        assert node["address"].startswith("0x") and len(node["address"]) == 42
        assert node["blocks"] == 10
        assert node["tokens"] == tokens
        fee = reservation_amount(max_length, node["blocks"], node["price"])
        assert node["earned"] == fee + tokens * node["blocks"] * node["price"]
    assert payments["client_spent"] == sum(n["earned"] for n in payments["nodes"])

    ledger = str(tmp_path / "ledger.sqlite")
    checkpoints = sorted(tmp_path.glob("**/checkpoints.jsonl"))
    # one per node (after each redemption round) and the client's (its channel opens/closes)
    assert sorted(p.parent.name for p in checkpoints) == ["client", "node-0", "node-1", "node-2"]
    args = [a for path in checkpoints for a in ("--checkpoints", str(path))]
    # the ledger commands in this process (CliRunner): two interpreter starts fewer
    verify = CliRunner().invoke(app, ["ledger", "verify", "--ledger", ledger, "--data-dir",
                                      str(tmp_path), *args, "--json"])
    assert verify.exit_code == 0, verify.output
    assert json.loads(verify.stdout)["anchored_seq"] > 0
    listed = CliRunner().invoke(app, ["ledger", "status", "--ledger", ledger, "--json"])
    assert listed.exit_code == 0, listed.output
    status = json.loads(listed.stdout)
    channels = status["channels"]
    assert len(channels) == 3
    assert sorted(c["redeemed"] for c in channels) == [n["earned"] for n in payments["nodes"]]

"""`layerchain bench verify --quick`: the harness runs every cheating mode and an honest swarm.

On the tiny random llama (fast); the figures of record come from the default model
(docs/BENCHMARKS.md). Asserted: the exact JSON fields of issue 14, every cheater caught in
every run, no false alarm among honest nodes, the commitment's size.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from layerchain.cli.main import app
from layerchain.node.misbehave import MODES


@pytest.mark.slow
def test_bench_verify_quick(tiny_model_dir):
    model = tiny_model_dir("llama", tokenizer=True)
    result = CliRunner().invoke(app, ["bench", "verify", "--quick", "--model", str(model), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert {"audit_rate", "modes", "honest_audited_steps", "false_positives",
            "commitment_bytes_per_token", "overhead_ratio"} <= set(report)
    assert [m["mode"] for m in report["modes"]] == list(MODES)
    for m in report["modes"]:
        assert set(m) >= {"mode", "runs", "detected", "tokens_to_detect_p50"}
        assert m["detected"] == m["runs"] == 2 and m["false_alarms"] == m["failed"] == 0, m
        assert m["tokens_to_detect_p50"] <= (64 if m["mode"] == "sometimes" else 16), m
    assert report["honest_audited_steps"] >= 200 and report["false_positives"] == 0
    assert report["honest_failed_generations"] == 0
    assert report["commitment_bytes_per_token"] <= 16
    assert report["overhead_ratio"] > 0

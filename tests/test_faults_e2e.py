"""kill -9 a hop of the active route at random tokens: every generation completes unchanged.

Real node processes on loopback with a spare for each span; each killed node is restarted
with the same identity and must rejoin and serve later runs (``bench faults`` does this).
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_ten_kills_at_random_tokens_never_change_the_answer():
    from layerchain.bench.faults import run_faults_bench

    result = run_faults_bench(runs=10, max_new_tokens=20, seed=1)
    assert result["failures"] == []
    assert result["completed"] == 10
    assert result["identical"] == 10
    assert result["recoveries"] >= 10  # one kill per run, each recovered
    assert result["recovery_s_p50"] < 10

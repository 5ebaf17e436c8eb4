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


def test_a_stopped_hop_is_detected_within_the_step_timeout_and_routed_around(tmp_path):
    import os
    import signal
    import time

    from layerchain.client import Swarm
    from layerchain.localswarm import swarm_down, swarm_up
    from layerchain.model import LocalModel, SamplingParams, resolve_model
    from layerchain.types import Span

    prompt, params, timeout_s = "Write a short poem about the sea.", SamplingParams(max_new_tokens=12), 3.0
    reference = list(LocalModel(resolve_model("smollm2")).generate(prompt, params).token_ids)
    local = swarm_up(tmp_path, [Span(0, 15), Span(15, 30), Span(0, 15), Span(15, 30)])
    pid_of = {n["peer_id"]: n["pid"] for n in local.nodes}
    stopped: list[int] = []
    try:
        with Swarm(local.initial_peers, step_timeout_s=timeout_s) as client:
            result: list = []
            for event in client.stream(prompt, params, result=result):
                if event.index == 3:
                    stopped.append(pid_of[client.core.last_route[0].peer_id])
                    os.kill(stopped[0], signal.SIGSTOP)  # hangs: no reset, no reply
                    t_stop = time.monotonic()
            elapsed = time.monotonic() - t_stop
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        swarm_down(tmp_path, quiet=True)
    res = result[0]
    assert res.token_ids == reference
    assert len(res.recoveries) == 1 and res.recoveries[0].peer_id in pid_of
    assert pid_of[res.recoveries[0].peer_id] == stopped[0]
    assert "no reply" in res.recoveries[0].reason or "timeout" in res.recoveries[0].reason.lower()
    assert elapsed < timeout_s + 10  # detected within the step timeout, then recovered

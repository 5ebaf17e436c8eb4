"""Dead and hung peers never change the answer; a stopped or restarted node serves again.

Real node processes on loopback with a spare for each span:
* kill -9 a hop of the active route at random tokens (``bench faults``, 10 runs); each
  killed node is restarted with the same identity and rejoins for later runs;
* SIGSTOP a hop for 30 s: the client detects it within the step timeout and routes around
  it; while it is stopped, a node killed with -9 and restarted with the same identity must
  serve a route again; after SIGCONT (at 30 s, or once that restart is done if it took
  longer) the stopped node must serve a route again too.
Every generation is compared token for token with the single-process reference.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from layerchain.local import start_node, swarm_down, swarm_up, wait_ready
from layerchain.model import LocalModel, SamplingParams, resolve_model
from layerchain.types import Span

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "Write a short poem about the sea."
STOP_S = 30.0  # how long the hung hop stays stopped (the figure)
STEP_TIMEOUT_S = 3.0  # the client's step timeout: a hop silent this long is failed


def test_ten_kills_at_random_tokens_never_change_the_answer():
    from layerchain.bench.faults import run_faults_bench

    result = run_faults_bench(runs=10, max_new_tokens=20, seed=1)
    assert result["failures"] == []
    assert result["completed"] == 10
    assert result["identical"] == 10
    assert result["recoveries"] >= 10  # one kill per run, each recovered
    assert result["recovery_s_p50"] < 10


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _peer_ids(route) -> list[str]:
    return [hop.peer_id for hop in route]


def test_a_hop_stopped_for_30_s_is_routed_around_and_serves_again_and_a_killed_node_rejoins(
    tmp_path,
):
    from layerchain.client import Swarm

    params = SamplingParams(max_new_tokens=12)
    reference = LocalModel(resolve_model("smollm2")).generate(PROMPT, params).token_ids
    spans = [Span(0, 15), Span(15, 30), Span(0, 15), Span(15, 30)]
    local = swarm_up(tmp_path, spans)
    index_of = {n["peer_id"]: i for i, n in enumerate(local.nodes)}
    stopped_pid = None
    try:
        # Bans long enough that no generation tries the stopped node before the test lifts
        # its ban itself; the step timeout is what detects the hang.
        # audit_rate 0: tokens shown as computed (not once verified), so the SIGSTOP at
        # token 3 lands between steps
        with Swarm(local.initial_peers, step_timeout_s=STEP_TIMEOUT_S, ban_base_s=120.0,
                   audit_rate=0.0) as client:
            peers = client.core.peers

            # 1. SIGSTOP the first hop of the route at token 3: it hangs, no reset, no reply.
            gen = client.stream(PROMPT, params)
            for event in gen:
                if event.index == 3:
                    x = index_of[gen.route[0].peer_id]
                    stopped_pid = local.nodes[x]["pid"]
                    os.kill(stopped_pid, signal.SIGSTOP)
                    t_stop = time.monotonic()
                elif event.index == 4:
                    detected_s = time.monotonic() - t_stop  # the hung step, failover, the step
            first = gen.result
            x_id = local.nodes[x]["peer_id"]
            x_spare = next(n["peer_id"] for j, n in enumerate(local.nodes)
                           if j != x and spans[j] == spans[x])
            assert first.token_ids == reference
            assert [r.peer_id for r in first.recoveries] == [x_id]
            assert "no reply" in first.recoveries[0].reason
            assert _peer_ids(first.recoveries[0].replacement) == [x_spare]
            assert detected_s < STEP_TIMEOUT_S + 5.0, detected_s

            # 2. While it is stopped: kill -9 a node of the other span and restart it with
            #    the same identity (its data dir); a route must use it again.
            y = next(j for j, n in enumerate(local.nodes) if spans[j] != spans[x]
                     and n["peer_id"] in _peer_ids(first.route))
            old = local.nodes[y]
            os.kill(old["pid"], signal.SIGKILL)
            proc, data_dir = start_node(tmp_path, f"node-{y}", spans[y], local.initial_peers)
            local.replace_node(y, proc.pid)
            local.nodes[y] = wait_ready(proc, data_dir, tmp_path / f"node-{y}.log", 120)
            local.save()
            assert local.nodes[y]["peer_id"] == old["peer_id"]  # same identity, new process
            assert local.nodes[y]["endpoint"] != old["endpoint"]
            assert _alive(stopped_pid)
            y_spare = next(n["peer_id"] for j, n in enumerate(local.nodes)
                           if j != y and spans[j] == spans[y])
            peers.ban(y_spare, "test: leave the restarted node as the only one for its span")
            rejoined = client.generate(PROMPT, params)
            assert rejoined.token_ids == reference
            assert old["peer_id"] in _peer_ids(rejoined.route)
            assert x_id not in _peer_ids(rejoined.route) and not rejoined.recoveries

            # 3. SIGCONT after 30 s (more if the restart above took longer on a busy
            #    machine): the node is alive and serves a route again.
            time.sleep(max(0.0, t_stop + STOP_S - time.monotonic()))
            os.kill(stopped_pid, signal.SIGCONT)
            stopped_s = time.monotonic() - t_stop
            assert _alive(stopped_pid)
            peers.unban(x_id)
            peers.ban(x_spare, "test: leave the resumed node as the only one for its span")
            resumed = client.generate(PROMPT, params)
            assert resumed.token_ids == reference
            assert x_id in _peer_ids(resumed.route) and not resumed.recoveries
    finally:
        if stopped_pid is not None:
            try:
                os.kill(stopped_pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        swarm_down(tmp_path, quiet=True)
    assert stopped_s >= STOP_S
    print(f"stopped {stopped_s:.1f} s; failover at token 4 after {detected_s:.2f} s "
          f"(step timeout {STEP_TIMEOUT_S:g} s, recovery {first.recoveries[0].seconds:.2f} s)")

"""Benchmark: kill -9 a hop of the active route mid-generation; the answer must not change.

A local swarm with a spare for every span (by default ``0:15, 15:30`` three times each)
serves ``runs`` greedy generations. In each, at a random token, one random hop of the route
in use is killed with SIGKILL; the client must recover (ban, re-plan the missing span,
replay the kept inputs) and finish with exactly the reference tokens. The killed node is
restarted with the same identity right away, so it rejoins for later runs: each run waits for
the restarts of earlier runs, or (``overlap_restarts``, the test's) only for those a span
needs to keep a spare (two nodes serving it), so a restart overlaps the next runs.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path

from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import Span

PROMPT = "Write a short poem about the sea."


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_faults_bench(
    runs: int = 10,
    model: str = DEFAULT_MODEL,
    spans: str = "0:15,15:30,0:15,15:30,0:15,15:30",
    max_new_tokens: int = 24,
    seed: int = 0,
    overlap_restarts: bool = False,
) -> dict:
    from layerchain.client import Swarm
    from layerchain.local import start_node, swarm_down, swarm_up, wait_ready
    from layerchain.model import LocalModel, SamplingParams, resolve_model

    rng = random.Random(seed)
    spec = resolve_model(model)
    span_list = [Span.parse(s).check_within(spec.num_blocks) for s in spans.split(",")]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    reference = list(LocalModel(spec).generate(PROMPT, params).token_ids)
    state = Path(tempfile.mkdtemp(prefix="layerchain-faults-"))
    completed = identical = 0
    recoveries: list[float] = []
    failures: list[str] = []
    try:
        local = swarm_up(state, span_list, model=model)
        pid_of = {n["peer_id"]: (i, n["pid"]) for i, n in enumerate(local.nodes)}
        restarting: list[tuple] = []

        def rejoin(pending: list[tuple], overlap: bool) -> list[tuple]:
            """Wait for the restarts in ``pending``; return those still pending. With
            ``overlap``, wait (oldest restart first, then for bans to end) only while a
            span has fewer than two nodes the client can use: started, known at their
            new address, and not banned by it for their kill."""
            pending = list(pending)
            deadline = time.monotonic() + 300.0
            while pending or overlap:
                unavailable = client.run(_unavailable())
                out = {i for _, _, i in pending}
                out |= {i for p, (i, _) in pid_of.items() if p in unavailable}
                serving = [s for j, s in enumerate(span_list) if j not in out]
                if overlap and all(serving.count(s) >= 2 for s in span_list):
                    break
                if not pending:  # every node is up; a ban of this client's has to end
                    if time.monotonic() > deadline:
                        raise TimeoutError("a span kept fewer than two usable nodes for 300 s")
                    time.sleep(0.5)
                    continue
                proc, data_dir, i = pending.pop(0)
                info = wait_ready(proc, data_dir, state / f"node-{i}.log", 120)
                pid_of[info["peer_id"]] = (i, info["pid"])
                client.run(client.core.peers.refresh(force=True))  # its new address
            return pending

        async def _unavailable() -> set[str]:  # read on the client's loop, between runs
            return client.core.peers.unavailable()

        # audit_rate 0: an auditing client shows a token once verified, steps after computing
        # it; this one shows each as computed, so a kill at token k lands between steps
        with Swarm(local.initial_peers, model=model, step_timeout_s=5.0, ban_base_s=5.0,
                   audit_rate=0.0) as client:
            for run in range(runs):
                restarting = rejoin(restarting, overlap_restarts)  # killed nodes of earlier runs
                kill_at = rng.randrange(1, max_new_tokens - 2)
                gen = client.stream(PROMPT, params)
                try:
                    for event in gen:
                        if event.index == kill_at:
                            hop = rng.choice(gen.route)
                            i, pid = pid_of[hop.peer_id]
                            os.kill(pid, signal.SIGKILL)
                            # (a restart not waited for, serving already, killed again)
                            restarting = [r for r in restarting if r[2] != i]
                            proc, data_dir = start_node(
                                state, f"node-{i}", span_list[i], local.initial_peers, model=model
                            )
                            restarting.append((proc, data_dir, i))
                            pid_of[hop.peer_id] = (i, proc.pid)  # the node is its process
                            local.replace_node(i, proc.pid)
                except Exception as error:  # noqa: BLE001 - a failed run is a measurement
                    failures.append(f"run {run}: {error}")
                    continue
                res = gen.result
                completed += 1
                identical += list(res.token_ids) == reference
                recoveries.extend(r.seconds for r in res.recoveries)
    finally:
        swarm_down(state, quiet=True)
    return {
        "runs": runs,
        "completed": completed,
        "identical": identical,
        "recovery_s_p50": round(statistics.median(recoveries), 3) if recoveries else None,
        "recovery_s_p99": round(_percentile(recoveries, 0.99), 3) if recoveries else None,
        "recoveries": len(recoveries),
        "failures": failures,
    }

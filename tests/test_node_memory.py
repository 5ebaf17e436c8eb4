"""A real node's memory besides its weights (issue 21 item 2), read as PSS across its processes.

Measured 2026-12-02 (``layerchain bench memory``, docs/BENCHMARKS.md "Node memory"): a
3-block fp32 node took 531 MiB PSS with the forked DHT child (490 MiB besides its weights),
429 MiB with the DHT in its own process (389 besides its weights), 498 (458) an hour later
with the model runtime's changes of the day and a quieter machine (PSS splits shared library
pages between the processes mapping them, so it rises as other processes exit). The bound
is generous against that drift; the process set is the sharp check: the node and p2pd,
nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from layerchain.bench.memory import SERVING_TOKENS, run_memory_bench, tree_pss_mb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

OVERHEAD_BOUND_MB = 600.0  # generous: 389-458 measured (see above)
NODE_RSS_BOUND_MB = 250.0  # the node's own RSS minus its weights: 186 measured, 293 before


def test_a_node_is_its_weights_plus_a_bounded_rest_serving_too():
    # idle, then a session through it (a second node serves blocks 3..30). The manifest cache
    # is whatever the test session left: a node that finds it cold builds the manifest in a
    # child process (model.manifest_worker) and holds what it would hold with it warm
    # (`bench memory --cold-cache`: docs/BENCHMARKS.md "Node memory")
    result = run_memory_bench(blocks=(3,), dtypes=("fp32",), serving=True)
    [row] = result["rows"]
    assert (row["blocks"], row["dtype"]) == (3, "fp32")
    # no forked DHT child (a second Python holding torch), no torch_shm_manager, and the
    # manifest's builder gone once it built
    assert sorted(row["pss_mb_by_process"]) == ["node", "p2pd"], row
    assert row["processes"] == 2
    assert 30 < row["weights_mb"] < 60  # 3 of SmolLM2's 30 blocks in fp32: ~40.5 MiB
    assert row["pss_mb_by_process"]["node"] > row["weights_mb"]  # the node holds them
    assert row["pss_mb_total"] == pytest.approx(sum(row["pss_mb_by_process"].values()), abs=0.2)
    assert row["overhead_mb"] == pytest.approx(row["pss_mb_total"] - row["weights_mb"], abs=0.2)
    assert row["overhead_mb"] < OVERHEAD_BOUND_MB, row
    # shared pages counted in full (the node alone on a machine): 292.6 MiB besides the
    # weights before a serving node dropped its start's file pages (node.memory), 186.3 after;
    # 362 - 40.5 on a first start before the manifest was built in a child (transformers)
    assert row["rss_mb_by_process"]["node"] - row["weights_mb"] < NODE_RSS_BOUND_MB, row
    serving = row["serving"]
    assert serving["tokens"] == SERVING_TOKENS, row  # they came through it
    assert serving["in_session_rss_overhead_mb"] > 0
    # between sessions it sheds what serving paged back in (node.memory.shed_when_idle)
    assert serving["rss_mb_by_process"]["node"] - row["weights_mb"] < NODE_RSS_BOUND_MB, row
    assert serving["overhead_mb"] < OVERHEAD_BOUND_MB, row


def test_tree_pss_names_the_root_and_numbers_repeated_names():
    code = ("import subprocess, sys, time\n"
            "kids = [subprocess.Popen(['sleep', '30']) for _ in range(2)]\n"
            "print('ready', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 5
        while True:
            found = tree_pss_mb(proc.pid, root_name="parent")
            if len(found) == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert sorted(found) == ["parent", "sleep", "sleep#2"]
        assert all(v > 0 for v in found.values())
    finally:
        for child in psutil.Process(proc.pid).children():
            child.kill()
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]

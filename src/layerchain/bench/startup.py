"""``layerchain bench startup``: how long a one-shot ``layerchain generate`` takes (issue 21, 5).

A local swarm (a DHT bootstrap and ``nodes`` nodes, ``layerchain.local``) is started first;
then a fresh ``layerchain generate --initial-peers ADDR --max-new-tokens 1`` process runs
``runs`` times after one untimed warm-up (the machine warm: files in the page cache), with
``LAYERCHAIN_TIMINGS=1`` so that it marks its phases on stderr (``layerchain.timings``).

Phases, seconds (the medians over the runs; ``runs`` has each run's own):

* ``import_s``      process start -> the command runs (interpreter and the CLI's imports)
* ``dht_join_s``    the client's DHT up and joined (p2pd started; runs beside the head load)
* ``head_load_s``   the model resolved, the head and the tokenizer loaded
* ``first_token_s`` client ready -> first token (records read, routes measured, prefill)
* ``total_s``       process start -> exit, as the user waits for it

``ready_s`` (process start -> client ready) is given too; the target is ``total_s <= 3``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from layerchain import timings
from layerchain.errors import LayerchainError
from layerchain.local.launcher import swarm_down, swarm_up
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import even_spans

TARGET_TOTAL_S = 3.0  # issue 21: a one-shot generate on a warm machine
PHASES = ("import_s", "dht_join_s", "head_load_s", "first_token_s", "ready_s", "total_s")


def phases_of(marks: dict[str, dict[str, float | None]], started_at: float,
              ended_at: float) -> dict[str, float]:
    """The phases of one run from its marks (``timings.parse``) and the wall-clock times
    (``time.time()``) the bench started the process and saw it exit. KeyError names a
    mark the process did not write."""

    def at(phase: str) -> float:
        value = marks[phase]["at"]
        assert value is not None
        return value

    def took(phase: str) -> float:
        value = marks[phase]["s"]
        assert value is not None
        return value

    return {
        "import_s": round(at("command") - started_at, 3),
        "dht_join_s": round(took("dht_join"), 3),
        "head_load_s": round(took("head_load"), 3),
        "first_token_s": round(at("first_token") - at("ready"), 3),
        "ready_s": round(at("ready") - started_at, 3),
        "total_s": round(ended_at - started_at, 3),
    }


def time_generate(initial_peers: list[str], model: str = DEFAULT_MODEL, prompt: str = "Hi",
                  timeout_s: float = 120.0) -> dict[str, float]:
    """Run one ``layerchain generate --max-new-tokens 1`` process; its phases."""
    cmd = [sys.executable, "-m", "layerchain", "generate", "--model", model, "--prompt", prompt,
           "--max-new-tokens", "1", "--json",
           *[arg for peer in initial_peers for arg in ("--initial-peers", peer)]]
    env = {**os.environ, timings.ENV: "1"}
    started_at = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    ended_at = time.time()
    if done.returncode != 0:
        raise LayerchainError(f"generate exited {done.returncode}: "
                              f"{done.stderr.strip().splitlines()[-1:] or '(no output)'}")
    return phases_of(timings.parse(done.stderr), started_at, ended_at)


def run_startup_bench(model: str = DEFAULT_MODEL, nodes: int = 3, runs: int = 3,
                      threads: int | None = None) -> dict:
    """Medians of ``runs`` one-shot generates against a fresh local swarm (see the module)."""
    from layerchain.model import resolve_model

    spec = resolve_model(model)
    with tempfile.TemporaryDirectory(prefix="layerchain-bench-startup-") as tmp:
        state_dir = Path(tmp)
        swarm = swarm_up(state_dir, even_spans(spec.num_blocks, nodes), model=model,
                         threads=threads)
        try:
            time_generate(swarm.initial_peers, model)  # warm-up: page cache, compiled .pyc
            each = [time_generate(swarm.initial_peers, model) for _ in range(runs)]
        finally:
            swarm_down(state_dir, quiet=True)
    medians = {k: round(statistics.median(r[k] for r in each), 3) for k in PHASES}
    return {**medians, "target_total_s": TARGET_TOTAL_S, "nodes": nodes, "model": model,
            "runs": each}

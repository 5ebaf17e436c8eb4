"""The data-parallel benchmark (``bench train``'s ``dp_speedup_2_peers``): samples/s of N
``layerchain train dp`` processes together over one alone, on the same data, on a real DHT
(a bootstrap process on 127.0.0.1). Also the process helpers the end-to-end test uses."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layerchain.errors import ConfigError
from layerchain.model.spec import DEFAULT_MODEL

BENCH_TEXTS = ("The river {i} flows north past the old mill and turns east at the bridge.",
               "Recipe {i}: mix flour, water and salt, rest the dough, then bake it for an hour.",
               "Item {i} in the catalog is a blue ceramic cup that holds about three hundred ml.")


def write_bench_data(path: Path, count: int = 64) -> Path:
    """A small JSONL file of ``count`` distinct text records (the benchmark's data)."""
    import json

    lines = [json.dumps({"text": BENCH_TEXTS[i % len(BENCH_TEXTS)].format(i=i)})
             for i in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_peer_processes(args: Sequence[Sequence[str]], timeout_s: float
                       ) -> list[dict[str, Any]]:
    """Run ``layerchain train dp ... --json`` once per argument list, all at the same time,
    each in its own process; their JSON results in order. RuntimeError with the stderr
    tail of the first peer that failed (all are killed on a timeout)."""
    import json
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-m", "layerchain", "train", "dp", *a, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in args]
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise RuntimeError(f"train dp exited {proc.returncode}: {err[-2000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def measure_dp_speedup(peers: int = 2, steps: int = 2, model: str = DEFAULT_MODEL,
                       batch_size: int = 2, max_tokens: int = 32, timeout_s: float = 900.0
                       ) -> float:
    """Samples/s of ``peers`` data-parallel peers together over one peer alone, on the same
    data (each run ``steps`` global steps of ``peers x batch_size x 2`` samples), on a real
    DHT (a bootstrap process on 127.0.0.1). Start-up is excluded (``samples_per_s`` counts
    the training loop only). On a machine with fewer cores than peers the peers share them:
    expect well under ``peers``. Cost with the default model (measured 2026-12-02, load ~5):
    one peer takes 83 s and 5.4 GB (54 CPU-s; 6 s per local step of 2 x 32 tokens); each
    data-parallel step also all-reduces 540 MB of gradients and then the parameters."""
    import subprocess
    import sys
    import tempfile

    if peers < 2:
        raise ConfigError("measure_dp_speedup compares at least 2 peers with 1")
    with tempfile.TemporaryDirectory(prefix="layerchain-dp-bench-") as tmp:
        root = Path(tmp)
        data = write_bench_data(root / "data.jsonl")
        addresses = root / "bootstrap.addr"
        boot = subprocess.Popen(
            [sys.executable, "-m", "layerchain.discovery.bootstrap", "--host", "127.0.0.1",
             "--port", "0", "--print-addresses-to", str(addresses)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            address = wait_for_file(addresses, 60.0, boot).splitlines()[0]
            rates = []
            for count in (1, peers):
                common = ["--initial-peers", address, "--data", str(data), "--model", model,
                          "--steps", str(steps), "--batch-size", str(batch_size),
                          "--target-batch-size", str(count * batch_size * 2),
                          "--max-tokens", str(max_tokens), "--run-id", f"bench-{count}",
                          "--checkpoint-dir", str(root / "checkpoints"),
                          "--min-peers", str(count)]
                results = run_peer_processes(
                    [[*common, "--shard", f"{i}/{count}"] for i in range(count)], timeout_s)
                rates.append(sum(float(r["samples_per_s"]) for r in results))
        finally:
            boot.terminate()
            boot.wait(10)
    return rates[1] / rates[0]


def wait_for_file(path: Path, timeout_s: float, proc: Any = None) -> str:
    """The text of ``path`` once it exists and is not empty; RuntimeError after ``timeout_s``
    or if ``proc`` (a Popen) exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text()
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode} before writing {path}")
        time.sleep(0.1)
    raise RuntimeError(f"{path} did not appear within {timeout_s} s")

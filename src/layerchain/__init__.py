"""layerchain: run large language models on a peer-to-peer network of ordinary devices."""

import os as _os

__version__ = "0.1.0"

# Before torch loads libgomp (its OpenMP runtime), which reads this once: idle OpenMP threads
# spin for 5,000 rounds (a fraction of a millisecond), then sleep. libgomp's default
# (300,000 rounds) keeps a process's threads spinning long after its step, on cores that the
# next hop of the chain needs when nodes, client and DHT share a machine; sleeping at once
# (passive) pays a wake-up at each of the hundreds of parallel regions in a step. Longer
# spins speed one stream and slow concurrent ones (nodes computing at once oversubscribe the
# cores). Measured on 2 cores, 3 nodes, one stream / 4 streams in tokens/s
# (docs/BENCHMARKS.md): passive 15 / 24, 1,000 rounds 17-19 / 23, 5,000 23 / 19,
# 20,000 26 / 13. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "5000")

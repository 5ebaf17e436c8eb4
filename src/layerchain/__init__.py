"""layerchain: run large language models on a peer-to-peer network of ordinary devices."""

import os as _os

__version__ = "0.1.0"

# Before torch loads libgomp (its OpenMP runtime), which reads this once: idle OpenMP threads
# spin for 20,000 rounds (well under a millisecond), then sleep. libgomp's default (300,000
# rounds) keeps a process's threads spinning long after its step, on cores that the next hop
# of the chain needs when nodes, client and DHT share a machine; sleeping at once (passive)
# pays a wake-up at each of the hundreds of parallel regions in a step. Measured on 2 cores
# (docs/BENCHMARKS.md): 3-node swarm 23 tokens/s with this, 19 with the default, 13 passive.
# A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "20000")

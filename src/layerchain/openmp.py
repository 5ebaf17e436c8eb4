"""How long idle OpenMP threads spin: set for layerchain's own processes, never on import.

torch's OpenMP runtime (libgomp) reads ``GOMP_SPINCOUNT`` once, when torch loads: idle
threads spin that many rounds, then sleep. libgomp's default (300,000 rounds) keeps a
process's threads spinning long after its step, on cores that the next hop of the chain needs
when nodes, client and DHT share a machine; sleeping at once (``OMP_WAIT_POLICY=PASSIVE``)
pays a wake-up at each of the hundreds of parallel regions in a step. Longer spins speed one
stream and slow concurrent ones (nodes computing at once oversubscribe the cores). Measured on
2 cores, 3 nodes, one stream / 4 streams in tokens/s (docs/BENCHMARKS.md, "The OpenMP fix"):
passive 15 / 24, 1,000 rounds 17-19 / 23, 5,000 23 / 19, 20,000 26 / 13.

Importing ``layerchain`` leaves the process environment alone. The ``layerchain`` command
(``python -m layerchain`` too, so every node, gateway and demo) calls ``tune_openmp()`` before
torch loads, and ``layerchain.local`` passes the setting to the processes it starts. An
application that embeds a client or a node and shares cores with other hops may call it first
thing, before anything imports torch; afterwards it has no effect on this process.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_ROUNDS = 5_000  # rounds an idle OpenMP thread spins before it sleeps (see above)


def tune_openmp(environ: MutableMapping[str, str] | None = None) -> None:
    """Set ``GOMP_SPINCOUNT`` in ``environ`` (default: this process's), unless its owner chose.

    A ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` already there wins. Only effective for a
    process whose torch has not loaded yet (a child started with ``environ``, or this one).
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", str(SPIN_ROUNDS))

"""The multi-host test topology, on emulated hosts (``layerchain.bench.netlab``)::

                 router "r" (delay line between lan and far; a man in the middle, on demand)
          ┌────────────────┴───────────────────┐
    lan 10.199.1.0/24                    far 10.199.2.0/24
    lan1 lan2 lan3 lanc                  far1 far2 farc   nat (home router, masquerade)
                                                           └── nat-in 10.199.3.0/24: home1

``lanc`` and ``farc`` run clients, the others nodes; ``home1`` can dial out, but nothing can
dial it (no route leads to its subnet, and the NAT forwards only replies inward).

Where namespaces can't be built (not root, a tool missing), ``lab_or_skip`` skips the test
with the reason in capitals (pytest's ``-ra`` summary lists it; a warning would fail the
run under ``filterwarnings = error``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from layerchain.bench.netlab import Lab, unavailable

LAN_HOSTS = ("lan1", "lan2", "lan3", "lanc")
FAR_HOSTS = ("far1", "far2", "farc")
HOME_HOSTS = ("home1",)


def lab_or_skip(workdir: Path) -> Lab:
    """An empty lab in ``workdir``, or a skip saying why this machine can't have one."""
    reason = unavailable()
    if reason:
        pytest.skip(f"MULTI-HOST TESTS SKIPPED (no emulated hosts on this machine): {reason}")
    return Lab.create(workdir)


def build_test_topology(workdir: Path) -> Lab:
    """The topology above (no processes yet); the caller closes it."""
    lab = lab_or_skip(workdir)
    try:
        lab.add_router("r")
        lab.add_subnet("lan", router="r", hosts=LAN_HOSTS)
        lab.add_subnet("far", router="r", hosts=FAR_HOSTS)
        lab.add_nat("nat", upstream="far", hosts=HOME_HOSTS)
        lab.add_default_routes()
    except BaseException:
        lab.close()
        raise
    return lab

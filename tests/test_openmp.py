"""OpenMP tuning happens in layerchain's entry points, before torch loads, never on import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from layerchain.local import node_env
from layerchain.openmp import SPIN_ROUNDS, tune_openmp

# Runs in a fresh interpreter: records GOMP_SPINCOUNT at the moment torch starts to import.
SPY = """
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
        return None
sys.meta_path.insert(0, Spy())
{imports}
import torch  # loads libgomp, if nothing above did
print(seen[0], os.environ.get("GOMP_SPINCOUNT"))
"""


def _run(imports: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", SPY.format(imports=imports)],
        env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True,
    )
    return out.stdout.split()


@pytest.mark.slow  # a fresh interpreter each (torch loads: seconds)
def test_importing_layerchain_leaves_the_environment_alone():
    assert _run("import layerchain, layerchain.client") == ["None", "None"]


@pytest.mark.slow
def test_the_cli_entry_point_tunes_openmp_before_torch_loads():
    assert _run("import layerchain.cli.main") == [str(SPIN_ROUNDS)] * 2


@pytest.mark.slow
def test_a_users_own_setting_wins():
    assert _run("import layerchain.cli.main", GOMP_SPINCOUNT="7") == ["7", "7"]
    assert _run("import layerchain.cli.main", OMP_WAIT_POLICY="PASSIVE") == ["None", "None"]


def test_processes_started_by_local_get_it(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = node_env(threads=1)
    assert env["GOMP_SPINCOUNT"] == str(SPIN_ROUNDS) and env["OMP_NUM_THREADS"] == "1"
    assert "GOMP_SPINCOUNT" not in os.environ  # the caller's own environment is untouched
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "GOMP_SPINCOUNT" not in node_env()


def test_tune_openmp_on_a_mapping():
    env: dict[str, str] = {"GOMP_SPINCOUNT": "123"}
    tune_openmp(env)
    assert env == {"GOMP_SPINCOUNT": "123"}
    fresh: dict[str, str] = {}
    tune_openmp(fresh)
    assert fresh == {"GOMP_SPINCOUNT": str(SPIN_ROUNDS)}


def test_a_local_swarm_shares_the_cores_among_its_processes(monkeypatch):
    from layerchain.local import launcher

    monkeypatch.setattr(launcher.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [launcher.shared_threads(n) for n in (1, 2, 3, 4, 9, 0)] == [8, 4, 2, 2, 1, 8]
    monkeypatch.setattr(launcher.os, "sched_getaffinity", lambda pid: {0, 1})
    assert launcher.shared_threads(4) == 1  # 3 nodes and a client on 2 cores: one each

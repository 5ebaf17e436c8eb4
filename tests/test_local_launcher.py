"""layerchain.local: `swarm down` stops only the processes `swarm up` started (no real nodes)."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import time
import warnings

import pytest

from layerchain.errors import ConfigError
from layerchain.local import LocalProcess, LocalSwarm, launcher, process_start, stop_pids, swarm_down


@pytest.fixture
def sleepers():
    """Start stand-in processes (``sleep``), each leading its own process group, like nodes."""
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        procs.append(subprocess.Popen(["sleep", "60"], start_new_session=True))
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _write_swarm(state, nodes, bootstrap_pid, bootstrap_started):
    state.mkdir(exist_ok=True)
    (state / "swarm.json").write_text(json.dumps({
        "initial_peers": ["/ip4/127.0.0.1/tcp/1/p2p/x"], "bootstrap_pid": bootstrap_pid,
        "bootstrap_started": bootstrap_started, "nodes": nodes,
    }))


def _gone(proc: subprocess.Popen, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return True
        time.sleep(0.05)
    return False


def test_swarm_down_leaves_a_reused_pid_alone(tmp_path, sleepers):
    """The node exited and its pid went to another program: `swarm down` must not kill it."""
    stranger, old_format = sleepers(), sleepers()
    started = process_start(stranger.pid)
    assert started is not None
    node = {"pid": stranger.pid, "started": started - 100.0, "peer_id": "p", "start": 0,
            "end": 30, "endpoint": "tcp://127.0.0.1:1"}
    # an older swarm.json without start times: only a layerchain command line is ours
    _write_swarm(tmp_path, [node], old_format.pid, None)
    said: list[str] = []
    assert swarm_down(tmp_path, grace_s=1.0, on_progress=said.append) == 0
    assert stranger.poll() is None and old_format.poll() is None
    assert len(said) == 2 and all("left alone" in line for line in said)
    assert not (tmp_path / "swarm.json").exists()


def test_swarm_down_stops_its_own_processes(tmp_path, sleepers):
    node_proc, bootstrap = sleepers(), sleepers()
    node = {"pid": node_proc.pid, "started": process_start(node_proc.pid), "peer_id": "p",
            "start": 0, "end": 30, "endpoint": "tcp://127.0.0.1:1"}
    _write_swarm(tmp_path, [node], bootstrap.pid, process_start(bootstrap.pid))
    assert LocalSwarm.load(tmp_path).bootstrap_started == process_start(bootstrap.pid)
    assert swarm_down(tmp_path, grace_s=2.0) == 2
    assert _gone(node_proc) and _gone(bootstrap)


def test_swarm_down_stops_its_own_processes_after_the_wall_clock_was_stepped(tmp_path, sleepers):
    """A VM resumed from a pause steps its wall clock: each process's epoch start time moves
    with it (9 s seen), its start in ticks since boot does not. Recorded ticks decide, so the
    swarm's processes are still stopped, and a reused pid (other ticks) still left alone."""
    node_proc, bootstrap, stranger = sleepers(), sleepers(), sleepers()
    stepped = 9.0  # the recorded epoch times no longer match: ticks must decide
    nodes = [{"pid": p.pid, "started": process_start(p.pid) - stepped,
              "start_ticks": launcher.process_ticks(p.pid) - ticks, "peer_id": "p",
              "start": 0, "end": 30, "endpoint": "tcp://127.0.0.1:1"}
             for p, ticks in ((node_proc, 0), (stranger, 1))]  # the stranger: another start
    _write_swarm(tmp_path, nodes, bootstrap.pid, process_start(bootstrap.pid) + stepped)
    data = json.loads((tmp_path / "swarm.json").read_text())
    data["bootstrap_start_ticks"] = launcher.process_ticks(bootstrap.pid)
    (tmp_path / "swarm.json").write_text(json.dumps(data))
    said: list[str] = []
    assert swarm_down(tmp_path, grace_s=2.0, on_progress=said.append) == 2
    assert _gone(node_proc) and _gone(bootstrap)
    assert stranger.poll() is None and len(said) == 1 and "left alone" in said[0]


def test_process_ticks_read_the_kernels_start_field():
    ticks = launcher.process_ticks(os.getpid())
    with open(f"/proc/{os.getpid()}/stat") as f:
        stat = f.read()
    assert ticks == int(stat.rsplit(")", 1)[1].split()[19]) > 0
    assert launcher.process_ticks(2**22 + 12345) is None  # no such process


def test_swarm_down_without_a_swarm(tmp_path):
    assert swarm_down(tmp_path, quiet=True) == 0
    with pytest.raises(ConfigError, match="swarm up"):
        swarm_down(tmp_path)


def test_launched_processes_outlive_their_popen_without_warnings_and_are_reaped(tmp_path):
    """A swarm's processes outlive the call that started them: no 'subprocess is still
    running' ResourceWarning when that call's Popen objects go, and stopping reaps them."""
    pid = launcher._spawn(["sleep", "60"], tmp_path / "sleep.log", {}).pid
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        gc.collect()
    assert LocalProcess(pid, process_start(pid)).is_ours()
    assert stop_pids([LocalProcess(pid, process_start(pid))], grace_s=2.0) == []
    assert pid not in launcher._CHILDREN
    assert not LocalProcess(pid, None).is_ours()  # gone, and reaped: no zombie left


def test_a_restarted_node_is_recorded_and_stopped_too(tmp_path, sleepers):
    """bench faults and the fault tests kill a node and start it again: the new process is
    recorded with its own start time, so `swarm down` stops it instead of leaving it alone
    (before: the old start time stayed, and the restarted nodes outlived the run)."""
    first, bootstrap, restarted = sleepers(), sleepers(), sleepers()
    node = {"pid": first.pid, "started": process_start(first.pid), "peer_id": "p",
            "start": 0, "end": 30, "endpoint": "tcp://127.0.0.1:1"}
    _write_swarm(tmp_path, [node], bootstrap.pid, process_start(bootstrap.pid))
    local = LocalSwarm.load(tmp_path)
    first.kill()
    first.wait()
    local.replace_node(0, restarted.pid)
    assert LocalSwarm.load(tmp_path).nodes[0]["started"] == process_start(restarted.pid)
    assert swarm_down(tmp_path, grace_s=2.0) == 2
    assert _gone(restarted) and _gone(bootstrap)


def test_children_killed_from_outside_are_reaped_on_replace_and_on_stop(tmp_path):
    """A bench or test kills a node with SIGKILL itself: the launcher's Popen of it is
    reaped when the node is replaced or the swarm stopped (else a zombie, and a 'still
    running' ResourceWarning at exit)."""
    spawn = [launcher._spawn(["sleep", "60"], tmp_path / f"s{i}.log", {}) for i in range(3)]
    replaced, killed, restarted = spawn
    node = {"pid": replaced.pid, "started": process_start(replaced.pid), "peer_id": "p",
            "start": 0, "end": 30, "endpoint": "tcp://127.0.0.1:1"}
    _write_swarm(tmp_path, [node], killed.pid, process_start(killed.pid))
    local = LocalSwarm.load(tmp_path)
    os.kill(replaced.pid, signal.SIGKILL)
    local.replace_node(0, restarted.pid)
    assert replaced.returncode == -signal.SIGKILL and replaced.pid not in launcher._CHILDREN
    os.kill(killed.pid, signal.SIGKILL)
    time.sleep(0.2)  # a zombie now: not ours any more, still a child to reap
    assert swarm_down(tmp_path, grace_s=2.0) == 1  # only the restarted one was still ours
    assert killed.returncode == -signal.SIGKILL and not launcher._CHILDREN.keys() & {
        killed.pid, restarted.pid}

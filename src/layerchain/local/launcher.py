"""A local swarm: a DHT bootstrap and N node processes on loopback, for demos and tests.

``swarm_up`` starts the processes (each in its own process group, logging to
``STATE_DIR/<name>.log``), waits until every node serves, and writes
``STATE_DIR/swarm.json``::

    {"initial_peers": [multiaddr, ...],
     "bootstrap_pid": int, "bootstrap_started": float, "bootstrap_start_ticks": int,
     "nodes": [{"pid": int, "started": float, "start_ticks": int, "peer_id": str,
                "start": int, "end": int, "endpoint": str, "wallet": str}, ...]}

``started`` is the process's start time (seconds since the epoch, as the OS reports it) and
``start_ticks`` the same moment in clock ticks since boot (Linux: ``/proc/PID/stat``): with
the pid they name the process, since a pid alone may be reused after the node exits. The
ticks decide where recorded: the epoch reading moves when the wall clock is stepped (a VM
resumed from a pause: measured 9 s on 2026-12-03, after which the nodes of a swarm were no
longer recognised as its own and outlived ``swarm_down``); ``started`` decides otherwise.

``swarm_down`` stops them: SIGTERM to each node's own process, so that it withdraws its DHT
records (its DHT runs in the node's process, over its p2pd child) and drains its sessions,
then SIGKILL to each process group (the node, p2pd) after a grace period. A SIGTERM to the
whole group would stop p2pd first: the node could not withdraw, and its records would
linger for their TTL.
A pid whose process is no longer the one recorded (it exited and the pid went to another
program) is left alone; so is one recorded without a start time (an older swarm.json) whose
command line is not layerchain's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from layerchain.errors import ConfigError, LayerchainError
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.openmp import tune_openmp
from layerchain.types import Span

SWARM_FILE = "swarm.json"
_SAME_START_S = 0.05  # seconds: two readings of one process's start time agree this closely
# Our running children by pid. A Popen object dropped while its process runs is a
# ResourceWarning; these processes outlive the call that started them on purpose, so the
# launcher keeps them and reaps them when it stops them.
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class LocalProcess:
    """One process this launcher started: its pid and start time (None: not recorded)."""

    pid: int
    started: float | None  # seconds since the epoch (psutil's create_time)
    ticks: int | None = None  # clock ticks from boot to its start (``process_ticks``)

    def is_ours(self) -> bool:
        """Whether the pid still names the process we started (and it has not exited)."""
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            if self.ticks is not None:  # immune to steps of the wall clock
                return process_ticks(self.pid) == self.ticks
            if self.started is not None:
                return abs(proc.create_time() - self.started) < _SAME_START_S
            return any("layerchain" in part for part in proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False


def process_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of
    ``/proc/PID/stat``); None if it is gone or the system has no such file."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # fields after "(comm)"
    except (OSError, ValueError, IndexError):
        return None


def start_fields(pid: int) -> dict[str, Any]:
    """What names process ``pid`` in ``swarm.json``: ``started`` and ``start_ticks``."""
    return {"started": process_start(pid), "start_ticks": process_ticks(pid)}


def process_start(pid: int) -> float | None:
    """The start time of process ``pid`` (seconds since the epoch); None if it is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@dataclass
class LocalSwarm:
    state_dir: Path
    initial_peers: list[str]
    bootstrap_pid: int
    nodes: list[dict] = field(default_factory=list)
    bootstrap_started: float | None = None  # see LocalProcess
    bootstrap_ticks: int | None = None

    def to_json(self) -> dict:
        return {
            "initial_peers": self.initial_peers,
            "bootstrap_pid": self.bootstrap_pid,
            "bootstrap_started": self.bootstrap_started,
            "bootstrap_start_ticks": self.bootstrap_ticks,
            "nodes": self.nodes,
        }

    def processes(self) -> list[LocalProcess]:
        """The nodes' processes, then the bootstrap's."""
        nodes = [LocalProcess(int(n["pid"]), n.get("started"), n.get("start_ticks"))
                 for n in self.nodes if n.get("pid")]
        return [*nodes, LocalProcess(self.bootstrap_pid, self.bootstrap_started,
                                     self.bootstrap_ticks)]

    def replace_node(self, index: int, pid: int) -> None:
        """Record that node ``index`` is now process ``pid`` (a restart), with its own start
        time, so that ``swarm_down`` stops it; saves ``swarm.json``."""
        _reap(self.nodes[index]["pid"])  # the process it replaces (killed), if ours to reap
        self.nodes[index] = {**self.nodes[index], "pid": pid, **start_fields(pid)}
        self.save()

    def save(self) -> None:
        path = self.state_dir / SWARM_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: Path) -> LocalSwarm:
        path = Path(state_dir) / SWARM_FILE
        try:
            data = json.loads(path.read_text())
            started, ticks = data.get("bootstrap_started"), data.get("bootstrap_start_ticks")
            return cls(
                Path(state_dir), list(data["initial_peers"]), int(data["bootstrap_pid"]),
                list(data["nodes"]), None if started is None else float(started),
                None if ticks is None else int(ticks),
            )
        except FileNotFoundError:
            raise ConfigError(f"no swarm in {state_dir}: {path} is missing", hint="run `layerchain swarm up` first") from None
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{path} is not a swarm file: {error}") from None


def _python_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "layerchain", *args]


def shared_threads(processes: int) -> int:
    """Torch threads for each of ``processes`` busy processes sharing this machine's cores
    (a local swarm's nodes and its client): the cores split evenly, at least one. More
    threads than cores make each parallel region wait for descheduled threads
    (docs/BENCHMARKS.md, "The OpenMP fix")."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, processes))


def node_env(threads: int | None = None) -> dict[str, str]:
    """Environment of a node (or bootstrap) process: this one's, with ``threads`` OpenMP
    threads and idle OpenMP threads tuned to spin briefly (``layerchain.openmp``), whether or
    not the process that starts it came through the ``layerchain`` command."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    tune_openmp(env)
    return env


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps its own copy of the fd
    try:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )
    finally:
        log.close()
    _CHILDREN[proc.pid] = proc
    return proc


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def start_bootstrap(state_dir: Path, timeout_s: float = 60.0) -> tuple[int, list[str]]:
    """Start a DHT bootstrap process; return its pid and multiaddrs."""
    addr_file = state_dir / "bootstrap.addrs"
    addr_file.unlink(missing_ok=True)
    proc = _spawn(
        [sys.executable, "-m", "layerchain.discovery.bootstrap", "--host", "127.0.0.1",
         "--port", "0", "--print-addresses-to", str(addr_file)],
        state_dir / "bootstrap.log",
        node_env(),
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if addr_file.exists() and addr_file.read_text().strip():
            return proc.pid, addr_file.read_text().split()
        if proc.poll() is not None:
            raise LayerchainError(f"DHT bootstrap exited: {_tail(state_dir / 'bootstrap.log')}")
        time.sleep(0.1)
    _kill_group(proc.pid, signal.SIGKILL)
    raise LayerchainError(f"DHT bootstrap did not start in {timeout_s:.0f} s")


def start_node(
    state_dir: Path,
    name: str,
    span: Span,
    initial_peers: Sequence[str],
    *,
    model: str = DEFAULT_MODEL,
    extra_args: Sequence[str] = (),
    threads: int | None = None,
    insecure: bool = False,
    device: str = "cpu",
    dtype: str = "fp32",
) -> tuple[subprocess.Popen, Path]:
    """Start one node process; return it and its data dir (where node.json will appear).
    It serves TLS (tls://), or plaintext tcp:// with ``insecure``; it computes on ``device``
    (``node start --device``) with weights in ``dtype`` (``--dtype``)."""
    data_dir = state_dir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "node.json").unlink(missing_ok=True)
    cmd = _python_cmd(
        "node", "start", "--model", model, "--blocks", str(span), "--data-dir", str(data_dir),
        *[arg for peer in initial_peers for arg in ("--initial-peers", peer)],
        *(["--insecure"] if insecure else []),
        *(["--device", device] if device != "cpu" else []),
        *(["--dtype", dtype] if dtype != "fp32" else []),
        *extra_args,
    )
    return _spawn(cmd, state_dir / f"{name}.log", node_env(threads)), data_dir


def wait_ready(proc: subprocess.Popen, data_dir: Path, log_path: Path, timeout_s: float) -> dict:
    """Wait for a node's node.json; raise with its log's tail if it dies first."""
    deadline = time.monotonic() + timeout_s
    ready = data_dir / "node.json"
    while time.monotonic() < deadline:
        if ready.exists():
            info = json.loads(ready.read_text())
            node = {k: info[k] for k in ("pid", "peer_id", "start", "end", "endpoint")}
            return {**node, **start_fields(node["pid"]), "wallet": info.get("wallet", "")}
        if proc.poll() is not None:
            raise LayerchainError(f"node {data_dir.name} exited: {_tail(log_path)}")
        time.sleep(0.1)
    raise LayerchainError(f"node {data_dir.name} was not ready in {timeout_s:.0f} s: {_tail(log_path)}")


def swarm_up(
    state_dir: Path,
    spans: Sequence[Span],
    *,
    model: str = DEFAULT_MODEL,
    node_args: Sequence[Sequence[str]] | None = None,
    threads: int | None = None,
    timeout_s: float = 180.0,
    on_progress: Callable[[str], None] | None = None,
    insecure: bool = False,
    device: str = "cpu",
    dtype: str = "fp32",
) -> LocalSwarm:
    """Start a bootstrap and one node per span; return when all serve (or stop them all).
    Nodes serve TLS; plaintext tcp:// with ``insecure`` (clients then need it too); they
    compute on ``device`` with weights in ``dtype``, each with ``threads`` torch threads
    (None: this machine's cores shared by the nodes and a client, ``shared_threads``)."""
    threads = threads or shared_threads(len(spans) + 1)
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if (state_dir / SWARM_FILE).exists():
        swarm_down(state_dir, quiet=True)
    say = on_progress or (lambda _: None)
    bootstrap_pid, peers = start_bootstrap(state_dir)
    swarm = LocalSwarm(state_dir, peers, bootstrap_pid, bootstrap_started=process_start(bootstrap_pid),
                       bootstrap_ticks=process_ticks(bootstrap_pid))
    swarm.save()
    say(f"DHT bootstrap at {peers[0]}")
    try:
        procs = []
        for i, span in enumerate(spans):
            args = node_args[i] if node_args else ()
            procs.append(start_node(state_dir, f"node-{i}", span, peers, model=model,
                                    extra_args=args, threads=threads, insecure=insecure,
                                    device=device, dtype=dtype))
            pid = procs[-1][0].pid
            swarm.nodes.append({"pid": pid, **start_fields(pid), "peer_id": "",
                                "start": span.start, "end": span.end, "endpoint": ""})
            swarm.save()
        for i, (proc, data_dir) in enumerate(procs):
            swarm.nodes[i] = wait_ready(proc, data_dir, state_dir / f"node-{i}.log", timeout_s)
            swarm.save()
            say(f"node {i} serves blocks {spans[i]} at {swarm.nodes[i]['endpoint']}")
    except BaseException:
        swarm_down(state_dir, quiet=True)
        raise
    return swarm


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _kill_group(pid: int, sig: int) -> None:
    """Signal the process group ``pid`` leads (the node and its p2pd).

    No fallback to the bare pid: once the group is gone the pid may be another program's.
    """
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int, timeout_s: float = 5.0) -> None:
    """Reap our child ``pid`` (started here and killed): wait for it up to ``timeout_s``;
    one still running then stays registered, for ``stop_pids``."""
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _CHILDREN[pid] = child


def _wait_gone(processes: Sequence[LocalProcess], seconds: float) -> None:
    """Wait up to ``seconds`` until none of ``processes`` is alive."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p.pid) for p in processes):
        time.sleep(0.05)


def stop_pids(processes: Sequence[LocalProcess], grace_s: float = 10.0) -> list[LocalProcess]:
    """SIGTERM each process that is still ours, then SIGKILL its whole process group after
    ``grace_s``; return the ones left alone (gone, or their pid now names another process)."""
    ours = [p for p in processes if p.is_ours()]
    for proc in ours:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    _wait_gone(ours, grace_s)
    for proc in ours:
        _kill_group(proc.pid, signal.SIGKILL)
        _reap(proc.pid)  # ours from this process: reap it (poll notes one reaped above)
    for proc in processes:
        if proc not in ours:  # exited before (killed by a test or a bench): reap its zombie
            _reap(proc.pid, timeout_s=0.0)
    # a killed process still tears down its memory before it is gone (seconds on a loaded
    # machine): return once the kernel has let go of it, so "down" means down
    _wait_gone(ours, 5.0)
    return [p for p in processes if p not in ours]


def swarm_down(
    state_dir: Path,
    *,
    quiet: bool = False,
    grace_s: float = 10.0,
    on_progress: Callable[[str], None] | None = None,
) -> int:
    """Stop a local swarm; return how many of its processes were asked to stop.

    A recorded pid that no longer names the process ``swarm up`` started is left alone and
    reported through ``on_progress``."""
    try:
        swarm = LocalSwarm.load(Path(state_dir))
    except ConfigError:
        if quiet:
            return 0
        raise
    *nodes, bootstrap = swarm.processes()
    left = stop_pids(nodes, grace_s) + stop_pids([bootstrap], grace_s=3.0)
    say = on_progress or (lambda _: None)
    for proc in left:
        say(f"pid {proc.pid} is no longer this swarm's process (exited or reused): left alone")
    (Path(state_dir) / SWARM_FILE).unlink(missing_ok=True)
    return len(nodes) + 1 - len(left)

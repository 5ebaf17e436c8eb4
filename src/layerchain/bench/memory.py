"""``layerchain bench memory``: what a node costs in memory besides its weights (issue 21, 2).

For each (dtype, blocks) a real node process serves blocks ``[0, blocks)`` of the model on
loopback, joined to a DHT bootstrap started here; once it serves (``node.json``), the PSS
of every process of its tree is read (psutil ``memory_full_info().pss``: shared pages are
split between the processes sharing them, so the figures add up across processes and
nodes). ``weights_mb`` is what its span's tensors hold (parameters and buffers, loaded here
the same way), ``overhead_mb`` the rest: the interpreter, torch, hivemind, sockets, p2pd.
The node is idle when measured (it served no session: a node of a few blocks alone cannot).
A node drops the file pages only its start touched once it serves (``node.memory``): the
~20 MiB of library code a step runs fault back in when it serves, not counted here.

An unpacked p2pd's code is file pages (``discovery.p2pd_unpack``), split between every p2pd
of the machine: the bootstrap's, other nodes'. So its PSS depends on how many ran then
(``p2pds_on_machine``, counted at each measurement; ~55 MiB alone, ~43 beside the
bootstrap's); a UPX-packed p2pd (``p2pd_packed``) holds ~63 MiB whatever runs beside it.

Result::

    {"model": str, "p2pd_packed": bool, "rows": [{"blocks", "dtype", "pss_mb_total",
     "pss_mb_by_process": {"node": MiB, "p2pd": MiB, ...}, "weights_mb", "overhead_mb",
     "processes", "p2pds_on_machine", "uss_mb_by_process": {...},
     "rss_mb_by_process": {...}}]}

MiB throughout (2**20 bytes).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from layerchain.local.launcher import (
    LocalProcess,
    process_start,
    start_bootstrap,
    start_node,
    stop_pids,
    wait_ready,
)
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import Span

MIB = 2**20
SETTLE_S = 2.0  # after the node serves, before reading: its announce and reachability done
TARGET_OVERHEAD_MB = 250.0  # issue 21: all of a node's processes minus its weights


@dataclass(frozen=True)
class MemoryRow:
    """One node's memory. MiB; ``pss_mb_by_process`` by process name ("node" for the node's
    own process; a repeated name gets "#2", "#3"); ``processes``: how many there were."""

    blocks: int
    dtype: str
    pss_mb_total: float
    pss_mb_by_process: dict[str, float]
    weights_mb: float
    overhead_mb: float
    processes: int
    p2pds_on_machine: int  # p2pd processes running on the machine then (sharing its pages)
    uss_mb_by_process: dict[str, float]  # private pages only: what sharing cannot lower
    # every resident page in full, shared ones too: what PSS reads where no other process
    # maps the same files (the node alone on its machine), the bound sharing cannot raise
    rss_mb_by_process: dict[str, float] = field(default_factory=dict)


def tree_pss_mb(pid: int, root_name: str = "node") -> dict[str, float]:
    """PSS in MiB of process ``pid`` (as ``root_name``) and each of its descendants (by
    name). Processes that exit while being read are left out. Raises psutil.NoSuchProcess
    if ``pid`` itself is gone."""
    return {name: mb[0] for name, mb in tree_memory_mb(pid, root_name).items()}


def tree_memory_mb(pid: int, root_name: str = "node") -> dict[str, tuple[float, float, float]]:
    """(PSS, USS, RSS) in MiB of process ``pid`` (as ``root_name``) and each of its
    descendants, named as ``tree_pss_mb`` names them. USS counts only the pages no other
    process maps: unlike PSS, it does not fall as other processes share the libraries'
    pages; RSS counts shared pages in full: it does not rise as they exit."""
    root = psutil.Process(pid)
    info = root.memory_full_info()
    out = {root_name: (info.pss / MIB, info.uss / MIB, info.rss / MIB)}
    for child in root.children(recursive=True):
        try:
            name, info = child.name(), child.memory_full_info()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name}#{n}"
        out[key] = (info.pss / MIB, info.uss / MIB, info.rss / MIB)
    return out


def count_processes(name: str) -> int:
    """How many processes named ``name`` run on the machine now."""
    count = 0
    for process in psutil.process_iter(["name"]):
        count += process.info["name"] == name
    return count


def p2pd_packed() -> bool:
    """Whether hivemind's p2pd is still UPX-packed (``make install`` unpacks it)."""
    from layerchain.discovery.p2pd_unpack import hivemind_p2pd, is_packed

    path = hivemind_p2pd()
    if path is None or not path.is_file():
        return False
    with open(path, "rb") as f:
        return is_packed(f.read(512))


def span_weights_mb(model: str, blocks: int, dtype: str = "fp32") -> float:
    """MiB held by the tensors (parameters and buffers) of blocks ``[0, blocks)`` in
    ``dtype``, as a node loads them."""
    from layerchain.model import load_span, resolve_model

    spec = resolve_model(model)
    # fp32 without the keyword: the same call before load_span took a dtype (issue 21, 1)
    options = {} if dtype == "fp32" else {"dtype": dtype}
    span = load_span(spec, 0, blocks, **options)
    tensors = [*span.parameters(), *span.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def measure_node(state_dir: Path, peers: Sequence[str], model: str, blocks: int, dtype: str,
                 threads: int | None = None, timeout_s: float = 180.0) -> MemoryRow:
    """Start a node serving ``[0, blocks)`` in ``dtype``, read its processes' PSS, stop it."""
    name = f"mem-{dtype}-{blocks}"
    extra = () if dtype == "fp32" else ("--dtype", dtype)  # fp32: also before --dtype existed
    proc, data_dir = start_node(state_dir, name, Span(0, blocks), peers, model=model,
                                extra_args=extra, threads=threads)
    try:
        wait_ready(proc, data_dir, state_dir / f"{name}.log", timeout_s)
        time.sleep(SETTLE_S)
        memory = tree_memory_mb(proc.pid)
        p2pds = count_processes("p2pd")
    finally:
        stop_pids([LocalProcess(proc.pid, process_start(proc.pid))])
    weights = span_weights_mb(model, blocks, dtype)
    by_process = {name: mb[0] for name, mb in memory.items()}
    total = sum(by_process.values())
    return MemoryRow(
        blocks=blocks, dtype=dtype, pss_mb_total=round(total, 1),
        pss_mb_by_process={k: round(v, 1) for k, v in by_process.items()},
        weights_mb=round(weights, 1), overhead_mb=round(total - weights, 1),
        processes=len(by_process), p2pds_on_machine=p2pds,
        uss_mb_by_process={k: round(mb[1], 1) for k, mb in memory.items()},
        rss_mb_by_process={k: round(mb[2], 1) for k, mb in memory.items()},
    )


def run_memory_bench(model: str = DEFAULT_MODEL, blocks: Sequence[int] = (3, 10),
                     dtypes: Sequence[str] = ("fp32",), threads: int | None = None) -> dict:
    """One row per (dtype, blocks), nodes measured one at a time beside one bootstrap."""
    with tempfile.TemporaryDirectory(prefix="layerchain-bench-memory-") as tmp:
        state_dir = Path(tmp)
        boot_pid, peers = start_bootstrap(state_dir)
        boot = LocalProcess(boot_pid, process_start(boot_pid))
        try:
            rows = [measure_node(state_dir, peers, model, n, dtype, threads)
                    for dtype in dtypes for n in blocks]
        finally:
            stop_pids([boot], grace_s=3.0)
    return {"model": model, "target_overhead_mb": TARGET_OVERHEAD_MB,
            "p2pd_packed": p2pd_packed(), "rows": [asdict(row) for row in rows]}

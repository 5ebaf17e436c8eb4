"""``layerchain bench memory``: what a node costs in memory besides its weights (issue 21, 2).

For each (dtype, blocks) a real node process serves blocks ``[0, blocks)`` of the model on
loopback, joined to a DHT bootstrap started here; once it serves (``node.json``), the PSS
of every process of its tree is read (psutil ``memory_full_info().pss``: shared pages are
split between the processes sharing them, so the figures add up across processes and
nodes). ``weights_mb`` is what its span's tensors hold (parameters and buffers, loaded here
the same way), ``overhead_mb`` the rest: the interpreter, torch, hivemind, sockets, p2pd.
The first reading is of the node idle (it served no session: a node of a few blocks alone
cannot). A node drops the file pages only its start touched once it serves (``node.memory``);
the ~30 MiB of library code a session runs fault back in while it serves (``serving``
below reads that) and are dropped again once it is idle (``node.memory.shed_when_idle``).

An unpacked p2pd's code is file pages (``discovery.p2pd_unpack``), split between every p2pd
of the machine: the bootstrap's, other nodes'. So its PSS depends on how many ran then
(``p2pds_on_machine``, counted at each measurement; ~55 MiB alone, ~43 beside the
bootstrap's); a UPX-packed p2pd (``p2pd_packed``) holds ~63 MiB whatever runs beside it.

``rss_overhead_mb`` adds every resident page in full (RSS, the node's and p2pd's) and takes
the weights away: what the overhead reads on a machine where nothing else maps the same
files, the bound sharing cannot raise (PSS on a busy machine reads less). ``node_file_mb``:
the node's resident pages of file mappings (library code, the GGUF), part of its RSS.

**Serving** (``serving=True``, the default): after the idle reading, a second node serves
the rest of the model (``[blocks, L)``), a client in this process generates
``SERVING_TOKENS`` greedy tokens through the two (the node read halfway: ``in_session_*``),
closes its session, and once the node has had no session for ``AFTER_SESSION_S`` the same
figures are read again (``serving``): what a node that served holds between sessions. A
session's KV cache is not overhead: a node holds it per session and is paid for it
(reservation fees), like its weights; the few tokens' worth a short session holds is ~0.1 MiB
anyway. What does count is whatever serving left behind: library code it paged back in,
heap it grew, threads it started.

**Cold manifest cache** (``cold_cache=True``): the measured node starts with a fresh
``LAYERCHAIN_HOME``, as a first start on a machine does, so it builds the model's manifest
(``model.manifest_worker``) before it serves; ``manifest_cache`` says which.

Result::

    {"model": str, "p2pd_packed": bool, "rows": [{"blocks", "dtype", "pss_mb_total",
     "pss_mb_by_process": {"node": MiB, "p2pd": MiB, ...}, "weights_mb", "overhead_mb",
     "processes", "p2pds_on_machine", "uss_mb_by_process": {...},
     "rss_mb_by_process": {...}, "rss_overhead_mb", "node_file_mb", "manifest_cache",
     "serving": {"tokens", "in_session_overhead_mb", "in_session_rss_overhead_mb",
                 "in_session_node_file_mb", "pss_mb_total", "pss_mb_by_process", "overhead_mb",
                 "rss_overhead_mb", "uss_mb_by_process", "rss_mb_by_process",
                 "node_file_mb", "p2pds_on_machine"} | null}]}

MiB throughout (2**20 bytes).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
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
from layerchain.node.memory import IdlePolicy, parse_smaps
from layerchain.types import Span

MIB = 2**20
SETTLE_S = 2.0  # after the node serves, before reading: its announce and reachability done
TARGET_OVERHEAD_MB = 250.0  # issue 21: all of a node's processes minus its weights
SERVING_TOKENS = 8  # greedy tokens the serving reading's client generates
SERVING_PROMPT = "What is the capital of France?"
# after the session closed: a node sheds what serving paged back in once no session has been
# open for IdlePolicy.quiet_s (checked every period_s); the reading waits that long
AFTER_SESSION_S = IdlePolicy().quiet_s + 2 * IdlePolicy().period_s + SETTLE_S
Reading = tuple[dict[str, tuple[float, float, float]], float, int]  # tree, file MiB, p2pds


@dataclass(frozen=True)
class ServingReading:
    """The same node's figures after it served a session (closed and the node idle for
    ``AFTER_SESSION_S`` when read), and halfway through it (``in_session_*``). MiB."""

    tokens: int  # tokens the session generated through it
    # halfway through the session (open, its KV cache held): the overheads then
    in_session_overhead_mb: float
    in_session_rss_overhead_mb: float
    in_session_node_file_mb: float
    pss_mb_total: float
    pss_mb_by_process: dict[str, float]
    overhead_mb: float  # pss_mb_total - weights
    rss_overhead_mb: float  # RSS of its processes - weights: no sharing (see module docstring)
    uss_mb_by_process: dict[str, float]
    rss_mb_by_process: dict[str, float]
    node_file_mb: float  # the node's resident pages of file mappings
    p2pds_on_machine: int


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
    rss_overhead_mb: float = 0.0  # RSS of its processes - weights (see module docstring)
    node_file_mb: float = 0.0  # the node's resident pages of file mappings
    manifest_cache: str = "warm"  # "cold": the node started with a fresh LAYERCHAIN_HOME
    serving: ServingReading | None = None  # after a session (``serving=True``)


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


def file_mb(pid: int) -> float:
    """MiB of process ``pid``'s resident pages in mappings of regular files (0.0 where
    ``/proc/PID/smaps`` cannot be read)."""
    try:
        with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
            mappings = parse_smaps(f.read())
    except OSError:
        return 0.0
    return sum(m.rss_kib for m in mappings if m.path.startswith("/")) / 1024


@contextlib.contextmanager
def _home(path: str | None) -> Iterator[None]:
    """``LAYERCHAIN_HOME`` set to ``path`` while processes start (None: unchanged)."""
    before = os.environ.get("LAYERCHAIN_HOME")
    if path is not None:
        os.environ["LAYERCHAIN_HOME"] = path
    try:
        yield
    finally:
        if path is not None:
            if before is None:
                os.environ.pop("LAYERCHAIN_HOME", None)
            else:
                os.environ["LAYERCHAIN_HOME"] = before


def _reading(pid: int) -> Reading:
    return tree_memory_mb(pid), file_mb(pid), count_processes("p2pd")


def _serve_a_session(peers: Sequence[str], model: str, dtype: str, pid: int
                     ) -> tuple[int, Reading]:
    """Generate ``SERVING_TOKENS`` greedy tokens through the swarm, reading node ``pid``
    halfway, its session open; return the tokens generated and that reading."""
    from layerchain.client import Swarm
    from layerchain.model import SamplingParams

    options = {} if dtype == "fp32" else {"dtype": dtype}
    during: Reading | None = None
    with Swarm(list(peers), model=model, **options) as client:
        generation = client.stream(SERVING_PROMPT,
                                   SamplingParams(max_new_tokens=SERVING_TOKENS))
        for event in generation:
            if during is None and event.index + 1 >= SERVING_TOKENS // 2:
                during = _reading(pid)
        tokens = len(generation.result.token_ids)
    return tokens, during if during is not None else _reading(pid)


def measure_node(state_dir: Path, peers: Sequence[str], model: str, blocks: int, dtype: str,
                 threads: int | None = None, timeout_s: float = 180.0, *,
                 serving: bool = False, cold_cache: bool = False) -> MemoryRow:
    """Start a node serving ``[0, blocks)`` in ``dtype``, read its processes' memory (and,
    with ``serving``, again after a session through it), stop it."""
    from layerchain.model import resolve_model

    name = f"mem-{dtype}-{blocks}"
    extra = () if dtype == "fp32" else ("--dtype", dtype)  # fp32: also before --dtype existed
    home = str(state_dir / f"home-{name}") if cold_cache else None
    with _home(home):
        proc, data_dir = start_node(state_dir, name, Span(0, blocks), peers, model=model,
                                    extra_args=extra, threads=threads)
    started = [LocalProcess(proc.pid, process_start(proc.pid))]
    served: tuple[int, Reading, Reading] | None = None
    try:
        # a cold cache: the node builds the manifest first (a child process; minutes under load)
        wait_ready(proc, data_dir, state_dir / f"{name}.log", timeout_s * (3 if cold_cache else 1))
        time.sleep(SETTLE_S)
        memory, node_file, p2pds = _reading(proc.pid)
        if serving:  # (resolved here after the node: a cold cache is built by the node)
            num_blocks = resolve_model(model).num_blocks
            if blocks >= num_blocks:
                raise ValueError(f"a serving reading needs fewer than {num_blocks} blocks")
            rest_name = f"{name}-rest"
            rest, rest_dir = start_node(state_dir, rest_name, Span(blocks, num_blocks), peers,
                                        model=model, extra_args=extra, threads=threads)
            started.append(LocalProcess(rest.pid, process_start(rest.pid)))
            wait_ready(rest, rest_dir, state_dir / f"{rest_name}.log", timeout_s)
            tokens, during = _serve_a_session(peers, model, dtype, proc.pid)
            time.sleep(AFTER_SESSION_S)
            served = tokens, during, _reading(proc.pid)
    finally:
        stop_pids(started)
    weights = span_weights_mb(model, blocks, dtype)
    figures = _figures(memory, weights)
    reading = None
    if served is not None:
        tokens, (in_memory, in_file, _), (served_memory, served_file, served_p2pds) = served
        in_session = _figures(in_memory, weights)
        reading = ServingReading(tokens=tokens,
                                 in_session_overhead_mb=in_session["overhead_mb"],
                                 in_session_rss_overhead_mb=in_session["rss_overhead_mb"],
                                 in_session_node_file_mb=round(in_file, 1),
                                 **_figures(served_memory, weights),
                                 node_file_mb=round(served_file, 1),
                                 p2pds_on_machine=served_p2pds)
    return MemoryRow(
        blocks=blocks, dtype=dtype, weights_mb=round(weights, 1),
        processes=len(memory), p2pds_on_machine=p2pds, **figures,
        node_file_mb=round(node_file, 1), manifest_cache="cold" if cold_cache else "warm",
        serving=reading,
    )


def _figures(memory: dict[str, tuple[float, float, float]], weights: float) -> dict:
    """The fields a reading shares with ``ServingReading`` (PSS, USS, RSS; overheads)."""
    pss = {name: mb[0] for name, mb in memory.items()}
    total = sum(pss.values())
    rss_total = sum(mb[2] for mb in memory.values())
    return {
        "pss_mb_total": round(total, 1),
        "pss_mb_by_process": {k: round(v, 1) for k, v in pss.items()},
        "overhead_mb": round(total - weights, 1),
        "rss_overhead_mb": round(rss_total - weights, 1),
        "uss_mb_by_process": {k: round(mb[1], 1) for k, mb in memory.items()},
        "rss_mb_by_process": {k: round(mb[2], 1) for k, mb in memory.items()},
    }


def run_memory_bench(model: str = DEFAULT_MODEL, blocks: Sequence[int] = (3, 10),
                     dtypes: Sequence[str] = ("fp32",), threads: int | None = None, *,
                     serving: bool = True, cold_cache: bool = False) -> dict:
    """One row per (dtype, blocks), nodes measured one at a time beside one bootstrap;
    ``serving``/``cold_cache``: see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="layerchain-bench-memory-") as tmp:
        state_dir = Path(tmp)
        boot_pid, peers = start_bootstrap(state_dir)
        boot = LocalProcess(boot_pid, process_start(boot_pid))
        try:
            rows = [measure_node(state_dir, peers, model, n, dtype, threads,
                                 serving=serving, cold_cache=cold_cache)
                    for dtype in dtypes for n in blocks]
        finally:
            stop_pids([boot], grace_s=3.0)
    return {"model": model, "target_overhead_mb": TARGET_OVERHEAD_MB,
            "p2pd_packed": p2pd_packed(), "rows": [asdict(row) for row in rows]}

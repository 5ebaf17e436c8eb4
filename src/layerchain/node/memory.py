"""A serving node lets go of the file pages it touched only while starting (issue 21, item 2).

Starting a node touches far more of its libraries' files than serving does: libtorch's
static initializers register thousands of operators (their code runs once), Python imports
read modules' code, and the span's GGUF bytes are read once to be dequantized. Those pages
stay mapped into the process, so they count in its RSS and PSS (a quiet machine, where few
processes share them, counts most of them in full) although nothing reads them again:
measured 2026-12-02 on SmolLM2, 3 blocks, ~95 MiB of file pages mapped after the load, of
which ~20 MiB come back while steps run (the kernels a step uses), the rest never.

``drop_clean_file_pages`` unmaps the resident pages of every mapping that is backed by a
regular file, is not writable, and holds no private (copy-on-write) page, with
``madvise(MADV_DONTNEED)``. For such a mapping that changes nothing the process can see:
its pages are the file's bytes, which is also why the kernel may drop them at any time
under memory pressure; a page used again faults back in from the page cache (a minor fault,
no disk read while the file stays cached). Mappings that hold private pages (a library's
relocated data, made read-only after relocation) are left alone: dropping those would
revert them to the file's bytes. Linux only; elsewhere a no-op.

Serving pages some of it back in: the kernels a step runs, the TLS, signing and hashing code
of each step, and the kernel's fault-around maps the 64 KiB around each page touched
(``fault_around_bytes``; ``MADV_RANDOM`` does not turn it off: measured). Measured
2026-12-02, a 3-block node after an 8-token session: its file pages 12.7 -> 44.0 MiB, its
overhead read RSS-bound 245.7 -> 289.5 MiB. ``shed_when_idle`` drops them again once no
session has been open for ``IdlePolicy.quiet_s``; the next session faults back what it uses
(minor faults from the page cache: a few ms once, docs/BENCHMARKS.md "Node memory").
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # linux/mman.h (the same on every Linux architecture we run on)
_KIB = 1024
# Go's GOGC for the node's p2pd (hivemind's Go daemon, which inherits the node's environment):
# collect at 25 % heap growth, not Go's 100: its private memory after serving a session
# 44.3 -> 36.3 MiB (measured 2026-12-02, docs/BENCHMARKS.md "Node memory"); its heap is a few MiB
P2PD_GOGC = "25"


def tune_p2pd_env(env: MutableMapping[str, str]) -> None:
    """Set ``P2PD_GOGC`` in ``env`` (a node's ``os.environ``, before its p2pd starts), unless
    GOGC is set already."""
    env.setdefault("GOGC", P2PD_GOGC)


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/self/smaps`` with the fields this module reads (KiB)."""

    start: int
    end: int
    perms: str  # "r-xp", "r--s", ...
    path: str  # "" for anonymous memory, "[heap]", "/usr/lib/...", "... (deleted)"
    rss_kib: int
    anonymous_kib: int  # private copy-on-write pages (not the file's bytes any more)
    swap_kib: int

    @property
    def clean_file_backed(self) -> bool:
        """Whether every resident page is the file's own bytes: a regular file's mapping,
        not writable, with no private page (resident or swapped out)."""
        return (self.path.startswith("/") and not self.path.startswith("/dev/")
                and not self.path.endswith("(deleted)") and "w" not in self.perms
                and self.anonymous_kib == 0 and self.swap_kib == 0)


def parse_smaps(text: str) -> list[Mapping]:
    """The mappings of an smaps text (``/proc/PID/smaps``), in order."""
    out: list[Mapping] = []
    head: list[str] | None = None
    fields: dict[str, int] = {}

    def close() -> None:
        if head is not None:
            start, end = (int(x, 16) for x in head[0].split("-"))
            out.append(Mapping(start, end, head[1], " ".join(head[5:]),
                               fields.get("Rss", 0), fields.get("Anonymous", 0),
                               fields.get("Swap", 0)))

    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0].endswith(":"):  # "Rss:  12 kB", "VmFlags: rd ex"
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
            continue
        close()  # a new mapping's first line: "start-end perms offset dev inode [path]"
        head, fields = parts, {}
    close()
    return out


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    madvise = getattr(libc, "madvise", None)
    if madvise is None:
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _own_mappings() -> Iterator[Mapping]:
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        yield from parse_smaps(f.read())


def drop_clean_file_pages() -> float:
    """Unmap the resident pages of this process's clean file-backed mappings (see the
    module's docstring); return how many MiB were resident in them (0.0 where not Linux)."""
    madvise = _madvise()
    if madvise is None:
        return 0.0
    try:
        mappings = list(_own_mappings())
    except OSError:
        return 0.0
    dropped_kib = 0
    for mapping in mappings:
        if mapping.rss_kib and mapping.clean_file_backed:
            if madvise(mapping.start, mapping.end - mapping.start, MADV_DONTNEED) == 0:
                dropped_kib += mapping.rss_kib
    return dropped_kib / _KIB


def shed_startup_memory() -> float:
    """Once a node serves: hand the C heap's free pages back (``malloc_trim``) and drop the
    file pages only its start touched. Returns the MiB of file pages dropped."""
    from layerchain.model.quant import release_freed_memory

    release_freed_memory()
    dropped = drop_clean_file_pages()
    log.info("dropped %.1f MiB of file pages touched while starting", dropped)
    return dropped


@dataclass(frozen=True)
class IdlePolicy:
    """When a node that served sheds again (``shed_when_idle``)."""

    period_s: float = 1.0  # seconds between two looks at what came back
    quiet_s: float = 3.0  # no session open for at least this long, seconds
    regrown_mb: float = 8.0  # file pages back above what the last shed left, MiB


def file_rss_mb() -> float:
    """MiB of this process's resident pages of file mappings (``RssFile``); 0.0 where
    ``/proc/self/status`` does not say."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) / _KIB
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


async def shed_when_idle(busy: Callable[[], bool], policy: IdlePolicy = IdlePolicy(),
                         clock: Callable[[], float] = time.monotonic) -> None:
    """Run until cancelled: each ``policy.period_s``, if ``busy()`` (a session open) has
    been false for ``policy.quiet_s`` and the file pages came back by ``policy.regrown_mb``
    since the last shed, shed again (``shed_startup_memory``, on a thread)."""
    floor = file_rss_mb()
    last_busy = clock()
    while True:
        await asyncio.sleep(policy.period_s)
        now = clock()
        if busy():
            last_busy = now
            continue
        if now - last_busy < policy.quiet_s or file_rss_mb() - floor < policy.regrown_mb:
            continue
        await asyncio.to_thread(shed_startup_memory)
        floor = file_rss_mb()

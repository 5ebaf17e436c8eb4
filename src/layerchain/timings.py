"""Start-up phase marks, written to stderr when ``LAYERCHAIN_TIMINGS=1``.

``layerchain bench startup`` starts ``layerchain generate`` with it set and reads the marks
(``layerchain.bench.startup``). Each mark is one line ``layerchain-timing {"phase": NAME,
"at": WALL, "s": SECONDS}``: ``at`` is the wall clock (``time.time()``, seconds since the
epoch) when the phase ended, so the reader can place it against the moment it started the
process; ``s`` the phase's own duration where it has one (else null). Off (the default), a
mark costs one environment lookup. Standard library only: the CLI imports this first.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "LAYERCHAIN_TIMINGS"
PREFIX = "layerchain-timing "


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def mark(phase: str, seconds: float | None = None) -> None:
    """Say that ``phase`` ended now (and took ``seconds``), if timings are on."""
    if enabled():
        line = json.dumps({"phase": phase, "at": time.time(),
                           "s": None if seconds is None else round(seconds, 4)})
        print(PREFIX + line, file=sys.stderr, flush=True)


@contextmanager
def timed(phase: str) -> Iterator[None]:
    """``mark(phase, duration)`` when the block ends without an exception."""
    start = time.perf_counter()
    yield
    mark(phase, time.perf_counter() - start)


def parse(stderr: str) -> dict[str, dict[str, float | None]]:
    """The marks in a process's stderr: ``{phase: {"at", "s"}}`` (the last of a repeated one)."""
    found: dict[str, dict[str, float | None]] = {}
    for line in stderr.splitlines():
        if line.startswith(PREFIX):
            item = json.loads(line[len(PREFIX):])
            found[item["phase"]] = {"at": item["at"], "s": item["s"]}
    return found

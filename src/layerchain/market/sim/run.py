"""``layerchain sim``'s whole run: simulate, measure, plot, write (issue 17.4).

``run_sim(config, out)`` runs ``model.simulate``, sweeps the Pareto frontier on the final
swarm, writes the plots and ``summary.json`` (the ``--json`` object) and ``details.json``
under ``out``, and returns the summary with the details. The CLI is a thin shell on it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerchain.errors import ConfigError
from layerchain.market.sim.model import Progress, SimConfig, simulate
from layerchain.market.sim.plots import write_plots
from layerchain.market.sim.summary import SimSummary, details, frontier, summarize


@dataclass(frozen=True)
class SimResult:
    """A finished run: the contract's summary and the docs' details."""

    summary: SimSummary
    details: dict[str, Any]


def run_sim(config: SimConfig, out: Path, progress: Progress | None = None) -> SimResult:
    """Simulate ``config``, write the plots, ``summary.json`` and ``details.json`` under
    ``out`` (created); ConfigError if ``out`` cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create output directory {out}: {error.strerror or error}",
                          hint="give --out a writable directory") from None
    began = time.perf_counter()
    trace = simulate(config, progress)
    simulated = time.perf_counter() - began
    front = frontier(trace.market, config.seed)
    plots = write_plots(trace, front, out)
    summary = summarize(trace, front, plots)
    more = details(trace, front)
    more["seconds"] = {"simulate": round(simulated, 1),
                       "total": round(time.perf_counter() - began, 1)}
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    (out / "details.json").write_text(json.dumps(more, indent=2) + "\n")
    return SimResult(summary, more)

"""``layerchain sim``: a discrete-event simulation (SimPy) of the market (issue 17.4).

Thousands of nodes run the real pricing (``market.pricing``) and placement
(``market.placement``) policies; clients are routed by the real planner
(``routing.plan_route``); a share of the nodes leaves at once. It measures the paper's
claims (seed 002 §3.2-3.4): prices converge per layer, lower compute cost earns a higher
price and revenue, placement evens the capacity per block, alpha traces the price-latency
frontier, and coverage recovers after churn. docs/MARKET.md reads a 10,000-node run.

* ``model``: the world (``SimConfig``, ``Market``) and its SimPy processes (``simulate``,
  returning a ``Trace``);
* ``summary``: the claims as numbers (``SimSummary``, the ``--json`` contract);
* ``plots``: the five PNGs;
* ``run``: all of it for one command (``run_sim``).
"""

from layerchain.market.sim.model import SimConfig, Trace, simulate
from layerchain.market.sim.run import SimResult, run_sim
from layerchain.market.sim.summary import ParetoPoint, SimSummary, summarize

__all__ = [
    "ParetoPoint",
    "SimConfig",
    "SimResult",
    "SimSummary",
    "Trace",
    "run_sim",
    "simulate",
    "summarize",
]

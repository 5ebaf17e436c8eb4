"""Benchmark: every network-facing attack class of issue 12 against a local swarm of real node
processes, each while an honest client generates; is it blocked, and what does it cost the
honest client?

The swarm: T (0:15, the target of the node-level attacks), S (0:15, its spare) and U
(15:30), each with a ``MAX_CACHE_TOKENS`` cache, otherwise the node defaults. For each
attack (``layerchain.bench.attacks``, in order) a fresh honest client warms up and
generates alone for ``baseline_s`` (its tokens/s alone: greedy generations of one short
prompt back to back, tokens over wall time, prefill and failovers included); then the
attack runs on its own thread for about ``duration_s`` while the same client keeps
generating, and the attack's records are withdrawn after it.

An attack is **blocked** when it was observed to reach its target, its defence held by its
own criterion (see each attack's docstring), and every honest generation during it gave the
one-process model's exact tokens. ``honest_tokens_per_s_ratio`` is the client's tokens/s
during the attack over its tokens/s alone just before: a paired comparison, so the load of
a shared machine, which drifts over minutes, weighs on both sides alike. Target (issue
12): all blocked, every ratio >= 0.8.

JSON (``layerchain bench hostile --json``)::

    {"attacks": [{"name", "blocked", "honest_tokens_per_s_ratio", "observed",
                  "defence_held", "honest": {...}, "details": {...}, "seconds"}, ...],
     "all_blocked", "honest_ratio_min", "baseline_tokens_per_s" (mean of the alone runs),
     "quick", "seconds"}
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from layerchain.bench.attacks import ATTACKS, Attack
from layerchain.bench.attacks.base import HonestLoad, NodeInfo, Outcome, Stage
from layerchain.bench.attacks.requests import PROSE, prompt_of
from layerchain.errors import ConfigError
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import Span

if TYPE_CHECKING:
    from layerchain.local import LocalSwarm

PROMPT = "What is the capital of France?"
SPANS = (Span(0, 15), Span(0, 15), Span(15, 30))  # target, spare, tail
MAX_CACHE_TOKENS = 20_000  # every node's KV-cache budget; one session may reserve a quarter
# of it (the node default), so the long prompt fits and a request longer than any node
# admits is still within the model's 8,192-token context
RATIO_TARGET = 0.8
ATTACK_GRACE_S = 90.0  # an attack still running this long after its window is cut off

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostileOptions:
    """How long each part of the bench runs; ``quick`` is the test's reduced run."""

    duration_s: float  # each timed attack, seconds
    baseline_s: float  # the honest client alone before each attack, seconds
    baseline_runs: int  # and at least this many generations
    honest_tokens: int  # tokens of each honest generation
    long_prompt_tokens: int  # the honest long prompt's length, tokens

    @classmethod
    def for_run(cls, quick: bool) -> HostileOptions:
        return cls(8.0, 2.0, 2, 12, 1200) if quick else cls(15.0, 5.0, 3, 16, 4000)


def run_hostile_bench(model: str = DEFAULT_MODEL, quick: bool = False,
                      attacks: Sequence[str] | None = None,
                      options: HostileOptions | None = None,
                      swarm: LocalSwarm | None = None) -> dict:
    """Run the named attacks (all by default) against a fresh local swarm; the JSON above.
    ``options`` (default ``HostileOptions.for_run(quick)``) sets the windows and lengths:
    the test's shape check runs shorter ones than ``--quick``. ``swarm``: attack this running
    local swarm of ``model`` instead (a test's, left running): its nodes 0, 1, 2 serve
    ``SPANS`` over plaintext tcp://, the spare and the tail with a ``MAX_CACHE_TOKENS`` cache
    at least (the target may have smaller limits: each attack reads what a node admits)."""
    from layerchain.client import Swarm
    from layerchain.local import swarm_down, swarm_up
    from layerchain.model import SamplingParams, resolve_model

    names = list(attacks or ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attacks {unknown}", hint=f"choose from {', '.join(ATTACKS)}")
    options = options or HostileOptions.for_run(quick)
    t_start = time.monotonic()
    spec = resolve_model(model)
    params = SamplingParams(max_new_tokens=options.honest_tokens)
    long_params = SamplingParams(max_new_tokens=4)
    # In a thread that then ends: its OpenMP team goes with it (see layerchain.node.server).
    with ThreadPoolExecutor(1) as pool:
        reference, long_text, long_ids, long_reference = pool.submit(
            _references, spec, params, long_params,
            options.long_prompt_tokens if "long_prompt" in names else 0).result()
    state = None if swarm else Path(tempfile.mkdtemp(prefix="layerchain-hostile-"))
    cache_args = ("--max-cache-tokens", str(MAX_CACHE_TOKENS))
    try:
        # plaintext (insecure): the attacks write raw frames and fake peers announce tcp://;
        # the same frame and admission defences run under TLS (tests/test_wire_tls.py)
        local = swarm if state is None else swarm_up(
            state, SPANS, model=model, node_args=[cache_args] * len(SPANS), insecure=True)
        assert local is not None
        if [Span(n["start"], n["end"]) for n in local.nodes[:len(SPANS)]] != list(SPANS):
            raise ConfigError(f"the hostile bench needs nodes serving {list(map(str, SPANS))}")
        nodes = [NodeInfo(f"node-{i}", n["peer_id"], n["endpoint"], n["pid"], n["start"], n["end"],
                          n.get("wallet", "")) for i, n in enumerate(local.nodes)]

        def client() -> Swarm:
            # a short discovery wait: a generation that finds no route fails in seconds
            return Swarm(local.initial_peers, model=model, discovery_wait_s=5.0, insecure=True)

        rows = []
        for name in names:
            with client() as honest_client:
                honest = HonestLoad(honest_client, PROMPT, params, reference)
                honest.generate_once()  # warm-up: first connections and RTTs
                alone = _alone(honest, options)  # the same client just before: a paired baseline
                stage = Stage(
                    initial_peers=tuple(local.initial_peers), model_id=spec.model_id,
                    num_blocks=spec.num_blocks, hidden_size=spec.hidden_size,
                    target=nodes[0], spare=nodes[1], tail=nodes[2],
                    client=honest_client, honest=honest, duration_s=options.duration_s,
                    max_cache_tokens=MAX_CACHE_TOKENS, long_prompt=long_text,
                    long_prompt_tokens=len(long_ids), long_reference=tuple(long_reference),
                    long_params=long_params,
                )
                rows.append(_run_attack(name, ATTACKS[name], stage, alone))
    finally:
        if state is not None:
            swarm_down(state, quiet=True)
    alones = [r["honest"]["alone_tokens_per_s"] for r in rows]
    return {
        "attacks": rows,
        "all_blocked": all(r["blocked"] for r in rows),
        "honest_ratio_min": min((r["honest_tokens_per_s_ratio"] for r in rows), default=None),
        "baseline_tokens_per_s": round(statistics.mean(alones), 2) if alones else None,
        "quick": quick,
        "seconds": round(time.monotonic() - t_start, 1),
    }


def _references(spec, params, long_params, long_tokens: int) -> tuple[list[int], str, list[int], list[int]]:
    """The one-process greedy tokens of the honest prompt and of a long raw prompt."""
    from layerchain.model import LocalModel, encode_prompt

    model = LocalModel(spec)
    reference = list(model.generate(PROMPT, params).token_ids)
    if not long_tokens:
        return reference, "", [], []
    text = prompt_of(model.tokenizer, long_tokens, PROSE)
    ids = encode_prompt(model.tokenizer, text, raw=True)
    return reference, text, ids, list(model.generate(text, long_params, raw=True).token_ids)


def _alone(honest: HonestLoad, options: HostileOptions) -> float:
    """The honest client's tokens/s with no attack, for ``options.baseline_s`` and at least
    ``options.baseline_runs`` generations; its generations are then forgotten."""
    end = time.monotonic() + options.baseline_s
    honest.run_while(lambda: time.monotonic() < end, at_least=options.baseline_runs)
    tokens_per_s = honest.tokens_per_s()
    honest.generations.clear()
    return tokens_per_s


def _run_attack(name: str, attack: Attack, stage: Stage, alone: float) -> dict:
    """Run ``attack`` on its own thread while ``stage.honest`` generates on this one."""
    box: list[Outcome] = []

    def run() -> None:
        try:
            box.append(asyncio.run(asyncio.wait_for(attack(stage), stage.duration_s + ATTACK_GRACE_S)))
        except Exception as error:  # noqa: BLE001 - a broken attack is reported, not fatal
            box.append(Outcome(False, False, {"attack_error": f"{type(error).__name__}: {error}"[:300]}))

    t0 = time.monotonic()
    thread = threading.Thread(target=run, name=f"attack-{name}", daemon=True)
    thread.start()
    stage.honest.run_while(thread.is_alive)
    thread.join()
    outcome, honest = box[0], stage.honest
    errors = honest.errors()
    log.info("%s: observed %s, defence held %s, honest %.2f tokens/s, %d honest errors; %s",
             name, outcome.observed, outcome.held, honest.tokens_per_s(), len(errors),
             outcome.details)
    return {
        "name": name,
        "blocked": outcome.observed and outcome.held and honest.all_exact() and not errors,
        "honest_tokens_per_s_ratio": round(honest.tokens_per_s() / alone, 3) if alone else 0.0,
        "observed": outcome.observed,
        "defence_held": outcome.held,
        "honest": {
            "generations": len(honest.generations),
            "exact": sum(g.exact for g in honest.generations),
            "errors": len(errors),
            "first_errors": sorted(set(errors))[:3],
            "tokens_per_s": round(honest.tokens_per_s(), 2),
            "alone_tokens_per_s": round(alone, 2),
        },
        "details": outcome.details,
        "seconds": round(time.monotonic() - t0, 1),
    }

"""Benchmark: how soon audits catch each cheating node, how often they cry wolf, what they cost.

``layerchain bench verify --json`` prints::

    {"audit_rate", "modes": [{"mode", "runs", "detected", "tokens_to_detect_p50"}],
     "honest_audited_steps", "false_positives", "commitment_bytes_per_token",
     "overhead_ratio", ...}

Harness: an in-process swarm over the memory transport and memory discovery with the real
weights of ``model`` (the default model unless told): real spans, sessions, receipts,
commitments, audits, referees and rollbacks; only the sockets and the DHT are in memory.
That is what makes thousands of honest audited steps affordable on a 2-core machine; a
real-process run differs in scheduling, not in what is computed. Torch runs ``threads``
threads (1: on a loaded 2-core machine two threads run several times slower).

* **Cheating runs**, per mode of ``node.misbehave.MODES``, over two hops ``A = [0, L/2)``
  and ``B = [L/2, L)``: one cheating node serves A at price 1, two honest nodes serve A at
  price 2 (an auditor and a referee), two honest nodes serve B; the client routes cheapest
  first (``alpha = 1``), so its route goes through the cheater and its audits through the
  honest spares. Each run is a fresh client (no bans carried over) generating up to
  ``max_new_tokens`` (``sometimes``: ``sometimes_tokens``); it stops once the cheater is
  caught. ``detected``: runs in which the client banned the cheater for its output (an
  audit's dispute, or the per-step output checks: see ``_Watch``). ``tokens_to_detect``: tokens the cheater had computed in the run's
  session at that moment, less the prompt's (0: caught on the prompt), from the node's own
  count.
* **Honest runs**: ``HONEST_HOPS`` hops, two honest nodes each, two generations at a time
  (concurrent sessions), torch's thread count switched between 1 and 2 while they run,
  until ``honest_steps`` hop steps were audited; every accusation of a node (``_alarm``)
  is a false positive. Accusations of the honest nodes of the cheating runs are counted
  too (``false_alarms`` per mode); a run or generation that fails is counted, not fatal. The same swarm, one generation at a time, alternately with audits at
  ``audit_rate`` and without, gives ``overhead_ratio`` = tokens/s with / without.

On one machine every audit's recomputation competes with the generation for the same
cores; on a swarm of machines it runs on the auditor's, so ``overhead_ratio`` here is a
lower bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import statistics
import tempfile
import time
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from layerchain.errors import LayerchainError
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.types import even_spans

HONEST_HOPS = 5  # hops of the honest swarm: each token is 5 audited hop steps

PROMPTS = (
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how a steam engine works.",
    "Describe a journey across a desert, day by day.",
    "List the planets of the solar system and tell something about each.",
    "Write a letter to a friend about your new garden.",
    "Tell me the history of the printing press.",
)


@dataclass(frozen=True)
class ModeResult:
    """What the cheating runs of one mode found."""

    mode: str
    runs: int
    detected: int  # runs with a dispute naming the cheater
    tokens_to_detect_p50: float | None  # median over detected runs; None if none was
    tokens_to_detect_max: int | None
    false_alarms: int  # accusations of honest nodes during these runs
    failed: int  # runs that ended in an error (the error of the first is ``first_error``)
    first_error: str = ""
    false_alarm_examples: tuple[str, ...] = ()


def _alarm(record: logging.LogRecord) -> str | None:
    """The peer a client log record accuses of a wrong output, or None.

    Accusations: an audit's dispute (``client.audit``: "peer ... lied at step", after a
    referee agreed), a ban for the per-step output checks (``client.rules.check_output``:
    "... returned ..."; a node returning zeros is caught there, before any audit) or for an
    audit a referee contradicted or none could settle. A ban for a timeout or a dropped
    connection is not one."""
    args = record.args if isinstance(record.args, tuple) else ()
    if not args or not isinstance(args[0], str):
        return None
    message = str(record.msg)
    if message.startswith("peer %s lied at step"):
        return args[0]
    if message.startswith("banned peer %s for"):
        reason = str(args[-1])
        if any(s in reason for s in (" returned ", "disagreed with a referee", "no referee")):
            return args[0]
    return None


class _Watch(logging.Handler):
    """Collects the client's accusations (``_alarm``) while installed: ``caught_at`` gets,
    for each accusation of ``peer_id``, the tokens the watched ``node``'s sessions hold at
    that moment (the node's own count of what it computed; 0 without a node);
    ``others`` counts the accusations of any other peer (with ``peer_id`` None: all)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.peer_id: str | None = None
        self.node: object | None = None
        self.caught_at: list[int] = []
        self.others = 0
        self.examples: list[str] = []  # the first few accusations of other peers, as logged

    def emit(self, record: logging.LogRecord) -> None:
        accused = _alarm(record)
        if accused is None:
            return
        if accused != self.peer_id:
            self.others += 1
            if len(self.examples) < 3:
                self.examples.append(record.getMessage())
            return
        sessions = self.node.sessions._sessions.values() if self.node else ()  # type: ignore[attr-defined]
        self.caught_at.append(max((s.tokens for s in sessions), default=0))


@contextlib.contextmanager
def _watching() -> Iterator[_Watch]:
    watch = _Watch()
    logger = logging.getLogger("layerchain.client")  # its audit and peers loggers propagate
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)


class _Swarm:
    """Nodes over the memory transport and discovery, sharing one loaded span per range."""

    def __init__(self, model: str, tmp: Path) -> None:
        from layerchain.discovery import MemoryDHT
        from layerchain.model import load_head, load_tokenizer, resolve_model
        from layerchain.wire import MemoryNetwork

        self.model, self.tmp = model, tmp
        self.spec = resolve_model(model)
        self.head, self.tokenizer = load_head(self.spec), load_tokenizer(self.spec)
        self.dht, self.wire = MemoryDHT(), MemoryNetwork()
        self.spans: dict[tuple[int, int], object] = {}
        self.nodes: list[object] = []

    async def add(self, start: int, end: int, *, price: int = 1, misbehave: str = "") -> object:
        from layerchain.discovery import Identity, MemoryDiscovery
        from layerchain.model import load_span
        from layerchain.node import Node, NodeConfig
        from layerchain.wire import MemoryTransport

        if (start, end) not in self.spans:
            self.spans[start, end] = load_span(self.spec, start, end)
        identity = Identity.generate()
        node = Node(
            NodeConfig(model=self.model, start=start, end=end, price_per_block=price,
                       misbehave=misbehave, data_dir=self.tmp / identity.peer_id),
            spec=self.spec, span=self.spans[start, end],
            transport=MemoryTransport(self.wire), listen_at=f"mem://{identity.peer_id}",
            discovery=MemoryDiscovery(self.dht, identity), identity=identity,
        )
        await node.start()
        self.nodes.append(node)
        return node

    def client(self, audit_rate: float) -> object:
        from layerchain.client import AsyncSwarm, ClientConfig, RouteLimits
        from layerchain.discovery import MemoryDiscovery
        from layerchain.wire import MemoryTransport

        return AsyncSwarm(
            spec=self.spec, head=self.head, tokenizer=self.tokenizer,
            discovery=MemoryDiscovery(self.dht), transport=MemoryTransport(self.wire),
            config=ClientConfig(discovery_wait_s=5.0, limits=RouteLimits(alpha=1.0),
                                audit_rate=audit_rate, max_price_multiple=None),
        )

    async def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.stop(drain_s=0)  # type: ignore[attr-defined]


def encode_prompt(tokenizer: object, prompt: str) -> list[int]:
    from layerchain.model import encode_prompt as encode

    return encode(tokenizer, prompt)


def _params(run: int, max_new_tokens: int) -> object:
    from layerchain.model import SamplingParams

    # sampled, seeded per run: runs differ in their inputs, each is reproducible
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, seed=run)


async def _close_client(client: object) -> None:
    with contextlib.suppress(Exception):
        await client.close(settle_s=0.0)  # type: ignore[attr-defined]


async def _cheat_runs(
    model: str, mode: str, runs: int, max_new_tokens: int, audit_rate: float, tmp: Path
) -> ModeResult:
    swarm = _Swarm(model, tmp)
    half = swarm.spec.num_blocks // 2
    try:
        cheater = await swarm.add(0, half, price=1, misbehave=mode)
        for _ in range(2):
            await swarm.add(0, half, price=2)
            await swarm.add(half, swarm.spec.num_blocks, price=2)
        detected, failed, first_error, latencies = 0, 0, "", []
        with _watching() as watch:
            watch.node, watch.peer_id = cheater, cheater.identity.peer_id  # type: ignore[attr-defined]
            for run in range(runs):
                client = swarm.client(audit_rate)
                prompt = PROMPTS[run % len(PROMPTS)]
                watch.caught_at.clear()
                try:  # a run ends when the cheater is caught: the rest is the honest peers'
                    stream = client.generate_stream(prompt, _params(run, max_new_tokens))  # type: ignore[attr-defined]
                    async for _ in stream:
                        if watch.caught_at:
                            break
                    await stream.aclose()
                except LayerchainError as error:  # counted; the next run goes on
                    failed += 1
                    first_error = first_error or str(error)
                finally:
                    await _close_client(client)
                if watch.caught_at:
                    detected += 1
                    prompt_tokens = len(encode_prompt(swarm.tokenizer, prompt))
                    latencies.append(max(0, watch.caught_at[0] - prompt_tokens))
        return ModeResult(
            mode, runs, detected,
            statistics.median(latencies) if latencies else None,
            max(latencies) if latencies else None,
            watch.others, failed, first_error, tuple(watch.examples),
        )
    finally:
        await swarm.close()


@contextlib.asynccontextmanager
async def _thread_flipper(period_s: float = 0.1) -> AsyncIterator[None]:
    """Switch torch's thread count between 1 (3 periods of ``period_s``) and 2 (1 period)
    while it is held, so audited and auditing computations run at different thread counts.
    (Mostly 1: on a loaded 2-core machine two threads run several times slower.)"""
    before = torch.get_num_threads()

    async def flip() -> None:
        for tick in itertools.count():
            torch.set_num_threads(2 if tick % 4 == 3 else 1)
            await asyncio.sleep(period_s)

    task = asyncio.get_running_loop().create_task(flip())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        torch.set_num_threads(before)


async def _audited_generations(
    swarm: _Swarm, honest_steps: int, max_new_tokens: int, audit_rate: float
) -> tuple[int, int]:
    """Generations two at a time until ``honest_steps`` hop steps were audited:
    ``(audited steps, failed generations)``."""
    audited = run = failed = 0
    while audited < honest_steps:
        clients = [swarm.client(audit_rate) for _ in range(2)]
        try:
            results = await asyncio.gather(*(
                c.generate(PROMPTS[(run + i) % len(PROMPTS)],  # type: ignore[attr-defined]
                           _params(run + i, max_new_tokens))
                for i, c in enumerate(clients)
            ), return_exceptions=True)
        finally:
            for c in clients:
                await _close_client(c)
        run += 2
        for r in results:
            if isinstance(r, LayerchainError):
                failed += 1
            elif isinstance(r, BaseException):
                raise r
            else:
                audited += r.audited_steps
        if failed > max(4, run // 4):
            raise LayerchainError(f"{failed} of {run} honest generations failed")
    return audited, failed


async def _honest_runs(
    model: str, honest_steps: int, max_new_tokens: int, audit_rate: float,
    overhead_runs: int, tmp: Path,
) -> tuple[int, int, int, float, float, float]:
    """(audited steps, false positives, failed generations, overhead ratio, tokens/s with,
    tokens/s without)."""
    swarm = _Swarm(model, tmp)
    try:
        for _ in range(2):
            for span in even_spans(swarm.spec.num_blocks, min(HONEST_HOPS, swarm.spec.num_blocks)):
                await swarm.add(span.start, span.end)
        with _watching() as alarms:
            async with _thread_flipper():
                audited, failed = await _audited_generations(
                    swarm, honest_steps, max_new_tokens, audit_rate)
        false_positives = alarms.others
        timed = {True: [0, 0.0], False: [0, 0.0]}  # audits on? -> [tokens, seconds]
        for i in range(2 * overhead_runs):
            audits = i % 2 == 0
            client = swarm.client(audit_rate if audits else 0.0)
            try:
                t0 = time.perf_counter()
                result = await client.generate(PROMPTS[0], _params(i // 2, max_new_tokens))  # type: ignore[attr-defined]
                timed[audits][1] += time.perf_counter() - t0
                timed[audits][0] += len(result.token_ids)
            finally:
                await _close_client(client)
        with_tps = timed[True][0] / max(timed[True][1], 1e-9)
        without_tps = timed[False][0] / max(timed[False][1], 1e-9)
        ratio = with_tps / max(without_tps, 1e-9)
        return audited, false_positives, failed, ratio, with_tps, without_tps
    finally:
        await swarm.close()


def run_verify_bench(
    *,
    model: str = DEFAULT_MODEL,
    audit_rate: float | None = None,
    runs: int = 20,
    max_new_tokens: int = 64,
    sometimes_tokens: int = 256,
    honest_steps: int = 10_000,
    overhead_runs: int = 4,
    modes: tuple[str, ...] | None = None,
    seed: int = 0,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Run the cheating and honest runs (see the module docstring); the JSON document.
    ``progress`` gets one line per finished part (a mode, the honest runs)."""
    say = progress or (lambda line: None)
    from layerchain.client import ClientConfig
    from layerchain.market.commitment import COMMITMENT_BYTES_PER_TOKEN
    from layerchain.node.misbehave import MODES

    rate = ClientConfig().audit_rate if audit_rate is None else audit_rate
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    logging.getLogger("layerchain").setLevel(logging.WARNING)
    chosen = MODES if modes is None else modes
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="layerchain-bench-verify-") as tmp:
        results = []
        for mode in chosen:
            results.append(asyncio.run(_cheat_runs(
                model, mode, runs, sometimes_tokens if mode == "sometimes" else max_new_tokens,
                rate, Path(tmp) / mode,
            )))
            say(f"{results[-1]} after {time.perf_counter() - t0:.0f} s")
        audited, false_positives, failed, ratio, with_tps, without_tps = asyncio.run(
            _honest_runs(model, honest_steps, max_new_tokens, rate, overhead_runs,
                         Path(tmp) / "honest")
        )
        say(f"honest: {audited} audited steps, {false_positives} false positives, {failed} "
            f"failed generations, overhead "
            f"{ratio:.3f} after {time.perf_counter() - t0:.0f} s")
    return {
        "audit_rate": rate,
        "modes": [
            {"mode": r.mode, "runs": r.runs, "detected": r.detected,
             "tokens_to_detect_p50": r.tokens_to_detect_p50,
             "tokens_to_detect_max": r.tokens_to_detect_max, "false_alarms": r.false_alarms,
             "failed": r.failed, **({"first_error": r.first_error} if r.first_error else {}),
             **({"false_alarm_examples": list(r.false_alarm_examples)}
                if r.false_alarm_examples else {})}
            for r in results
        ],
        "honest_audited_steps": audited,
        "false_positives": false_positives,
        "honest_failed_generations": failed,
        "false_alarms_in_cheat_runs": sum(r.false_alarms for r in results),
        "commitment_bytes_per_token": COMMITMENT_BYTES_PER_TOKEN,
        "overhead_ratio": round(ratio, 3),
        "tokens_per_s_with_audits": round(with_tps, 2),
        "tokens_per_s_without_audits": round(without_tps, 2),
        "model": model,
        "max_new_tokens": max_new_tokens,
        "sometimes_tokens": sometimes_tokens,
        "harness": "in-process memory swarm, real weights (see layerchain.bench.verify)",
        "seconds": round(time.perf_counter() - t0, 1),
    }

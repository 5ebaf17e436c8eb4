"""The node's market: where it serves and at what price, fed from the DHT (seed 002 §3.3-3.4).

The rules are ``market.pricing`` and ``market.placement`` (pure); this module only reads the
swarm's records, calls them, and acts:

* ``place_node`` (start, no ``--blocks``): a probe block gives this node's bytes and ms per
  block; its budget is ``--max-blocks`` or what fits ``--memory-gb`` (weights only; default
  half the memory available); ``choose_span`` over the capacity the records announce picks
  the span, and one line says why. ``place_by_manifest``: the same for a node with nothing
  local (``--model MODEL_ID``), before it fetches its span: the shape from the manifest (a
  block's bytes: its fp32 file's, an upper bound), its speed assumed the swarm's median
  until it measures itself, and only blocks some peer serves (``fetchable_span``): nodes
  seed only their span's files, so a block nobody serves cannot be fetched.
* ``MarketTask`` (running node): every ``reprice_every_s`` an adaptive node re-prices from the
  offers of the peers overlapping its span (``DEFAULT_DEMAND``: module ``market.pricing``) and
  re-announces when its whole-credit price changes; every ``rebalance_every_s`` (with jitter,
  so nodes seeing the same hole do not all move at once) it asks ``plan_move`` and, if told,
  moves: loads the new span, swaps it in (new sessions open there, the old span refuses
  them; the seeder offers its files), announces it (the announcer withdraws the blocks
  left), registers the new block count with its stake, lets the old span's open sessions
  finish for ``drain_s`` (then closes them: their clients fail over and replay, the output
  unchanged), and frees the old weights.

Nothing here runs on a step's path: the task wakes every few seconds at most. A move's load
(reading and converting weights: seconds) runs in a thread of its own that ends with it, so
the node keeps answering meanwhile and no OpenMP team outlives it (``node.server``'s note);
its speed is then measured on the loop thread, as at start, one step at a time
(``measure_between_steps``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from layerchain.discovery import Discovery, PeerRecord
from layerchain.errors import ConfigError, LayerchainError
from layerchain.market.placement import block_capacity, choose_span, plan_move, score_span
from layerchain.market.pricing import DEFAULT_DEMAND, Offer, pricing_policy
from layerchain.model.manifest import manifest_files
from layerchain.model.shards import block_file
from layerchain.node.config import NodeConfig
from layerchain.node.server import measure_between_steps
from layerchain.types import Span

log = logging.getLogger(__name__)
T = TypeVar("T")

GIB = 1 << 30
DRAIN_POLL_S = 0.1  # how often a move checks whether the old span's sessions are done
JITTER = 0.25  # a rebalance period is drawn from (1 +- JITTER) x rebalance_every_s


# ---------------------------------------------------------------- pure helpers


def offers_on(records: Sequence[PeerRecord], span: Span, peer_id: str) -> list[Offer]:
    """The offers of the other peers serving some block of ``span`` (their announced price and
    compute cost), sorted by peer id."""
    return [Offer(float(r.price_per_block), r.ms_per_block)
            for r in sorted(records, key=lambda r: r.peer_id)
            if r.peer_id != peer_id and r.start < span.end and span.start < r.end]


def capacity_of(records: Sequence[PeerRecord], num_blocks: int,
                leave_out: str = "") -> tuple[float, ...]:
    """Tokens/s per block ``[num_blocks]`` the records announce (``market.placement``), all
    but ``leave_out``'s."""
    return block_capacity(((r.span, r.ms_per_block) for r in records if r.peer_id != leave_out
                           and r.end <= num_blocks), num_blocks)


@dataclass(frozen=True)
class Budget:
    """How many blocks a node may serve, and why."""

    blocks: int
    why: str  # e.g. "--max-blocks 10", "--memory-gb 2: 94.5 MiB a block"


def budget(config: NodeConfig, num_blocks: int, block_bytes: int,
           available_bytes: int) -> Budget:
    """Blocks a node may serve: ``max_blocks``, what fits ``memory_gb`` (or half of
    ``available_bytes`` when neither is set), and the model's; ConfigError when not one fits."""
    limits = [(num_blocks, f"the model's {num_blocks}")]
    if config.max_blocks:
        limits.append((config.max_blocks, f"--max-blocks {config.max_blocks}"))
    if config.memory_gb or not config.max_blocks:
        room = config.memory_gb * GIB if config.memory_gb else available_bytes / 2
        said = f"--memory-gb {config.memory_gb:g}" if config.memory_gb else \
            f"half the {available_bytes / GIB:.1f} GiB available"
        limits.append((int(room // max(1, block_bytes)),
                       f"{said} at {block_bytes / 2**20:.1f} MiB a block"))
    blocks, why = min(limits, key=lambda item: item[0])
    if blocks < 1:
        raise ConfigError(f"no block of this model fits: {why}",
                          hint="give a larger --memory-gb or --max-blocks")
    return Budget(blocks, why)


def placement_line(capacity: Sequence[float], span: Span, ms_per_block: float,
                   why: str) -> str:
    """One line saying which span a node picked and why."""
    score = score_span(capacity, span, ms_per_block)
    weakest = min(capacity[span.start:span.end])
    reason = (f"{score.uncovered} of its blocks had no server" if score.uncovered
              else f"its weakest block had {weakest:.0f} tokens/s")
    return (f"picked blocks {span} of {len(capacity)}: {reason}; share of compute "
            f"{score.share:.2f} (seed 002 eq. 7) over {span.length} blocks, at most {why}")


def available_memory_bytes() -> int:
    """Memory available now (``os.sysconf``; 0 where the system does not say)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 0


# ---------------------------------------------------------------- placement at start


async def place_node(discovery: Discovery, spec: Any, config: NodeConfig,
                     probe: Callable[[], tuple[int, float]]) -> tuple[Span, Budget, str]:
    """The span a node without ``--blocks`` serves, its budget, and the line saying why.
    ``probe()`` loads one block and returns (its weight bytes, ms per block per token)."""
    block_bytes, ms_per_block = probe()
    records = await discovery.find(spec.model_id, spec.num_blocks)
    return _place(records, spec.num_blocks, block_bytes, ms_per_block, config,
                  discovery.identity.peer_id)


async def place_by_manifest(discovery: Discovery, model_id: str, manifest: dict[str, Any],
                            config: NodeConfig) -> tuple[Span, Budget, str]:
    """``place_node`` for a node that has only ``manifest`` (checked; ``model.manifest``) of
    the model whose records are announced as ``model_id`` (its form's id): a block's bytes
    are block 0's file's, its ms per block the median the records announce (1.0 if none)."""
    num_blocks = int(manifest["num_blocks"])
    block_bytes = manifest_files(manifest)[block_file(0)].size or 0
    records = await discovery.find(model_id, num_blocks)
    others = [r.ms_per_block for r in records if r.peer_id != discovery.identity.peer_id]
    ms_per_block = statistics.median(others) if others else 1.0
    return _place(records, num_blocks, block_bytes, ms_per_block, config,
                  discovery.identity.peer_id, choose=fetchable_span)


def fetchable_span(capacity: Sequence[float], ms_per_block: float, max_blocks: int) -> Span:
    """``choose_span`` among the blocks some peer serves (capacity > 0): the best span
    (``score_span``; the first on a tie) of those ``choose_span`` picks within each run of
    served blocks. ConfigError if no block is served."""
    runs, start = [], None
    for b, c in enumerate([*capacity, 0.0]):
        if c > 0 and start is None:
            start = b
        elif c <= 0 and start is not None:
            runs.append(Span(start, b))
            start = None
    if not runs:
        raise ConfigError("no peer serves a block of this model: nothing to fetch",
                          hint="start a node with the model's files first")
    picks = []
    for run in runs:
        best = choose_span(capacity[run.start:run.end], ms_per_block,
                           min(max_blocks, run.length))
        picks.append(Span(run.start + best.start, run.start + best.end))
    return max(picks, key=lambda span: score_span(capacity, span, ms_per_block))


def _place(records: Sequence[PeerRecord], num_blocks: int, block_bytes: int,
           ms_per_block: float, config: NodeConfig, peer_id: str,
           choose: Callable[[Sequence[float], float, int], Span] = choose_span
           ) -> tuple[Span, Budget, str]:
    ms_per_block = max(ms_per_block, config.emulate_ms_per_block)
    limit = budget(config, num_blocks, block_bytes, available_memory_bytes())
    capacity = capacity_of(records, num_blocks, leave_out=peer_id)
    span = choose(capacity, ms_per_block, limit.blocks)
    return span, limit, placement_line(capacity, span, ms_per_block, limit.why)


# ---------------------------------------------------------------- the running node's task


async def in_own_thread(fn: Callable[[], T], name: str = "layerchain-load") -> T:
    """``fn()`` run in a new thread that ends when it returns, awaited without blocking the
    event loop. Not ``asyncio.to_thread``: its pool's threads live on, and a thread that ran
    torch's parallel ops keeps an OpenMP team while it lives (``node.server``). If the
    awaiting task is cancelled, ``fn`` still runs to its end; its result is dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as error:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return await done


class MarketTask:
    """Re-pricing and rebalancing of one running node (module docstring). ``load(span)``
    loads a span (a SpanModel; blocking: the runner's holds its machine lock); a move runs it
    in a thread of its own."""

    def __init__(self, node: Any, config: NodeConfig, max_blocks: int,
                 load: Callable[[Span], Any],
                 rng: random.Random | None = None) -> None:
        self.node = node
        self.config = config
        self.max_blocks = max_blocks  # what a move may take
        self.load = load
        self.rng = rng or random.Random()
        self.policy = pricing_policy(config.pricing, **(
            {"min_price": float(config.min_price), "max_price": float(config.max_price)}
            if config.pricing == "adaptive" else {}))
        # the exact price the policy climbs (the record carries whole credits)
        self.price = float(max(config.price_per_block, config.min_price)
                           if config.pricing == "adaptive" else config.price_per_block)
        self.moves = 0  # spans moved to since start
        self.moving = False  # a move (load, swap, drain) is under way

    def _records(self) -> Any:
        node = self.node
        return node.discovery.find(node.spec.model_id, node.spec.num_blocks)

    async def reprice(self) -> int:
        """One re-pricing round: the whole-credit price announced (re-announced if it moved)."""
        node = self.node
        records = await self._records()
        span = Span(node.span.start, node.span.end)
        offers = [Offer(self.price, node.announced_ms_per_block),
                  *offers_on(records, span, node.peer_id)]
        self.price = self.policy.next_price(0, offers, DEFAULT_DEMAND)
        price = min(self.config.max_price, max(self.config.min_price, round(self.price)))
        if price != node.payments.price:
            log.info("price %d -> %d credits per block per token (%d offers on %s)",
                     node.payments.price, price, len(offers), span)
            node.set_price(price)
            if node.announcer is not None:
                await node.announcer.announce_now()
        return price

    async def rebalance(self) -> Span | None:
        """One placement check: the span moved to, or None."""
        node = self.node
        records = await self._records()
        current = Span(node.span.start, node.span.end)
        ms = node.announced_ms_per_block
        others = capacity_of(records, node.spec.num_blocks, leave_out=node.peer_id)
        own = block_capacity([(current, ms)], node.spec.num_blocks)
        target = plan_move([a + b for a, b in zip(others, own)], current, ms, self.max_blocks,
                           self.config.rebalance_threshold)
        if target is not None:
            log.warning("moving from blocks %s to %s: %s", current, target,
                        placement_line(others, target, ms, f"{self.max_blocks} blocks"))
            await self.move(target)
        return target

    async def move(self, target: Span) -> None:
        """Hot-swap to ``target``: load (in a thread of its own) and measure, swap, announce,
        register the stake's blocks, drain the old span, free it."""
        node = self.node
        self.moving = True
        try:
            span = await in_own_thread(lambda: self.load(target))
            ms_per_block = await measure_between_steps(span, node.spec.hidden_size)
            old = node.swap_span(span, ms_per_block)
            if node.announcer is not None:
                await node.announcer.announce_now()
            self.moves += 1
            try:  # the uptime reward is per block served: the ledger learns the new count
                await node.payments.register()
            except LayerchainError as error:  # the next move or restart tries again
                log.warning("could not register %s blocks with the stake: %s", target.length,
                            error)
            await drain(node, old, self.config.drain_s)
            del old  # the last reference: its weights go
            from layerchain.model.quant import release_freed_memory

            release_freed_memory()
        finally:
            self.moving = False

    async def run(self) -> None:
        """Re-price and rebalance on their periods until cancelled; a failing round (a DHT
        hiccup, a span that would not load) is logged and tried again next period: the node
        keeps serving what it serves."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_price = now + self.config.reprice_every_s if self.config.pricing == "adaptive" \
            else math.inf
        next_move = now + self._rebalance_period() if self.config.rebalance_every_s else math.inf
        while True:
            await asyncio.sleep(max(0.0, min(next_price, next_move) - loop.time()))
            now = loop.time()
            try:
                if now >= next_price:
                    next_price = now + self.config.reprice_every_s
                    await self.reprice()
                if now >= next_move:
                    await self.rebalance()
                    next_move = loop.time() + self._rebalance_period()
            except LayerchainError as error:
                log.info("market round failed, will retry: %s", error)
                next_move = max(next_move, loop.time() + self._rebalance_period())
            except Exception as error:  # e.g. out of memory loading a new span
                log.warning("market round failed, will retry: %r", error)
                next_move = max(next_move, loop.time() + self._rebalance_period())

    def _rebalance_period(self) -> float:
        return self.config.rebalance_every_s * (1 + self.rng.uniform(-JITTER, JITTER))


async def drain(node: Any, old: Any, drain_s: float) -> int:
    """Wait up to ``drain_s`` for the sessions computing on ``old`` (a span the node moved
    from) to close, then close the rest (their clients fail over: their next step is told
    ``offer_changed``, so nobody bans the node for it); how many were closed."""
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        if not any(s.span is old for s in node.sessions.open_sessions()):
            return 0
        await asyncio.sleep(DRAIN_POLL_S)
    left = [s.session_id for s in node.sessions.open_sessions() if s.span is old]
    now = time.monotonic()  # their clients are told the node moved (no ban), for a while
    node.drained = {sid: t for sid, t in node.drained.items()
                    if now - t <= node.payments.price_grace_s}
    for session_id in left:
        node.sessions.close(session_id)
        node.drained[session_id] = now
    if left:
        log.info("closed %d sessions still open on the span moved from", len(left))
    return len(left)

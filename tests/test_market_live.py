"""The market on running nodes (issue 17 items 1-3 and 5): adaptive prices, automatic
placement and hot-swapping spans.

In-process (fast): nodes of a tiny model over the memory transport and memory DHT, driven by
``node.rebalance``'s own rounds. Real processes (slow, one module-scoped swarm): three nodes
of different speeds with ``--pricing adaptive`` over the same blocks, and a node started
without ``--blocks`` in a swarm missing blocks 20:30.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
import time
import weakref

import pytest
from memswarm import MemorySwarm

from layerchain.discovery import Identity, MemoryDiscovery
from layerchain.errors import ConfigError, LimitExceeded, OfferChanged
from layerchain.ledger import LedgerConfig, open_ledger
from layerchain.market import Wallet
from layerchain.market.pricing import DEFAULT_DEMAND, Offer, expected_revenue
from layerchain.model import SamplingParams, load_span
from layerchain.node import Node, NodeConfig
from layerchain.node.rebalance import MarketTask, budget, fetchable_span, place_node
from layerchain.types import Span
from layerchain.wire import messages as m

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=8)
SPEEDS = (5.0, 10.0, 20.0)  # ms per block per token announced by the three priced nodes
START_PRICE = 20  # credits per block per token the priced nodes of the live swarm start at


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def _task(swarm: MemorySwarm, node: Node, max_blocks: int = 4) -> MarketTask:
    def load(span: Span):
        return load_span(swarm.spec, span.start, span.end)

    return MarketTask(node, node.config, max_blocks, load)


def test_adaptive_nodes_end_with_the_faster_at_the_higher_price(tiny_model, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            nodes = [await swarm.add_node(0, 1, tmp_path / f"n{i}", pricing="adaptive",
                                          price_per_block=24, emulate_ms_per_block=ms)
                     for i, ms in enumerate(SPEEDS)]
            tasks = [_task(swarm, node) for node in nodes]
            history = []
            for _ in range(12):  # rounds, each node re-pricing from the DHT's records
                history.append([await t.reprice() for t in tasks])
            records = await MemoryDiscovery(swarm.hub).find(swarm.spec.model_id, 4)
            return history, {r.peer_id: r.price_per_block for r in records}, nodes
        finally:
            await swarm.close()

    history, announced, nodes = run(main())
    final = history[-1]
    assert history[-3:] == [final] * 3  # converged: no whole-credit change in the last rounds
    assert final[0] > final[1] > final[2] > 24  # faster, dearer; all above the start price
    assert [announced[n.peer_id] for n in nodes] == final  # what the DHT carries
    offers = [Offer(float(p), ms) for p, ms in zip(final, SPEEDS)]
    revenue = [expected_revenue(i, offers, DEFAULT_DEMAND) for i in range(3)]
    assert revenue[0] > revenue[1] > revenue[2]  # the modelled R (eq. 2) at the announced prices


def test_a_node_without_blocks_takes_the_missing_ones(tiny_model, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            await swarm.add_node(0, 2, tmp_path / "a")
            await swarm.add_node(0, 1, tmp_path / "b")
            discovery = MemoryDiscovery(swarm.hub, Identity.generate())
            config = NodeConfig(model=tiny_model, auto_span=True, max_blocks=2)
            return await place_node(discovery, swarm.spec, config, lambda: (4096, 1.0))
        finally:
            await swarm.close()

    span, limit, line = run(main())
    assert span == Span(2, 4)
    assert limit.blocks == 2 and "--max-blocks 2" in limit.why
    assert line.startswith("picked blocks 2:4 of 4: 2 of its blocks had no server")


def test_the_block_budget():
    config = NodeConfig(auto_span=True, memory_gb=1.0)
    assert budget(config, 30, 100 << 20, 0).blocks == 10  # 1 GiB of 100 MiB blocks
    assert budget(NodeConfig(auto_span=True, memory_gb=1.0, max_blocks=4), 30, 100 << 20,
                  0).blocks == 4
    assert budget(NodeConfig(auto_span=True), 30, 100 << 20, 4 << 30).blocks == 20  # half of 4 GiB
    assert budget(NodeConfig(auto_span=True), 8, 1, 4 << 30).blocks == 8  # the whole model
    with pytest.raises(ConfigError, match="no block of this model fits"):
        budget(NodeConfig(auto_span=True, memory_gb=0.05), 30, 100 << 20, 0)
    for bad in ({"pricing": "auction"}, {"pricing": "adaptive", "min_price": 0},
                {"auto_span": True, "start": 2, "end": 4}, {"rebalance_every_s": -1.0},
                {"pricing": "adaptive", "min_price": 5, "max_price": 2}):
        with pytest.raises(ConfigError):
            NodeConfig(**bad)


def test_the_cli_checks_the_market_flags(tmp_path):
    from typer.testing import CliRunner

    from layerchain.cli.main import app

    result = CliRunner().invoke(app, ["node", "start", "--new-swarm", "--data-dir", str(tmp_path),
                                      "--pricing", "adaptive", "--min-price", "0"])
    assert result.exit_code == 1
    assert "min_price must be at least 1 with adaptive pricing" in result.output


class MovesAtStep(Node):
    """Moves to ``self.target`` right after answering step ``MOVE_AT`` of a session."""

    MOVE_AT = 3

    async def handle(self, msg, owner=0):  # noqa: ANN001, ANN201
        reply = await super().handle(msg, owner)
        if isinstance(msg, m.Step) and msg.step == self.MOVE_AT and self.target is not None:
            target, self.target = self.target, None
            move = self.market.move(target)
            if self.market.config.drain_s == 0:
                await move  # closes the session before this reply: the next step fails over
            else:
                self.moving = asyncio.create_task(move)
        return reply


@pytest.mark.parametrize("drain_s", [30.0, 0.0])
def test_a_node_moving_mid_generation_never_changes_the_output(tiny_model, reference, tmp_path,
                                                                drain_s):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            mover = await swarm.add_node(0, 4, tmp_path / "mover", node_class=MovesAtStep,
                                         drain_s=drain_s)
            # a slower spare serving everything: the route takes the mover first
            await swarm.add_node(0, 4, tmp_path / "spare", emulate_latency_ms=20)
            mover.market, mover.target = _task(swarm, mover), Span(2, 4)
            old = weakref.ref(mover.span)
            client = swarm.client()
            result = await client.generate(PROMPT, PARAMS)
            if drain_s:
                await mover.moving  # the client closed its session: the drain ends
            records = await MemoryDiscovery(swarm.hub).find(swarm.spec.model_id, 4)
            with pytest.raises(OfferChanged, match="moved to blocks 2:4"):  # none on 0:2 (a
                mover._open(m.OpenSession(1, "late", swarm.spec.model_id, 0, 2, 8), owner=1)
                # stale record: the client re-reads it, no ban)
            gc.collect()
            return result, records, mover, old, client.peers.banned()
        finally:
            await swarm.close()

    result, records, mover, old, banned = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    if drain_s:  # the open session finished on the old span
        assert result.recoveries == () and result.route[0].peer_id == mover.peer_id
    else:  # closed at once: the client failed over and replayed
        assert [r.peer_id for r in result.recoveries] == [mover.peer_id]
        assert "node moved to blocks 2:4" in result.recoveries[0].reason
    assert mover.peer_id not in banned  # moving is no failure
    assert (mover.span.start, mover.span.end) == (2, 4) and mover.market.moves == 1
    assert {(r.start, r.end) for r in records if r.peer_id == mover.peer_id} == {(2, 4)}
    assert old() is None  # the old span's weights are gone


def test_rebalance_moves_a_node_to_a_lost_block_and_stays_after(tiny_model, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            a = await swarm.add_node(0, 2, tmp_path / "a")
            b = await swarm.add_node(0, 2, tmp_path / "b", rebalance_every_s=0.05)
            task = _task(swarm, b, max_blocks=2)
            running = asyncio.create_task(task.run())  # its periodic check
            try:
                for _ in range(200):  # nobody serves 2:4: b covers it
                    if task.moves:
                        break
                    await asyncio.sleep(0.05)
                moved_to = (b.span.start, b.span.end)
                await asyncio.sleep(0.3)  # several more checks: balanced now, it stays
            finally:
                running.cancel()
            again = await task.rebalance()
            other = await _task(swarm, a, max_blocks=2).rebalance()
            return task.moves, moved_to, again, other
        finally:
            await swarm.close()

    moves, moved_to, again, other = run(main())
    assert moves == 1 and moved_to == (2, 4)
    assert again is None and other is None


def test_a_move_loads_in_a_thread_of_its_own_while_the_node_keeps_answering(tiny_model,
                                                                            tmp_path):
    loaded_on: list[threading.Thread] = []

    def slow_load(span: Span):  # reading weights from a slow disk
        loaded_on.append(threading.current_thread())
        time.sleep(0.4)
        return load_span(MemorySwarm(tiny_model).spec, span.start, span.end)

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            node = await swarm.add_node(0, 2, tmp_path / "n")
            move = asyncio.create_task(MarketTask(node, node.config, 2, slow_load)
                                       .move(Span(2, 4)))
            gaps, last = [], time.perf_counter()
            while not move.done():  # the loop turns, and the node answers, during the move
                pong = await node.handle(m.Ping(1, 7))
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
            await move
            return gaps, pong, (node.span.start, node.span.end)
        finally:
            await swarm.close()

    gaps, pong, span = run(main())
    assert span == (2, 4) and pong.nonce == 7
    assert max(gaps) < 0.3  # the 0.4 s load never held the loop (each gap: one decode step)
    assert loaded_on[0] is not threading.main_thread() and not loaded_on[0].is_alive()


def test_a_moved_node_seeds_its_new_span_and_stakes_its_blocks(tiny_model, tmp_path):
    ledger = open_ledger(tmp_path / "stake.sqlite",
                         LedgerConfig(dispute_window_s=60, min_stake=10))
    wallet = Wallet.generate()
    ledger.deposit(wallet, 50)

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            node = await swarm.add_node(0, 2, tmp_path / "n", wallet=wallet, ledger=ledger,
                                        stake=10)
            staked = ledger.node(wallet.address).blocks
            await _task(swarm, node, max_blocks=3).move(Span(1, 4))
            seeder = node.seeder
            assert seeder is not None
            manifest = await node.handle(m.ManifestQuery(1, seeder.model_id))
            with pytest.raises(LimitExceeded, match="does not seed 'block_000"):
                await node.handle(m.PieceQuery(2, seeder.model_id, "block_000.safetensors", 0,
                                               16))
            piece = await node.handle(m.PieceQuery(3, seeder.model_id, "block_003.safetensors",
                                                   0, 16))
            return staked, manifest, piece
        finally:
            await swarm.close()

    staked, manifest, piece = run(main())
    assert staked == 2 and ledger.node(wallet.address).blocks == 3
    assert (manifest.start, manifest.end) == (1, 4) and len(piece.data) == 16
    ledger.close()


def test_a_node_fetching_by_id_picks_only_blocks_it_can_fetch():
    assert fetchable_span((0.0, 0.0, 7.0, 0.0), 1.0, 2) == Span(2, 3)
    for capacity in [(5.0, 0.0, 20.0, 10.0), (3.0, 3.0, 0.0, 1.0, 9.0)]:
        span = fetchable_span(capacity, 1.0, 2)
        assert all(capacity[b] > 0 for b in range(span.start, span.end))
    with pytest.raises(ConfigError, match="no peer serves"):
        fetchable_span((0.0, 0.0), 1.0, 2)


def test_a_node_named_by_model_id_places_itself_from_the_manifest(tiny_model, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("LAYERCHAIN_HOME", str(tmp_path / "home"))
    from layerchain.fetch import model_dir
    from layerchain.node.runner import place_by_id
    from layerchain.wire import MemoryTransport

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:  # block 0 has one server, 1:3 two, 3 none (nobody seeds it: not fetchable)
            await swarm.add_node(0, 3, tmp_path / "a")
            await swarm.add_node(1, 3, tmp_path / "b")
            model_id = swarm.spec.weights_id
            config = NodeConfig(model=model_id, auto_span=True, max_blocks=1,
                                data_dir=tmp_path / "c")
            return model_id, await place_by_id(config, MemoryDiscovery(swarm.hub),
                                               MemoryTransport(swarm.wire))
        finally:
            await swarm.close()

    model_id, (placed, line) = run(main())
    assert (placed.start, placed.end, placed.auto_span, placed.max_blocks) == (0, 1, False, 1)
    assert line.startswith("picked blocks 0:1 of 4")
    fetched = sorted(p.name for p in model_dir(model_id).iterdir())
    assert fetched == ["manifest.json"]  # the shape first; fetch_span fetches block 0 next


# ---------------------------------------------------------------- real processes


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerchain", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def priced_swarm(tmp_path_factory):
    """Three adaptive nodes on blocks 0:20 of SmolLM2 (30 blocks), 5/10/20 ms per block,
    starting at 20 credits, re-pricing every 0.5 s; nobody serves 20:30."""
    from layerchain.local import swarm_down, swarm_up

    state = tmp_path_factory.mktemp("market")
    args = [("--pricing", "adaptive", "--price", str(START_PRICE), "--reprice-every", "0.5",
             "--emulate-ms-per-block", str(ms)) for ms in SPEEDS]
    swarm = swarm_up(state, [Span(0, 20)] * 3, node_args=args)
    yield swarm, state
    swarm_down(state, quiet=True)


def _prices(swarm) -> dict[str, int]:
    """Each node's price now, as `swarm status` reads it: records from the DHT, then each
    node's Info (a CLI process: what a person runs)."""
    done = cli("swarm", "status", "--initial-peers", swarm.initial_peers[0], "--json")
    assert done.returncode == 0, done.stderr
    return {row["peer_id"]: row["price_per_block"] for row in json.loads(done.stdout)["nodes"]
            if "peer_id" in row}


def _prices_now(swarm) -> dict[str, int]:
    """The same Info replies, asked in this process (`swarm status` without its process
    start and DHT lookup): cheap enough to poll."""
    from layerchain.client import probe_nodes

    probes = asyncio.run(probe_nodes([n["endpoint"] for n in swarm.nodes],
                                     peer_ids=[n["peer_id"] for n in swarm.nodes]))
    return {p.info.peer_id: p.info.price_per_block for p in probes if p.info is not None}


def _converged(seen: list[list[int | None]]) -> bool:
    """Two reads alike, every node priced above the start price, the fastest dearest."""
    return (len(seen) >= 2 and seen[-1] == seen[-2] and None not in seen[-1]
            and seen[-1][0] > seen[-1][1] > seen[-1][2] > START_PRICE)


@pytest.mark.slow
@pytest.mark.timeout(600)  # minutes only on a machine under heavy load
def test_live_adaptive_prices_and_automatic_placement(priced_swarm):
    from layerchain.local.launcher import LocalProcess, process_start, stop_pids, wait_ready

    swarm, state = priced_swarm
    ids = [n["peer_id"] for n in swarm.nodes]
    # a fourth node, no --blocks: it must pick the blocks nobody serves
    data_dir = state / "auto"
    log = state / "auto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "layerchain", "node", "start", "--max-blocks", "10",
             "--data-dir", str(data_dir), "--initial-peers", swarm.initial_peers[0]],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # while it starts (its blocks are not the priced nodes' blocks), the prices settle
        deadline, seen = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            prices = _prices_now(swarm)
            seen.append([prices.get(i) for i in ids])
            if _converged(seen):
                break
            time.sleep(1.0)
        print("prices, fastest first, per Info read:", seen)
        info = wait_ready(proc, data_dir, log, timeout_s=240)
        assert (info["start"], info["end"]) == (20, 30)
        picked = "picked blocks 20:30 of 30: 10 of its blocks had no server"
        shown = time.monotonic() + 30  # it prints its lines just after it writes node.json
        while picked not in log.read_text() and time.monotonic() < shown:
            time.sleep(0.1)
        assert picked in log.read_text()
        for _ in range(3):  # what `swarm status` shows (a whole-credit step may fall between)
            prices = _prices(swarm)
            seen.append([prices.get(i) for i in ids])
            if _converged(seen):
                break
        final = seen[-1]
        print("announced prices, fastest first, per read:", seen)
        assert final[0] > final[1] > final[2], seen  # the faster node at the higher price
        assert final[2] > START_PRICE  # all climbed from the start price
        offers = [Offer(float(p), ms) for p, ms in zip(final, SPEEDS)]
        revenue = [expected_revenue(i, offers, DEFAULT_DEMAND) for i in range(3)]
        assert revenue[0] > revenue[1] > revenue[2]  # modelled R at the announced prices
    finally:
        stop_pids([LocalProcess(proc.pid, process_start(proc.pid))])
        proc.wait(timeout=30)

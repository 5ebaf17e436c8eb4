"""The client trusts nothing a peer says (issue 12, items 4, 5, 10 and 15), in-process.

Nodes and the client run in one event loop over the memory transport (tests/memswarm.py); a
hostile node is a real node whose ``handle`` is wrapped. Each test fails on the client of
before these rules: a peer's error code became the client's verdict, a request too large
for the swarm banned every honest node, a busy node was banned, a long prompt went out as
one step under a fixed deadline, and nothing capped what a generation could spend.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from memswarm import MemorySwarm

from layerchain.client import ClientConfig
from layerchain.client.rules import Verdict, judge, split_steps, step_timeout_s, step_tokens
from layerchain.errors import (
    ChannelError,
    CostLimitExceeded,
    InsufficientFunds,
    InvalidApiKey,
    InvalidVoucher,
    LimitExceeded,
    NoRoute,
    PeerBusy,
    PeerTimeout,
    RequestTooLarge,
    UnknownSession,
)
from layerchain.market import ChannelPayer, Wallet
from layerchain.model import LocalModel, SamplingParams, resolve_model
from layerchain.node import Node
from layerchain.wire import messages as m

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))  # context: 256 tokens


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LocalModel(resolve_model(tiny_model)).generate(PROMPT, PARAMS)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


def words(n: int) -> str:
    """A raw prompt of ``n`` tokens (even ``n``; SmolLM2's tokenizer: two per " w3")."""
    return " ".join(f"w{i % 10}" for i in range(n // 2))


def hostile(node: Node, *, on_step=None, on_open=None) -> None:
    """Make ``node`` answer Steps (OpenSessions) with ``on_step(msg)`` (``on_open(msg)``)
    when that returns an exception to raise; otherwise it serves honestly."""
    original = node.handle

    async def handle(msg, *args):
        hook = on_step if isinstance(msg, m.Step) else on_open if isinstance(msg, m.OpenSession) else None
        error = hook(msg) if hook is not None else None
        if error is not None:
            raise error
        return await original(msg, *args)

    node.handle = handle


# ------------------------------------------------------------------ 4. a peer's error code


@pytest.mark.parametrize("error", [
    InsufficientFunds("your channel is empty, top it up"),
    InvalidApiKey("your API key is revoked"),
    NoRoute("there is no route"),
    InvalidVoucher("your voucher is bad"),
    ChannelError("your channel is closed"),
    LimitExceeded("your step is too long"),  # it is not: 37 tokens, within what it announced
], ids=lambda e: e.code)
def test_a_peers_error_code_is_a_hop_failure_never_the_clients_verdict(
    tiny_model, reference, tmp_path, error
):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            liar = await swarm.add_node(0, 4, tmp_path / "liar")
            await swarm.add_node(0, 4, tmp_path / "honest", emulate_latency_ms=30)  # slower
            hostile(liar, on_step=lambda msg: error)
            client = swarm.client()
            result = await client.generate(PROMPT, PARAMS)
            return result, liar.peer_id, client.peers.banned()
        finally:
            await swarm.close()

    result, liar, banned = run(main())
    assert result.token_ids == reference.token_ids
    assert [r.peer_id for r in result.recoveries] == [liar]  # tried first, then routed around
    assert liar in banned


def test_verdicts_on_a_peers_answers():
    assert judge(PeerBusy("full"), request_exceeds=False) is Verdict.AVOID
    assert judge(LimitExceeded("too long"), request_exceeds=True) is Verdict.REQUEST
    assert judge(LimitExceeded("too long"), request_exceeds=False) is Verdict.BAN  # a lie
    for error in (UnknownSession("restarted"), PeerTimeout("slow"), InsufficientFunds("pay"),
                  InvalidApiKey("key"), NoRoute("none"), RequestTooLarge("big")):
        assert judge(error, request_exceeds=True) is Verdict.BAN, error


# ------------------------------------------------------------------ 5. no ban poisoning


def test_a_prompt_beyond_the_models_context_bans_nobody(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            await swarm.add_node(0, 2, tmp_path / "a")
            await swarm.add_node(2, 4, tmp_path / "b")
            client = swarm.client()
            with pytest.raises(RequestTooLarge, match="context of 256"):
                await client.generate(words(300), PARAMS, raw=True)
            opened = sum(len(node.sessions._sessions) for node in swarm.nodes)
            banned = client.peers.banned()
            return await client.generate(PROMPT, PARAMS), opened, banned
        finally:
            await swarm.close()

    result, opened, banned = run(main())
    assert banned == set() and opened == 0
    assert result.token_ids == reference.token_ids  # the next honest request is served


def test_a_request_larger_than_every_peers_cache_bans_nobody(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for start, end in ((0, 2), (2, 4)):
                await swarm.add_node(start, end, tmp_path / f"n{start}", max_cache_tokens=512,
                                     max_session_tokens=128)
            client = swarm.client()
            with pytest.raises(RequestTooLarge, match="cache tokens"):  # 100 + 64 > 128
                await client.generate(words(100), SamplingParams(max_new_tokens=64), raw=True)
            banned = client.peers.banned()
            return await client.generate(PROMPT, PARAMS), banned
        finally:
            await swarm.close()

    result, banned = run(main())
    assert banned == set()
    assert result.token_ids == reference.token_ids


def test_a_busy_peer_is_avoided_for_a_while_not_banned(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            busy = await swarm.add_node(0, 4, tmp_path / "busy")
            await swarm.add_node(0, 4, tmp_path / "other", emulate_latency_ms=30)
            answers = iter([PeerBusy("no room now")])
            hostile(busy, on_open=lambda msg: next(answers, None))  # busy once, then serves
            client = swarm.client(busy_avoid_s=0.5)
            first = await client.generate(PROMPT, PARAMS)
            banned = client.peers.banned()
            await asyncio.sleep(0.6)
            second = await client.generate(PROMPT, PARAMS)
            return first, second, busy.peer_id, banned
        finally:
            await swarm.close()

    first, second, busy, banned = run(main())
    assert busy not in banned
    assert busy not in {h.peer_id for h in first.route}
    assert [h.peer_id for h in second.route] == [busy]  # back in routes once the pause is over
    assert first.token_ids == second.token_ids == reference.token_ids


# ------------------------------------------------------------------ 10. long prompts


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory, smollm2_tokenizer) -> str:
    """The tiny llama with a 2,048-token context, for prompts longer than one step."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    import torch

    path = tmp_path_factory.mktemp("tiny-llama-2k")
    config = tiny_config("llama", len(smollm2_tokenizer))
    config.max_position_embeddings = 2048
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    smollm2_tokenizer.save_pretrained(str(path))
    return str(path)


def test_a_prompt_longer_than_one_step_matches_the_local_model(long_context_model, tmp_path):
    prompt = words(1200)
    params = SamplingParams(max_new_tokens=8)
    local = LocalModel(resolve_model(long_context_model)).generate(prompt, params, raw=True)
    assert len(local.prompt_token_ids) > 2 * m.MAX_STEP_TOKENS

    async def main():
        swarm = MemorySwarm(long_context_model)
        sizes: list[int] = []
        try:
            for start, end in ((0, 1), (1, 4)):
                node = await swarm.add_node(start, end, tmp_path / f"n{start}")

                def refuse_long(msg, sizes=sizes):  # the protocol's limit, as nodes enforce it
                    sizes.append(msg.hidden.shape[1])
                    return LimitExceeded("step too long") if msg.hidden.shape[1] > m.MAX_STEP_TOKENS else None

                hostile(node, on_step=refuse_long)
            client = swarm.client()
            return await client.generate(prompt, params, raw=True), sizes, client.peers.banned()
        finally:
            await swarm.close()

    result, sizes, banned = run(main())
    assert result.token_ids == local.token_ids
    assert max(sizes) == m.MAX_STEP_TOKENS and banned == set() and not result.recoveries
    prefill = len(local.prompt_token_ids)
    assert sum(sizes) == 2 * (prefill + len(result.token_ids) - 1)  # two hops, every token once


class SlowNode(Node):
    """A node that announces ``CLAIM`` ms per block per token and takes 1 ms."""

    CLAIM = 2.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, ms_per_block=self.CLAIM, **kwargs)

    async def handle(self, msg, *args):
        if isinstance(msg, m.Step):
            await asyncio.sleep(msg.hidden.shape[1] * (self.span.end - self.span.start) / 1000)
        return await super().handle(msg, *args)


def test_a_long_step_gets_a_deadline_scaled_to_its_work(tiny_model, tmp_path):
    """A 200-token prefill on a 4-block node taking 0.8 s outlives a 0.3 s step timeout
    meant for one token; with a deadline scaled to the work it succeeds, nobody banned."""
    prompt = words(200)

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            await swarm.add_node(0, 4, tmp_path / "slow", node_class=SlowNode)
            client = swarm.client(step_timeout_s=0.3)
            return await client.generate(prompt, PARAMS, raw=True), client.peers.banned()
        finally:
            await swarm.close()

    result, banned = run(main())
    assert len(result.token_ids) == PARAMS.max_new_tokens and banned == set()
    assert not result.recoveries


class UnderclaimingNode(SlowNode):
    CLAIM = 0.001  # a thousand times faster than it is


def test_a_long_step_gets_the_time_its_measured_speed_needs(tiny_model, tmp_path):
    """A peer that claims to be far faster than it is: once its decode steps are measured,
    a long step's deadline follows what was measured, not the claim."""

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            await swarm.add_node(0, 4, tmp_path / "under", node_class=UnderclaimingNode)
            client = swarm.client(step_timeout_s=0.3)
            short = await client.generate(PROMPT, PARAMS)  # 7 decode steps measured
            long = await client.generate(words(200), PARAMS, raw=True)  # 0.8 s prefill
            return short, long, client.peers.banned()
        finally:
            await swarm.close()

    short, long, banned = run(main())
    assert banned == set() and not short.recoveries and not long.recoveries
    assert len(long.token_ids) == PARAMS.max_new_tokens


def test_step_deadlines_and_sizes():
    config = ClientConfig(step_timeout_s=10.0, step_timeout_slack=3.0, step_timeout_max_s=120.0)
    assert step_timeout_s(config, 1, 15, 0.5) == pytest.approx(10.0225)  # a decode step
    assert step_timeout_s(config, 512, 15, 1.5) == pytest.approx(10 + 3 * 512 * 15 * 1.5 / 1000)
    assert step_timeout_s(config, 512, 30, 1e300) == 120.0  # a claim of slowness: the cap
    assert step_timeout_s(config, 512, 30, 0.0) == 10.0  # a claim of speed: its own loss
    assert step_tokens(576, 4) == m.MAX_STEP_TOKENS
    assert step_tokens(64, 4, max_frame_bytes=64 * 1024 + 64 * 4 * 100) == 100  # frame-bound
    with pytest.raises(RequestTooLarge):
        step_tokens(1 << 20, 4, max_frame_bytes=1 << 20)
    import torch

    x = torch.zeros(1, 1100, 8)
    assert [p.shape[1] for p in split_steps(x, 512)] == [512, 512, 76]
    assert split_steps(x[:, :5], 512)[0] is not None and len(split_steps(x[:, :5], 512)) == 1


# ------------------------------------------------------------------ 15. spending


def funded(ledger, credits: int = 1_000_000) -> ChannelPayer:
    """A wallet holding ``credits`` with channels sized per request (no fixed deposit)."""
    wallet = Wallet.generate()
    ledger.deposit(wallet, credits)
    return ChannelPayer(wallet, ledger)


async def priced_swarm(model: str, ledger, tmp: Path) -> MemorySwarm:
    swarm = MemorySwarm(model)
    await swarm.add_node(0, 4, tmp / "n", ledger=ledger, price_per_block=1)
    return swarm


def test_max_cost_stops_a_generation_before_it_pays_more(tiny_model, ledger, tmp_path):
    async def main():
        swarm = await priced_swarm(tiny_model, ledger, tmp_path)
        try:
            client = swarm.client(funded(ledger))
            params = SamplingParams(max_new_tokens=16)
            full = await client.generate(PROMPT, params)
            cap = full.cost - 5 * 4  # five tokens short (4 blocks x 1 credit a token)
            capped = await client.generate(PROMPT, params, max_cost=cap)
            await client.close()
            return full, capped, cap
        finally:
            await swarm.close()

    full, capped, cap = run(main())
    assert full.finish_reason == "length" and len(full.token_ids) == 16
    assert capped.finish_reason == "max_cost"
    assert cap - 4 < capped.cost <= cap  # stopped at the last step it could pay
    assert len(capped.token_ids) == 16 - 5
    assert capped.token_ids == full.token_ids[: len(capped.token_ids)]


def test_a_prompt_costing_more_than_max_cost_pays_nothing(tiny_model, ledger, tmp_path):
    async def main():
        swarm = await priced_swarm(tiny_model, ledger, tmp_path)
        try:
            payer = funded(ledger)
            client = swarm.client(payer, max_cost=10)  # the prompt alone: ~30 tokens x 4 blocks
            with pytest.raises(CostLimitExceeded, match="max_cost 10"):
                await client.generate(PROMPT, PARAMS)
            return payer.total_spent, client.peers.banned()
        finally:
            await swarm.close()

    spent, banned = run(main())
    assert spent == 0 and banned == set()


def test_peers_failing_their_first_step_lock_one_requests_worth_each(
    tiny_model, reference, ledger, tmp_path
):
    """Ten priced liars fail the first step (after the open, which may charge a reservation):
    each channel holds what one request can cost there, not a fixed 100,000."""

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for i in range(10):
                liar = await swarm.add_node(0, 4, tmp_path / f"liar{i}", ledger=ledger,
                                            price_per_block=1)
                hostile(liar, on_step=lambda msg: PeerTimeout("gone"))
            await swarm.add_node(0, 4, tmp_path / "honest", ledger=ledger, price_per_block=1,
                                 emulate_latency_ms=30)
            payer = funded(ledger)
            client = swarm.client(payer, max_recoveries=16)
            result = await client.generate(PROMPT, PARAMS)
            deposits = [c.deposit for c in ledger.channels(payer=payer.wallet.address)]
            return result, deposits
        finally:
            await swarm.close()

    result, deposits = run(main())
    assert result.token_ids == reference.token_ids and len(result.recoveries) == 10
    assert len(deposits) == 11
    most = (result.prompt_tokens + PARAMS.max_new_tokens) * 4 * 1  # max_length x blocks x price
    assert max(deposits) <= 2 * 2 * most  # margin 2, and room for a reservation fee
    assert sum(deposits) < 10_000  # 1% of the wallet, for 11 peers

"""Payments through an in-process swarm: receipts on every step, vouchers before serving,
redemption on a real SQLite ledger, and what happens when any of it is wrong."""

from __future__ import annotations

import asyncio

import pytest
from memswarm import MemorySwarm

from layerchain.errors import ConfigError, InsufficientFunds, NoRoute
from layerchain.ledger import LedgerConfig, open_ledger
from layerchain.market import ChannelPayer, Wallet, reservation_amount
from layerchain.market.credit import CREDIT_TOKENS
from layerchain.model import SamplingParams
from layerchain.node import Node

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=10)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def funded_payer(ledger, credits: int = 1_000_000, deposit: int = 50_000) -> ChannelPayer:
    wallet = Wallet.generate()
    ledger.deposit(wallet, credits)
    return ChannelPayer(wallet, ledger, deposit=deposit)


def test_each_node_redeems_tokens_times_blocks_times_price(tiny_model, reference, ledger, tmp_path):
    prices = {(0, 1): 3, (1, 3): 2, (3, 4): 5}
    payer = funded_payer(ledger)

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for i, ((start, end), price) in enumerate(prices.items()):
                await swarm.add_node(start, end, tmp_path / f"n{i}", ledger=ledger,
                                     price_per_block=price)
            client = swarm.client(payer)
            result = await client.generate(PROMPT, PARAMS)
            await client.close()  # waits for the redemptions, then closes the channels
            return result, swarm.nodes
        finally:
            await swarm.close()

    result, nodes = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    # every token the hops saw: the prompt at prefill, then each generated token but the last
    tokens = result.prompt_tokens + len(result.token_ids) - 1
    max_length = result.prompt_tokens + PARAMS.max_new_tokens
    expected = {}
    for node in nodes:
        blocks, price = node.span.end - node.span.start, prices[(node.span.start, node.span.end)]
        # opening the session (its cache reservation), then every token through every block
        expected[node.wallet] = (reservation_amount(max_length, blocks, price)
                                 + tokens * blocks * price)
        assert ledger.balance(node.wallet) == expected[node.wallet]
    assert {p.address: p.amount for p in result.payments} == expected
    assert {p.tokens for p in result.payments} == {tokens}
    assert result.cost == sum(expected.values())
    channels = ledger.channels(payer=payer.wallet.address)
    assert sum(c.redeemed for c in channels) == result.cost
    assert {c.state for c in channels} == {"closing"}  # the rest comes back after the window
    assert ledger.balance(payer.wallet.address) == 1_000_000 - sum(c.deposit for c in channels)
    assert ledger.verify().ok


async def generate_on_one_priced_node(model, ledger, payer, tmp_path, params=PARAMS):
    """One node over every block at 1 credit per block per token, a client paying with
    ``payer`` (None: a client that does not pay)."""
    swarm = MemorySwarm(model)
    try:
        await swarm.add_node(0, 4, tmp_path, ledger=ledger, price_per_block=1)
        return await swarm.client(payer).generate(PROMPT, params)
    finally:
        await swarm.close()


def test_a_priced_node_refuses_steps_without_a_voucher(tiny_model, ledger, tmp_path):
    # the node's refusal is a hop failure (a peer's code is never the client's verdict):
    # the only peer is left out and the request finds no route, saying why
    with pytest.raises(NoRoute, match="no voucher"):
        run(generate_on_one_priced_node(tiny_model, ledger, None, tmp_path))


def test_vouchers_that_fall_behind_stop_the_session(tiny_model, ledger, tmp_path):
    payer = funded_payer(ledger)
    honest = payer.voucher_for
    payer.voucher_for = lambda address, amount: honest(address, 0)  # pays nothing more
    # a node serves CREDIT_TOKENS tokens on credit (market.credit), not one more
    params = SamplingParams(max_new_tokens=CREDIT_TOKENS)

    with pytest.raises(NoRoute, match="not served further"):
        run(generate_on_one_priced_node(tiny_model, ledger, payer, tmp_path, params))


def test_a_deposit_too_small_is_a_clear_error(tiny_model, ledger, tmp_path):
    payer = funded_payer(ledger, deposit=20)  # less than the prompt costs

    with pytest.raises(InsufficientFunds, match="holds 20 credits"):
        run(generate_on_one_priced_node(tiny_model, ledger, payer, tmp_path))


def test_an_empty_wallet_cannot_open_a_channel(tiny_model, ledger, tmp_path):
    payer = ChannelPayer(Wallet.generate(), ledger, deposit=1000)

    with pytest.raises(InsufficientFunds, match="has 0 credits"):
        run(generate_on_one_priced_node(tiny_model, ledger, payer, tmp_path))


class ForgingNode(Node):
    """Signs its receipts over a different output than the one it returns."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        sign = self.payments.receipt
        self.payments.receipt = lambda payment, step, tokens, x, out: sign(
            payment, step, tokens, x, out + 1.0
        )


class ChainBreakingNode(Node):
    """Signs honest receipts but restarts its hash chain at step 3 (a replayed chain)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        sign = self.payments.receipt

        def receipt(payment, step, tokens, x, out):
            if step == 3:
                payment.signer.last_hash = bytes(32)
            return sign(payment, step, tokens, x, out)

        self.payments.receipt = receipt


@pytest.mark.parametrize("node_class", [ForgingNode, ChainBreakingNode])
def test_a_wrong_receipt_bans_the_peer_and_the_answer_is_unchanged(
    tiny_model, reference, tmp_path, node_class
):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            bad = await swarm.add_node(0, 2, tmp_path / "bad", node_class=node_class)
            # the spare answers 5 ms late, so routes take the bad node first
            await swarm.add_node(0, 2, tmp_path / "spare", emulate_latency_ms=5)
            await swarm.add_node(2, 4, tmp_path / "tail")
            client = swarm.client()
            result = await client.generate(PROMPT, PARAMS)
            return result, bad, client
        finally:
            await swarm.close()

    result, bad, client = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    assert [r.peer_id for r in result.recoveries] == [bad.peer_id]
    assert "receipt" in result.recoveries[0].reason
    assert bad.peer_id in client.peers.banned()
    assert bad.peer_id not in {h.peer_id for h in result.route}


def test_a_staked_node_is_rewarded_for_attested_uptime_only(tiny_model, tmp_path):
    """A staked node that nobody pays earns no uptime reward, whatever it says; once a
    client's vouchers are redeemed, its reward is bounded by them and by ledger time."""
    ledger = open_ledger(
        tmp_path / "rewards.sqlite",
        # no stake-yield cap: 10 credits staked would earn 0 in a second (the cap's own test:
        # test_ledger_conformance.py::test_self_dealing_cannot_drain_the_rewards)
        LedgerConfig(dispute_window_s=60, reward_per_block_hour=3600 * 100, min_stake=10,
                     stake_yield_bps=None),
    )
    wallet = Wallet.generate()
    ledger.deposit(wallet, 50)
    payer = funded_payer(ledger)

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            node = await swarm.add_node(0, 4, tmp_path, wallet=wallet, ledger=ledger, stake=10,
                                        price_per_block=1)
            idle = await node.payments.claim_uptime()  # registered, serving nobody
            await asyncio.sleep(1.1)
            client = swarm.client(payer)
            result = await client.generate(PROMPT, PARAMS)
            await client.close()  # the node redeems the client's vouchers
            earned = await node.payments.claim_uptime()
            return idle, earned, result
        finally:
            await swarm.close()

    idle, earned, result = run(main())
    info = ledger.node(wallet.address)
    assert (info.stake, info.blocks) == (10, 4)
    assert idle == 0
    # more than a second x 4 blocks x 100 credits per block-second, capped by the work paid
    assert 0 < earned == info.rewards <= result.cost
    assert earned == min(result.cost, int(100 * 4 * (info.rewarded_until - info.registered_at)))
    assert ledger.balance(wallet.address) == 50 - 10 + result.cost + earned
    assert ledger.verify().ok
    ledger.close()


def test_a_priced_node_refuses_a_ledger_whose_window_it_cannot_redeem_in(tiny_model, tmp_path):
    """A dispute window shorter than the node's redemption interval would let a client
    close its channel and take its refund before the node redeems what it served."""
    ledger = open_ledger(tmp_path / "short.sqlite", LedgerConfig(dispute_window_s=10))

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            await swarm.add_node(0, 4, tmp_path, ledger=ledger, price_per_block=1,
                                 redeem_interval_s=30)
        finally:
            await swarm.close()

    with pytest.raises(ConfigError, match="dispute window"):
        run(main())
    ledger.close()

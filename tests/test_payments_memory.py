"""Payments through an in-process swarm: receipts on every step, vouchers before serving,
redemption on a real SQLite ledger, and what happens when any of it is wrong."""

from __future__ import annotations

import asyncio

import pytest
from memswarm import MemorySwarm

from layerchain.errors import InsufficientFunds, NoRoute
from layerchain.ledger import LedgerConfig, open_ledger
from layerchain.market import ChannelPayer, Wallet
from layerchain.model import LocalModel, SamplingParams, resolve_model
from layerchain.node import Node

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=10)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LocalModel(resolve_model(tiny_model)).generate(PROMPT, PARAMS)


@pytest.fixture
def ledger(tmp_path):
    book = open_ledger(tmp_path / "ledger.sqlite", LedgerConfig(dispute_window_s=0))
    yield book
    book.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def funded_payer(ledger, credits: int = 1_000_000, deposit: int = 50_000) -> ChannelPayer:
    wallet = Wallet.generate()
    ledger.deposit(wallet.address, credits)
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
    assert result.token_ids == reference.token_ids
    # every token the hops saw: the prompt at prefill, then each generated token but the last
    tokens = result.prompt_tokens + len(result.token_ids) - 1
    expected = {}
    for node in nodes:
        span = (node.span.start, node.span.end)
        expected[node.wallet] = tokens * (span[1] - span[0]) * prices[span]
        assert ledger.balance(node.wallet) == expected[node.wallet]
    assert {p.address: p.amount for p in result.payments} == expected
    assert {p.tokens for p in result.payments} == {tokens}
    assert result.cost == sum(expected.values())
    assert ledger.balance(payer.wallet.address) == 1_000_000 - result.cost  # the rest refunded
    assert ledger.verify().ok


async def generate_on_one_priced_node(model, ledger, payer, tmp_path):
    """One node over every block at 1 credit per block per token, a client paying with
    ``payer`` (None: a client that does not pay)."""
    swarm = MemorySwarm(model)
    try:
        await swarm.add_node(0, 4, tmp_path, ledger=ledger, price_per_block=1)
        return await swarm.client(payer).generate(PROMPT, PARAMS)
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
    payer.voucher_for = lambda address, amount: honest(address, amount - 1)  # underpays

    with pytest.raises(NoRoute, match="not served further"):
        run(generate_on_one_priced_node(tiny_model, ledger, payer, tmp_path))


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
    assert result.token_ids == reference.token_ids
    assert [r.peer_id for r in result.recoveries] == [bad.peer_id]
    assert "receipt" in result.recoveries[0].reason
    assert bad.peer_id in client.peers.banned()
    assert bad.peer_id not in {h.peer_id for h in result.route}


def test_a_staked_node_is_paid_for_its_uptime(tiny_model, tmp_path):
    ledger = open_ledger(
        tmp_path / "rewards.sqlite",
        LedgerConfig(dispute_window_s=0, reward_per_block_hour=3600 * 100, min_stake=10),
    )
    wallet = Wallet.generate()
    ledger.deposit(wallet.address, 50)

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            node = await swarm.add_node(0, 4, tmp_path, wallet=wallet, ledger=ledger, stake=10)
            await asyncio.sleep(2.1)
            first = await node.payments.claim_uptime()
            again = await node.payments.claim_uptime()  # no whole second since: nothing
            return first, again
        finally:
            await swarm.close()  # stop() claims the rest

    first, again = run(main())
    info = ledger.node(wallet.address)
    assert info.stake == 10
    assert first >= 2 * 4 * 100  # >= 2 s x 4 blocks x 100 credits per block-second
    assert again == 0
    assert info.rewards >= first
    assert ledger.balance(wallet.address) == 50 - 10 + info.rewards
    assert ledger.verify().ok
    ledger.close()

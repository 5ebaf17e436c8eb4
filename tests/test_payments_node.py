"""A priced node's payment checks, attacked directly: squatting its cache without paying,
and being served on after closing the channel (issue 12 items 9 and 13)."""

from __future__ import annotations

import asyncio

import pytest
from memswarm import MemorySwarm

from layerchain.errors import ChannelError, InsufficientFunds, LayerchainError
from layerchain.market import ChannelPayer, Wallet, reservation_amount, step_amount
from layerchain.node.payments import NodePayments
from layerchain.wire import MemoryTransport
from layerchain.wire import messages as m
from layerchain.wire.rpc import RpcClient

PRICE, BLOCKS = 2, 6


def funded(ledger, deposit: int) -> ChannelPayer:
    wallet = Wallet.generate()
    ledger.deposit(wallet, 1_000_000)
    return ChannelPayer(wallet, ledger, deposit=deposit)


def node_payments(ledger, tmp_path) -> NodePayments:
    return NodePayments(Wallet.generate(), model_id="m", price_per_block=PRICE, ledger=ledger,
                        data_dir=tmp_path / "node", redeem_interval_s=30)


def test_opening_a_session_needs_a_voucher_paying_the_reservation(ledger, tmp_path):
    node = node_payments(ledger, tmp_path)
    address = node.wallet.address
    fee = reservation_amount(4096, BLOCKS, PRICE)
    assert fee == 64 * BLOCKS * PRICE  # one token's worth per 64 tokens reserved
    with pytest.raises(InsufficientFunds, match="carries no voucher"):
        node.open("squat", 0, BLOCKS, max_length=4096)
    underpaid = funded(ledger, 100_000)
    with pytest.raises(InsufficientFunds, match="not served further"):
        node.open("squat", 0, BLOCKS, max_length=4096,
                  voucher=underpaid.voucher_for(address, fee - 1))
    # a channel that could never pay for the cache it asks for
    small = funded(ledger, fee + 100)
    with pytest.raises(InsufficientFunds, match="the session may cost"):
        node.open("squat", 0, BLOCKS, max_length=4096, voucher=small.voucher_for(address, fee))
    honest = funded(ledger, fee + step_amount(4096, BLOCKS, PRICE))
    payment = node.open("s1", 0, BLOCKS, max_length=4096, voucher=honest.voucher_for(address, fee))
    node.charge(payment, honest.voucher_for(address, step_amount(10, BLOCKS, PRICE)), 10)
    with pytest.raises(InsufficientFunds, match="not served further"):  # the fee is not a credit
        node.charge(payment, honest.voucher_for(address, 0), 1)
    asyncio.run(node.redeem())
    assert honest.channels()[0].channel_id != underpaid.channels()[0].channel_id
    paid = {c.channel_id: c.redeemed for c in ledger.channels(payee=address)}
    assert paid[honest.channels()[0].channel_id] == fee + 10 * BLOCKS * PRICE
    assert paid[underpaid.channels()[0].channel_id] == fee - 1  # paid, and got nothing
    assert paid[small.channels()[0].channel_id] == 0  # refused before anything was taken


def test_a_closed_channel_stops_paying_and_is_redeemed_at_once(ledger, tmp_path):
    """The client asks the ledger to close its channel (the unspent deposit comes back to
    it) and keeps stepping: the node refuses within a second (and one ledger read) and
    redeems before the refund."""
    node = node_payments(ledger, tmp_path)
    node.book.recheck_s = 0.0  # what a second of waiting does
    address = node.wallet.address
    payer = funded(ledger, 10_000)

    async def main():
        payment = node.open("s", 0, BLOCKS, max_length=64,
                            voucher=payer.voucher_for(address, reservation_amount(64, BLOCKS, PRICE)))
        for _ in range(3):
            node.charge(payment, payer.voucher_for(address, step_amount(1, BLOCKS, PRICE)), 1)
        payer.close(payment.channel_id)
        # the next step is served on the state read a moment ago, and re-reads it off the
        # loop: seeing the close request, the node redeems at once
        node.charge(payment, payer.voucher_for(address, step_amount(1, BLOCKS, PRICE)), 1)
        await asyncio.gather(*node._background)
        redeemed = ledger.channel(payment.channel_id).redeemed
        with pytest.raises(ChannelError, match="closing"):
            node.charge(payment, payer.voucher_for(address, step_amount(1, BLOCKS, PRICE)), 1)
        await asyncio.gather(*node._background)
        return payment.channel_id, redeemed

    channel_id, redeemed_at_recheck = asyncio.run(main())
    owed = reservation_amount(64, BLOCKS, PRICE) + 4 * step_amount(1, BLOCKS, PRICE)
    assert redeemed_at_recheck == owed
    channel = ledger.channel(channel_id)
    assert (channel.state, channel.redeemed) == ("closing", owed)
    assert ledger.balance(address) == owed


def test_an_unpaid_client_cannot_squat_a_priced_nodes_cache(tiny_model_dir, ledger, tmp_path):
    """The attack of item 9 on a real node: an OpenSession asking for the whole cache with
    no voucher is refused before anything is reserved."""
    model = str(tiny_model_dir("llama", tokenizer=True))

    async def main():
        swarm = MemorySwarm(model)
        try:
            node = await swarm.add_node(0, 4, tmp_path, ledger=ledger, price_per_block=1)
            free = node.sessions.admissible_tokens
            rpc = RpcClient(await MemoryTransport(swarm.wire).connect(node.endpoint))
            with pytest.raises(LayerchainError, match="insufficient_funds: .* carries no voucher"):
                await rpc.call(m.OpenSession(rid=0, session_id="squat", model_id=node.spec.model_id,
                                             start=0, end=4, max_length=free), timeout=5)
            assert node.sessions.admissible_tokens == free and len(node.sessions) == 0
        finally:
            await swarm.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_vouchers_reach_the_disk_behind_the_steps_and_survive_a_restart(ledger, tmp_path):
    """The voucher file is written in a worker thread, one batch per SAVE_DELAY_S, not per
    step on the event loop; a node restarted from its data dir redeems what it held."""
    from layerchain.market import VoucherStore
    from layerchain.node.payments import SAVE_DELAY_S

    node = node_payments(ledger, tmp_path)
    address = node.wallet.address
    payer = funded(ledger, 10_000)
    store = VoucherStore.for_data_dir(tmp_path / "node")

    async def main():
        payment = node.open("s", 0, BLOCKS, max_length=64,
                            voucher=payer.voucher_for(address, reservation_amount(64, BLOCKS, PRICE)))
        for _ in range(20):
            node.charge(payment, payer.voucher_for(address, step_amount(1, BLOCKS, PRICE)), 1)
        assert store.latest() == []  # nothing written on the serving path
        await asyncio.sleep(SAVE_DELAY_S)
        await asyncio.gather(*node._background)
        return node.book.latest()

    latest = asyncio.run(main())
    assert store.latest() == latest
    restarted = node_payments(ledger, tmp_path)  # same data dir, empty memory
    owed = reservation_amount(64, BLOCKS, PRICE) + 20 * step_amount(1, BLOCKS, PRICE)
    assert asyncio.run(restarted.redeem_left_over()) == owed
    assert ledger.balance(address) == owed

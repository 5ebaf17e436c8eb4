"""Audits in an in-process swarm: a node that cheats (``NodeConfig.misbehave``) is caught by
a recomputation on another peer, judged by a referee, banned, not paid for what it lied on,
accused with evidence a third party can check, and the generation rolls back to its last
verified point: the tokens are exactly the single-process model's."""

from __future__ import annotations

import asyncio

import pytest
from memswarm import MemorySwarm

from layerchain.client import ClientConfig
from layerchain.errors import ConfigError
from layerchain.ledger.evidence import check_evidence
from layerchain.market import step_amount
from layerchain.market.credit import least_payment
from layerchain.model import SamplingParams, load_span

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=24)
PRICE = 1  # credits per block per token: nodes sign what they are owed, served on trust


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


async def swarm_with_a_cheater(model, tmp_path, mode: str, **node):
    """A cheater on blocks 0:2 that routes prefer, an honest node on 2:4 they prefer too,
    and two slower honest spares of each span (an auditor and a referee for either hop)."""
    swarm = MemorySwarm(model)
    cheater = await swarm.add_node(0, 2, tmp_path / "cheater", misbehave=mode,
                                   price_per_block=PRICE, **node)
    await swarm.add_node(2, 4, tmp_path / "next", price_per_block=PRICE, **node)
    for i in range(2):
        for start, end in ((0, 2), (2, 4)):
            await swarm.add_node(start, end, tmp_path / f"spare{start}{i}", price_per_block=PRICE,
                                 emulate_latency_ms=5, **node)
    return swarm, cheater


@pytest.mark.parametrize("mode", ["noise", "zero", "skip", "stale", "sometimes", "model"])
def test_a_cheater_is_caught_banned_unpaid_and_the_answer_is_unchanged(
    tiny_model, reference, tmp_path, mode
):
    async def main():
        swarm, cheater = await swarm_with_a_cheater(tiny_model, tmp_path, mode)
        try:
            client = swarm.client(audit_rate=0.25)
            gen = client.generate_stream(PROMPT, PARAMS)
            shown = [event.token_id async for event in gen]
            return shown, gen.result, client, cheater
        finally:
            await swarm.close()

    shown, result, client, cheater = run(main())
    expected = reference(tiny_model, PROMPT, PARAMS).token_ids
    assert result.token_ids == expected
    assert tuple(shown) == expected  # a stream never shows a token a rollback takes back
    assert cheater.peer_id in client.peers.banned()
    if mode == "zero":  # caught by the cheap checks of every step, before any receipt counts
        assert [r.peer_id for r in result.recoveries] == [cheater.peer_id]
        assert {p.peer_id: p.amount for p in result.payments}.get(cheater.peer_id, 0) == 0
        return
    assert [d.peer_id for d in result.disputes] == [cheater.peer_id]
    dispute = result.disputes[0]
    assert cheater.peer_id in client.peers.banned()
    assert cheater.peer_id not in {h.peer_id for h in result.route}
    assert len(dispute.referee) == 1 and dispute.referee[0] != cheater.peer_id
    # paid (here: owed on trust) for the steps before the lie, nothing after
    paid = {p.peer_id: p for p in result.payments}[cheater.peer_id]
    assert paid.amount == step_amount(dispute.position, 2, PRICE)
    assert dispute.unpaid > 0
    # the evidence convicts the cheater for a third party holding only the model
    assert dispute.evidence is not None
    verdict = check_evidence(dispute.evidence, load_span(client.spec, 0, 2))
    assert verdict.guilty and verdict.accused == cheater.wallet


def test_honest_swarms_audited_with_concurrent_sessions_raise_no_alarm(
    tiny_model, reference, tmp_path
):
    prompts = [PROMPT, "Name three rivers in Europe.", "Hi!"]

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for i in range(3):
                await swarm.add_node(0, 2, tmp_path / f"a{i}")
                await swarm.add_node(2, 4, tmp_path / f"b{i}")
            client = swarm.client(audit_rate=1.0)  # every step of every hop, at once
            results = await asyncio.gather(*(client.generate(p, PARAMS) for p in prompts))
            return results, client
        finally:
            await swarm.close()

    results, client = run(main())
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == reference(tiny_model, prompt, PARAMS).token_ids
        assert result.disputes == ()
        assert result.audited_steps >= 2 * PARAMS.max_new_tokens  # both hops, every step
    assert client.peers.banned() == set()


def test_without_audits_nothing_is_recomputed(tiny_model, reference, tmp_path):
    async def main():
        swarm, cheater = await swarm_with_a_cheater(tiny_model, tmp_path, "noise")
        try:
            return await swarm.client(audit_rate=0.0).generate(PROMPT, PARAMS)
        finally:
            await swarm.close()

    result = run(main())
    assert result.audited_steps == 0 and result.disputes == ()
    # what audits are for: the cheater's noise went unnoticed and changed the answer
    assert result.token_ids != reference(tiny_model, PROMPT, PARAMS).token_ids


def test_audit_rate_must_be_a_fraction():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="audit_rate"):
            ClientConfig(audit_rate=bad)


def test_credit_rules():
    credit = 100
    for owed in range(0, 400, 7):
        for cleared in (0, owed // 3, owed):
            x = least_payment(owed, cleared, credit)
            assert x >= cleared  # verified work is always paid
            assert x + credit >= owed  # the node serves it
            if x > cleared and x > 0:  # and it is the least such payment
                assert (x - 1) + credit < owed
    assert least_payment(50, 0, credit) == 0  # within the credit nothing unverified is paid


def test_with_a_ledger_the_cheater_is_slashed_and_paid_only_for_verified_steps(
    tiny_model, reference, ledger, tmp_path
):
    from layerchain.market import ChannelPayer, Wallet, reservation_amount

    client_wallet, cheater_wallet = Wallet.generate(), Wallet.generate()
    ledger.deposit(client_wallet, 1_000_000)
    ledger.deposit(cheater_wallet, 5_000)
    payer = ChannelPayer(client_wallet, ledger)  # channels sized per request

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            cheater = await swarm.add_node(0, 2, tmp_path / "cheater", misbehave="noise",
                                           price_per_block=PRICE, ledger=ledger,
                                           wallet=cheater_wallet, stake=5_000)
            await swarm.add_node(2, 4, tmp_path / "next", price_per_block=PRICE, ledger=ledger)
            for i in range(2):
                for start, end in ((0, 2), (2, 4)):
                    await swarm.add_node(start, end, tmp_path / f"spare{start}{i}", ledger=ledger,
                                         price_per_block=PRICE, emulate_latency_ms=5)
            client = swarm.client(payer, audit_rate=0.25)
            result = await client.generate(PROMPT, PARAMS)
            await client.close()  # waits for the nodes' redemptions, closes the channels
            return result, cheater, swarm.nodes
        finally:
            await swarm.close()

    result, cheater, nodes = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    (dispute,) = result.disputes
    assert dispute.peer_id == cheater.peer_id
    assert dispute.slashed == 5_000 and ledger.node(cheater.wallet).stake == 0
    paid = {p.address: p for p in result.payments}
    max_length = result.prompt_tokens + PARAMS.max_new_tokens
    # the cheater: its reservation fee and the steps verified before its lie, nothing more
    fee = reservation_amount(max_length, 2, PRICE)
    assert paid[cheater.wallet].amount == fee + step_amount(dispute.position, 2, PRICE)
    assert ledger.balance(cheater.wallet) == paid[cheater.wallet].amount  # its stake is gone
    # honest nodes: paid everything they computed (route, audits, referee), on the ledger
    for node in nodes:
        if node is cheater or node.wallet not in paid:
            continue
        assert paid[node.wallet].amount >= step_amount(paid[node.wallet].tokens, 2, PRICE)
        assert ledger.balance(node.wallet) == paid[node.wallet].amount
    assert ledger.verify().ok


def test_the_cli_default_is_the_clients():
    from layerchain.cli.generate import DEFAULT_AUDIT_RATE

    assert DEFAULT_AUDIT_RATE == ClientConfig().audit_rate


def test_a_lying_auditor_is_banned_and_the_honest_hop_kept(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            honest = [await swarm.add_node(0, 2, tmp_path / "a"),
                      await swarm.add_node(2, 4, tmp_path / "b")]
            # the first choice to audit blocks 0:2 lies; 2:4 has no spare (not audited)
            liar = await swarm.add_node(0, 2, tmp_path / "liar", misbehave="noise",
                                        emulate_latency_ms=5)
            await swarm.add_node(0, 2, tmp_path / "referee", emulate_latency_ms=10)
            client = swarm.client(audit_rate=0.25)
            return await client.generate(PROMPT, PARAMS), client, honest, liar
        finally:
            await swarm.close()

    result, client, honest, liar = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    assert result.disputes == ()  # the audited hop was right: nothing rolled back
    assert [h.peer_id for h in result.route] == [n.peer_id for n in honest]
    assert client.peers.banned() == {liar.peer_id}


@pytest.mark.slow  # 168 tokens: ~20 s
def test_a_long_generation_stays_within_the_nodes_credit(tiny_model, reference, ledger, tmp_path):
    from layerchain.market import ChannelPayer, Wallet
    from layerchain.market.credit import CREDIT_TOKENS

    wallet = Wallet.generate()
    ledger.deposit(wallet, 1_000_000)
    params = SamplingParams(max_new_tokens=CREDIT_TOKENS + 40)  # past one credit window

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for i in range(2):  # each hop audited by the other node of its span
                await swarm.add_node(0, 2, tmp_path / f"a{i}", ledger=ledger, price_per_block=2)
                await swarm.add_node(2, 4, tmp_path / f"b{i}", ledger=ledger, price_per_block=3)
            # dice that rarely roll: the credit window alone has to bring the audits
            client = swarm.client(ChannelPayer(wallet, ledger), audit_rate=0.001)
            result = await client.generate(PROMPT, params)
            banned = client.peers.banned()
            await client.close()
            return result, banned, swarm.nodes
        finally:
            await swarm.close()

    result, banned, nodes = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, params).token_ids
    assert banned == set() and result.disputes == ()  # no node refused a lagging voucher
    assert result.audited_steps >= 2 * len(result.token_ids)  # every step of both hops
    paid = {p.address: p.amount for p in result.payments}
    for node in nodes:  # everyone is paid everything, the last window included
        assert ledger.balance(node.wallet) == paid.get(node.wallet, 0)


def test_a_stream_closed_early_reports_the_tokens_it_showed(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for i in range(2):
                await swarm.add_node(0, 2, tmp_path / f"a{i}")
                await swarm.add_node(2, 4, tmp_path / f"b{i}")
            gen = swarm.client(audit_rate=1.0).generate_stream(PROMPT, PARAMS)
            shown = []
            async for event in gen:
                shown.append(event.token_id)
                if len(shown) == 3:
                    break
            await gen.aclose()
            return shown, gen.result
        finally:
            await swarm.close()

    shown, result = run(main())
    assert result.finish_reason == "cancelled"
    assert list(result.token_ids) == shown == list(reference(tiny_model, PROMPT, PARAMS).token_ids[:3])


def test_audits_are_paid_within_max_cost(tiny_model, reference, tmp_path):
    max_cost = 400  # credits: the prompt and its audits fit, the whole answer does not

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for i in range(2):
                await swarm.add_node(0, 2, tmp_path / f"a{i}", price_per_block=PRICE)
                await swarm.add_node(2, 4, tmp_path / f"b{i}", price_per_block=PRICE)
            return await swarm.client(audit_rate=1.0, max_cost=max_cost).generate(PROMPT, PARAMS)
        finally:
            await swarm.close()

    result = run(main())
    assert result.finish_reason == "max_cost"
    assert 0 < result.cost <= max_cost
    assert len(result.payments) == 4  # the route's two hops and their two auditors
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids[: len(result.token_ids)]


def test_a_cheater_never_audits_itself_under_another_peer_id(tiny_model, reference, tmp_path):
    from layerchain.market import Wallet

    wallet = Wallet.generate()  # two nodes, one owner, the same cheaper weights

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            cheater = await swarm.add_node(0, 2, tmp_path / "c1", misbehave="model", wallet=wallet)
            twin = await swarm.add_node(0, 2, tmp_path / "c2", misbehave="model", wallet=wallet,
                                        emulate_latency_ms=2)  # the first choice to audit
            await swarm.add_node(2, 4, tmp_path / "b")
            for i in range(2):
                await swarm.add_node(0, 2, tmp_path / f"h{i}", emulate_latency_ms=10)
            client = swarm.client(audit_rate=0.25)
            return await client.generate(PROMPT, PARAMS), client, cheater, twin
        finally:
            await swarm.close()

    result, client, cheater, twin = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    assert [d.peer_id for d in result.disputes] == [cheater.peer_id]
    assert {cheater.peer_id, twin.peer_id} <= client.peers.banned()  # banned by wallet


def test_a_priced_node_serves_one_credit_window_unpaid_and_not_a_token_more(ledger, tmp_path):
    from layerchain.errors import InsufficientFunds
    from layerchain.market import ChannelPayer, Wallet, reservation_amount
    from layerchain.market.credit import CREDIT_TOKENS, credit_amount
    from layerchain.node.payments import NodePayments

    price, blocks = 2, 3
    node = NodePayments(Wallet.generate(), model_id="m", price_per_block=price, ledger=ledger,
                        data_dir=tmp_path / "node", blocks=blocks, redeem_interval_s=30)
    assert node.credit == credit_amount(blocks, price) == CREDIT_TOKENS * blocks * price
    wallet = Wallet.generate()
    ledger.deposit(wallet, 1_000_000)
    payer = ChannelPayer(wallet, ledger, deposit=100_000)
    address = node.wallet.address
    fee = reservation_amount(512, blocks, price)
    payment = node.open("s", 0, blocks, max_length=512, voucher=payer.voucher_for(address, fee))
    for _ in range(CREDIT_TOKENS):  # each step's voucher pays nothing more: on credit
        node.charge(payment, payer.voucher_for(address, 0), 1)
    with pytest.raises(InsufficientFunds, match="not served further"):
        node.charge(payment, payer.voucher_for(address, 0), 1)
    # paying what was verified (here: all of it) opens the window again
    node.charge(payment, payer.voucher_for(address, step_amount(CREDIT_TOKENS + 1, blocks, price)), 1)


def test_a_cheater_on_the_last_hop_is_rolled_back_from_the_middle(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            await swarm.add_node(0, 2, tmp_path / "a")
            # stale: honest at its first step (the prompt), replays old outputs after it
            cheater = await swarm.add_node(2, 4, tmp_path / "cheater", misbehave="stale")
            for i in range(2):
                await swarm.add_node(0, 2, tmp_path / f"a{i}", emulate_latency_ms=5)
                await swarm.add_node(2, 4, tmp_path / f"b{i}", emulate_latency_ms=5)
            gen = swarm.client(audit_rate=0.25).generate_stream(PROMPT, PARAMS)
            shown = [event.token_id async for event in gen]
            return shown, gen.result, cheater
        finally:
            await swarm.close()

    shown, result, cheater = run(main())
    expected = reference(tiny_model, PROMPT, PARAMS).token_ids
    assert tuple(shown) == result.token_ids == expected
    (dispute,) = result.disputes
    assert dispute.peer_id == cheater.peer_id and (dispute.start, dispute.end) == (2, 4)
    assert dispute.step >= 1 and dispute.position >= result.prompt_tokens  # past the prompt


def test_which_decode_steps_a_settled_position_covers():
    from layerchain.client.swarm import verified_steps

    prompt = 10  # step 0 covers positions 0..9, step j >= 1 position 9 + j
    assert verified_steps(0, prompt, 5) == 0
    assert verified_steps(9, prompt, 5) == 0  # the prompt is not all verified yet
    assert verified_steps(10, prompt, 5) == 1
    assert verified_steps(12, prompt, 5) == 3
    assert verified_steps(100, prompt, 5) == 5  # never more than were run

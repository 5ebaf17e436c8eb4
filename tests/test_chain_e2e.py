"""End to end on a real local chain: `layerchain chain up` (anvil + the settlement contract)
and real node processes paid through it. One chain, one swarm (4 node processes).

A node started with ``--misbehave model`` (staked) serves blocks 0:15 beside two honest
spares; 15:30 has one honest node paying out to its owner's address (``--payout``); all
priced, all on ``--ledger evm+http://...`` (the contract found through chain up's
deployment file). A client auditing over TLS catches the cheater and keeps the evidence
(its own ledger has no referee key: the accusation is settled by hand). Then:

* concurrent redemptions: while the channels are open and the nodes' vouchers wait below
  the gas threshold, five ``ledger redeem`` processes at once (two with one node's wallet:
  the same address sending from two processes), then the nodes' own redemption when they
  stop: every voucher is credited exactly once, none fails on a nonce;
* each node's balance on the contract (node-1's owner's) is exactly what its channels
  redeemed and what the client says it paid; once the dispute window is over (the chain's
  clock moved on) and the client settles, its balance fell by exactly the sum;
* ``ledger slash --evidence`` (the verdict signed with chain.json's referee key) takes the
  cheater's stake, half to the client; forged accusations (a receipt not signed by the
  accused, a verdict signed by a non-referee) revert and move nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from layerchain.model import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=12)
PRICE = 2
STAKE = 5_000
CREDITS = 1_000_000
WINDOW_S = 120  # the contract's dispute window: longer than the nodes' 30 s rounds


def layerchain(*args: str, timeout: float = 120) -> dict:
    done = subprocess.run([sys.executable, "-m", "layerchain", *args, "--json"],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_a_priced_swarm_settles_on_chain_up_and_a_cheater_is_slashed(tmp_path, monkeypatch,
                                                                       reference):
    from layerchain.client import Swarm
    from layerchain.errors import LayerchainError
    from layerchain.ledger import open_ledger
    from layerchain.ledger.chain import LocalChain
    from layerchain.ledger.evm import sign_verdict
    from layerchain.ledger.evidence import check_evidence
    from layerchain.local import swarm_down, swarm_up
    from layerchain.market import Wallet
    from layerchain.market.receipts import SignedReceipt
    from layerchain.model import DEFAULT_MODEL, load_span, resolve_model
    from layerchain.types import Span

    monkeypatch.setenv("LAYERCHAIN_HOME", str(tmp_path / "home"))  # the deployment file
    up = layerchain("chain", "up", "--state-dir", str(tmp_path / "chain"),
                    "--dispute-window", str(WINDOW_S))
    chain = LocalChain.load(tmp_path / "chain")
    try:
        spec = f"evm+{up['rpc_url']}"  # no contract: chain up's deployment file names it
        wallets = {name: Wallet.load_or_create(tmp_path / name)
                   for name in ("client", "node-0", "node-1", "node-2", "node-3")}
        for wallet in wallets.values():  # test ether: credits and gas
            chain.fund(wallet.address, 10**18)
        book = open_ledger(spec)
        book.deposit(wallets["client"], CREDITS)
        book.deposit(wallets["node-0"], STAKE)

        owner = Wallet.generate().address  # node-1's owner: paid instead of the device
        priced = ["--price", str(PRICE), "--ledger", spec]
        # routes prefer the cheater (the spares answer 100 ms late: whatever the loaded
        # machine measures, it is on the route, not only an auditor)
        slow = ["--emulate-latency-ms", "100"]
        spans = [Span(0, 15), Span(15, 30), Span(0, 15), Span(0, 15)]
        node_args = [[*priced, "--misbehave", "model", "--stake", str(STAKE)],
                     [*priced, "--payout", owner], [*priced, *slow], [*priced, *slow]]
        local = swarm_up(tmp_path, spans, node_args=node_args)
        try:
            with Swarm(local.initial_peers, audit_rate=0.25, ledger=spec,
                       data_dir=tmp_path / "client") as client:
                result = client.generate(PROMPT, PARAMS)
                # The channels are still open and what the nodes are owed is below the gas
                # threshold: their latest vouchers wait on disk. Redeem them from 5 processes
                # at once: two with node-1's wallet (15:30, paid in advance, so its vouchers
                # carry everything), one per other node.
                procs = [subprocess.Popen(
                    [sys.executable, "-m", "layerchain", "ledger", "redeem", "--data-dir",
                     str(tmp_path / f"node-{i}"), "--ledger", spec, "--json"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                ) for i in (0, 1, 1, 2, 3)]
                outputs = [p.communicate(timeout=180) for p in procs]
            # the client closed its channels: the dispute window runs
        finally:
            swarm_down(tmp_path, quiet=True, grace_s=30)  # the nodes redeem as they stop

        assert result.token_ids == reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids
        for proc, (out, err) in zip(procs, outputs):
            assert proc.returncode == 0, err[-2000:]  # no nonce clash, no refused voucher
        credited = [json.loads(out)["credited"] for out, _ in outputs]

        paid = {p.address: p.amount for p in result.payments}
        channels = book.channels(payer=wallets["client"].address)
        redeemed_by = {}
        for channel in channels:
            redeemed_by[channel.payee] = redeemed_by.get(channel.payee, 0) + channel.redeemed
        for i, node in enumerate(local.nodes):
            address = node["wallet"]
            # each voucher credited once, whoever sent it (the processes, the node as it
            # stopped, the client's final flush): the channels hold exactly what was paid,
            # and the node's balance is exactly that (node-0 staked all it deposited);
            # node-1's goes to its owner (--payout)
            assert redeemed_by.get(address, 0) == paid.get(address, 0)
            paid_to = owner if i == 1 else address
            assert book.balance(paid_to) == paid.get(address, 0)
        assert book.balance(local.nodes[1]["wallet"]) == 0
        # node-1's two processes raced over all it earned: credited once between them
        assert credited[1] + credited[2] == paid[local.nodes[1]["wallet"]] > 0

        # the window ends on the chain's clock; settling refunds the unspent deposits
        chain.advance(WINDOW_S + 1)
        settled = layerchain("wallet", "settle", "--data-dir", str(tmp_path / "client"),
                             "--ledger", spec)
        assert {c["state"] for c in settled["channels"]} == {"closed"}
        assert book.balance(wallets["client"].address) == CREDITS - sum(paid.values())

        # the accusation: real evidence, the verdict signed with chain.json's referee key
        (dispute,) = result.disputes
        cheater = local.nodes[0]
        assert dispute.peer_id == cheater["peer_id"] and dispute.evidence is not None
        assert book.node(cheater["wallet"]).stake == STAKE  # the client could not slash alone
        evidence_file = dispute.evidence.to_file(tmp_path / "cheat.evidence")
        before = book.balance(wallets["client"].address)
        slashed = layerchain("ledger", "slash", "--evidence", str(evidence_file),
                             "--data-dir", str(tmp_path / "client"), "--ledger", spec,
                             timeout=240)
        assert slashed["guilty"] and slashed["slashed"] == STAKE
        assert book.node(cheater["wallet"]).stake == 0
        assert book.balance(wallets["client"].address) == before + STAKE // 2

        # forged accusations revert: nothing moves but the forger's gas
        span = load_span(resolve_model(DEFAULT_MODEL), 0, 15)
        verdict = check_evidence(dispute.evidence, span)
        honest = local.nodes[2]["wallet"]
        signed = SignedReceipt.from_bytes(verdict.receipt)
        altered = SignedReceipt(replace(signed.receipt, input_sha256=bytes(32)), signed.signature)
        referee = chain.signer(0)
        client_wallet = wallets["client"]
        forgeries = [
            # a receipt the accused never signed
            (replace(verdict, receipt=altered.to_bytes(), evidence_hash="0x" + "11" * 32),
             referee),
            # a verdict not signed by a referee of the deployment
            (replace(verdict, evidence_hash="0x" + "22" * 32), client_wallet),
        ]
        balances = (book.balance(client_wallet.address), book.balance(honest))
        for forged, signer in forgeries:
            signature = sign_verdict(signer, forged, client_wallet.address, book.domain_separator)
            with pytest.raises(LayerchainError):
                book.slash_with_verdicts(client_wallet, forged, [signature])
        assert (book.balance(client_wallet.address), book.balance(honest)) == balances
        assert book.verify().ok
        book.close()
    finally:
        chain.stop()

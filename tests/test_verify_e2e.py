"""End to end on real node processes: a node started with ``--misbehave model`` (its
weights re-quantised: outputs of the right size, only an audit can tell) among
honest spares, all priced, on one SQLite ledger, the cheater staked. A client auditing
(``audit_rate``) over TLS catches it, a referee confirms, the cheater is banned, its stake
slashed with evidence a third party can check, it is paid only its reservation fee and the
steps verified before its lie, the honest nodes everything they computed, and the answer is
the single-process model's, token for token. One swarm (4 processes)."""

from __future__ import annotations

import pytest

from layerchain.model import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]  # ~100 s on 2 idle cores

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=12)
PRICE = 1
STAKE = 5_000


def test_a_cheating_process_is_caught_slashed_and_unpaid_over_the_network(tmp_path, reference):
    from layerchain.client import Swarm
    from layerchain.ledger import CheckpointStore, LedgerConfig, open_ledger
    from layerchain.ledger.evidence import check_evidence
    from layerchain.local import swarm_down, swarm_up
    from layerchain.market import Wallet, reservation_amount, step_amount
    from layerchain.model import DEFAULT_MODEL, load_span, resolve_model
    from layerchain.types import Span

    # what `ledger init --dispute-window 60`, `wallet create` and `wallet deposit` do (in
    # this process: five CLI processes' start-ups less; test_cli_ledger runs those commands)
    book = str(tmp_path / "ledger.sqlite")
    setup = open_ledger(book, LedgerConfig(dispute_window_s=60))
    for who, credits in (("client", 1_000_000), ("node-0", STAKE)):
        wallet = Wallet.create(tmp_path / who)
        setup.deposit(wallet, credits)
        CheckpointStore.for_data_dir(tmp_path / who).append(setup.checkpoint(wallet))
    setup.close()
    priced = ["--price", str(PRICE), "--ledger", book]
    # routes prefer the cheater (the spares answer 100 ms late: at 20 ms, on a machine at
    # load 20, a spare measured faster, the cheater only audited it and was banned as a
    # lying auditor, with no dispute on the route to slash)
    slow = ["--emulate-latency-ms", "100"]
    # an auditor and a referee for the cheater's blocks; 15:30 has no spare (not audited)
    spans = [Span(0, 15), Span(15, 30), Span(0, 15), Span(0, 15)]
    node_args = [[*priced, "--misbehave", "model", "--stake", str(STAKE)], priced,
                 [*priced, *slow], [*priced, *slow]]
    local = swarm_up(tmp_path, spans, node_args=node_args)
    try:
        with Swarm(local.initial_peers, audit_rate=0.25, ledger=book,
                   data_dir=tmp_path / "client") as client:
            result = client.generate(PROMPT, PARAMS)
            banned = client.core.peers.banned()
    finally:
        swarm_down(tmp_path, quiet=True)

    assert result.token_ids == reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids
    cheater = local.nodes[0]
    (dispute,) = result.disputes
    assert dispute.peer_id == cheater["peer_id"] and cheater["peer_id"] in banned
    assert dispute.slashed == STAKE
    assert dispute.evidence is not None
    span = load_span(resolve_model(DEFAULT_MODEL), 0, 15)
    assert check_evidence(dispute.evidence, span).guilty

    ledger = open_ledger(book)
    try:
        assert ledger.node(cheater["wallet"]).stake == 0
        paid = {p.address: p for p in result.payments}
        max_length = result.prompt_tokens + PARAMS.max_new_tokens
        fee = reservation_amount(max_length, 15, PRICE)
        assert paid[cheater["wallet"]].amount == fee + step_amount(dispute.position, 15, PRICE)
        assert ledger.balance(cheater["wallet"]) == paid[cheater["wallet"]].amount
        for node in local.nodes[1:]:
            if node["wallet"] in paid:  # honest: paid all it computed (route, audits, referee)
                p = paid[node["wallet"]]
                assert p.amount >= step_amount(p.tokens, 15, PRICE)
                assert ledger.balance(node["wallet"]) == p.amount
        assert ledger.verify().ok
    finally:
        ledger.close()

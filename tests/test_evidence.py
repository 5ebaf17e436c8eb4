"""Evidence of cheating and slashing: a cheat is convicted once, a forged accusation costs.

A tiny random llama (4 blocks, hidden 64) plays the model; a "node" here is a wallet that
computes blocks 1:3 step by step exactly as ``node/server.py`` does and signs receipts with
the commitment of what it returns. Each attack on the evidence (a swapped input, an altered
receipt, receipts spliced from two sessions, an unsigned file) is made to look like a cheat
of an honest node: the check must see through it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from layerchain.cli.main import app
from layerchain.errors import FalseAccusation, InsufficientFunds, InvalidEvidence, LedgerError, SpanError
from layerchain.ledger import LedgerConfig, open_ledger, sign_operation
from layerchain.ledger.evidence import Evidence, check_evidence, make_evidence, submit_evidence
from layerchain.ledger.operations import new_operation
from layerchain.market.commitment import AUDIT_TOLERANCE, commit
from layerchain.market.receipts import ReceiptSigner, tokens_of
from layerchain.market.wallet import Wallet
from layerchain.model import load_span, resolve_model
from layerchain.types import Span

START, END = 1, 3  # the hop's blocks, inside the 4-block span loaded
STAKE, FUNDS, BOND = 1000, 500, 100


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def span(model_dir):
    spec = resolve_model(model_dir)
    return load_span(spec, 0, spec.num_blocks)


@pytest.fixture(scope="module")
def node() -> Wallet:
    return Wallet.generate()


@pytest.fixture(scope="module")
def accuser() -> Wallet:
    return Wallet.generate()


def hop_inputs(seed: int, steps: int = 4, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """What a client sends one hop: a 5-token prefill, then one token per step [1, T, 64]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 5 if i == 0 else 1, 64, generator=g).to(dtype) for i in range(steps)]


def serve(span, wallet, inputs, *, session="s1", cheat_at: int | None = None) -> list[bytes]:
    """The receipts a node signs for ``inputs`` on blocks START:END; at step ``cheat_at`` it
    returns noise added to its output and commits, as every cheater must, to what it returns."""
    signer = ReceiptSigner(wallet, session, span.spec.model_id, Span(START, END), 1)
    cache = span.new_cache(START, END)
    receipts = []
    for step, x in enumerate(inputs):
        out = span.forward(x.float(), cache).to(x.dtype)
        if step == cheat_at:
            out = out + 0.5 * torch.randn_like(out)
        receipts.append(signer.sign_step(step, tokens_of(x), x, out, fingerprint=commit(out)))
    return receipts


def accuse(span, accuser, receipts, inputs) -> Evidence:
    return make_evidence(
        accuser, model_id=span.spec.model_id, start=START, end=END, receipts=receipts,
        inputs=inputs, model_name="tiny",
    )


@pytest.fixture
def book(tmp_path, node, accuser):
    ledger = open_ledger(tmp_path / "ledger.sqlite", LedgerConfig(accuser_bond=BOND))
    ledger.deposit(node, STAKE)
    ledger.register_node(node, STAKE, END - START)
    ledger.deposit(accuser, FUNDS)
    yield ledger
    ledger.close()


def state(book, node, accuser) -> tuple[int, int, int, int]:
    """(node balance, node stake, accuser balance, journal length)."""
    n = book.account(node.address)
    return n.balance, n.staked, book.balance(accuser.address), book.head()[0]


def test_evidence_file_round_trip(tmp_path, span, node, accuser):
    inputs = hop_inputs(1, dtype=torch.bfloat16)  # the dtype is part of each input's hash
    evidence = accuse(span, accuser, serve(span, node, inputs, cheat_at=3), inputs)
    loaded = Evidence.from_file(evidence.to_file(tmp_path / "a.evidence"))
    assert loaded.digest() == evidence.digest() and loaded.signed_by_accuser()
    assert loaded.step == 3 and loaded.model_name == "tiny" and loaded.receipts == evidence.receipts
    assert all(torch.equal(a, b) and a.dtype == torch.bfloat16 for a, b in zip(loaded.inputs, inputs))
    assert check_evidence(loaded, span).guilty
    (tmp_path / "junk.evidence").write_bytes(b"\x08" + bytes(100))
    with pytest.raises(InvalidEvidence, match="not a layerchain evidence file"):
        Evidence.from_file(tmp_path / "junk.evidence")
    with pytest.raises(InvalidEvidence, match="no evidence file"):
        Evidence.from_file(tmp_path / "missing.evidence")


def test_cheat_is_slashed_once(book, span, node, accuser):
    inputs = hop_inputs(2)
    receipts = serve(span, node, inputs, cheat_at=3)
    evidence = accuse(span, accuser, receipts, inputs)
    verdict = check_evidence(evidence, span)
    assert verdict.guilty and verdict.distance > AUDIT_TOLERANCE and verdict.accused == node.address
    result = submit_evidence(book, evidence, accuser, span)
    assert (result.slashed, result.reward, result.burned, result.bond) == (STAKE, STAKE // 2, STAKE // 2, 0)
    after = state(book, node, accuser)
    assert after[1:3] == (0, FUNDS + STAKE // 2)
    entry = book.journal(after=result.seq - 1)[0]
    assert entry.kind == "slash" and json.loads(entry.payload)["verdict"] == "guilty"

    # the same evidence again, and the same receipts under another accuser: no second slash
    book.register_node(node, 0, END - START)
    book.deposit(node, STAKE)
    book.register_node(node, STAKE, END - START)  # staked anew: something to take
    before = state(book, node, accuser)
    with pytest.raises(LedgerError, match="already convicted"):
        submit_evidence(book, evidence, accuser, span)
    other = Wallet.generate()
    book.deposit(other, BOND)
    with pytest.raises(LedgerError, match="already convicted"):
        submit_evidence(book, accuse(span, other, receipts, inputs), other, span)
    assert state(book, node, accuser)[:3] == before[:3]
    assert book.verify().ok, book.verify().problems


def test_forged_accusation_of_an_honest_node_costs_the_bond(book, span, node, accuser):
    inputs = hop_inputs(3)
    evidence = accuse(span, accuser, serve(span, node, inputs), inputs)
    verdict = check_evidence(evidence, span)
    assert not verdict.guilty and verdict.distance <= AUDIT_TOLERANCE
    before = state(book, node, accuser)
    with pytest.raises(FalseAccusation, match="computed honestly"):
        submit_evidence(book, evidence, accuser, span)
    after = state(book, node, accuser)
    assert after == (before[0] + BOND, STAKE, FUNDS - BOND, before[3] + 1)
    assert book.verify().ok


def _swap_input(span, node, accuser):
    """The accuser swaps the disputed step's input: the recomputation no longer matches."""
    inputs = hop_inputs(4)
    receipts = serve(span, node, inputs)
    return accuse(span, accuser, receipts, [*inputs[:-1], torch.randn(1, 1, 64)]), "input hash"


def _alter_commitment(span, node, accuser):
    """The accuser rewrites the node's commitment of the disputed step, keeping its signature."""
    from layerchain.market.receipts import SignedReceipt

    inputs = hop_inputs(5)
    receipts = serve(span, node, inputs)
    signed = SignedReceipt.from_bytes(receipts[-1])
    fake = replace(signed.receipt, fingerprint=commit(torch.randn(1, 1, 64)))
    forged = SignedReceipt(fake, signed.signature).to_bytes()
    return accuse(span, accuser, [*receipts[:-1], forged], inputs), "signature"


def _splice_sessions(span, node, accuser):
    """Steps 0..2 of one session with step 3 of another: step 3 ran on another cache."""
    a, b = hop_inputs(6), hop_inputs(7)
    ra, rb = serve(span, node, a, session="a"), serve(span, node, b, session="b")
    return accuse(span, accuser, [*ra[:-1], rb[-1]], [*a[:-1], b[-1]]), "session"


def _drop_a_step(span, node, accuser):
    """Step 1 left out: the recomputed cache lacks a token."""
    inputs = hop_inputs(8)
    receipts = serve(span, node, inputs)
    return accuse(span, accuser, [receipts[0], *receipts[2:]], [inputs[0], *inputs[2:]]), "step"


@pytest.mark.parametrize("tamper", [_swap_input, _alter_commitment, _splice_sessions, _drop_a_step])
def test_tampered_evidence_against_an_honest_node_is_refused(book, span, node, accuser, tamper):
    evidence, why = tamper(span, node, accuser)
    verdict = check_evidence(evidence, span)
    assert not verdict.guilty and why in verdict.reason
    before = state(book, node, accuser)
    with pytest.raises(FalseAccusation):
        submit_evidence(book, evidence, accuser, span)
    assert state(book, node, accuser)[1:] == (STAKE, FUNDS - BOND, before[3] + 1)
    assert book.verify().ok


def test_evidence_not_signed_by_its_accuser_charges_nobody(book, span, node, accuser):
    inputs = hop_inputs(9)
    evidence = accuse(span, accuser, serve(span, node, inputs, cheat_at=3), inputs)
    altered = replace(evidence, referee_commitment=b"\x01")  # changed after signing
    before = state(book, node, accuser)
    with pytest.raises(InvalidEvidence, match="not signed by its accuser"):
        submit_evidence(book, altered, accuser, span)
    with pytest.raises(InvalidEvidence, match="names accuser"):
        submit_evidence(book, evidence, node, span)  # somebody else's accusation
    assert state(book, node, accuser) == before


def test_an_accuser_without_the_bond_is_refused_before_recomputing(book, span, node, monkeypatch):
    import layerchain.ledger.evidence as evidence_module

    poor = Wallet.generate()
    inputs = hop_inputs(10)
    evidence = accuse(span, poor, serve(span, node, inputs, cheat_at=3), inputs)
    monkeypatch.setattr(evidence_module, "check_evidence", lambda *a: pytest.fail("recomputed"))
    with pytest.raises(InsufficientFunds, match="bond of 100"):
        submit_evidence(book, evidence, poor, span)
    # the ledger's own rule holds even for a caller that skips submit_evidence
    verdict = check_evidence(evidence, span)
    with pytest.raises(InsufficientFunds):
        book.slash(poor, verdict)
    assert book.account(node.address).staked == STAKE


def test_a_verdict_must_name_the_receipts_signer(book, span, node, accuser):
    inputs = hop_inputs(11)
    verdict = check_evidence(accuse(span, accuser, serve(span, node, inputs, cheat_at=3), inputs), span)
    with pytest.raises(LedgerError, match="receipt is"):
        book.slash(accuser, replace(verdict, accused=accuser.address))  # pin it on someone else
    raw = new_operation(accuser, book.ledger_id, "slash", counterparty=node.address)
    with pytest.raises(LedgerError, match="with its verdict"):
        book.submit(sign_operation(accuser, raw))  # a slash without a checked verdict
    assert book.account(node.address).staked == STAKE


def test_evidence_checked_against_another_model_is_an_error(span, node, accuser, tiny_model_dir):
    inputs = hop_inputs(12)
    evidence = accuse(span, accuser, serve(span, node, inputs, cheat_at=3), inputs)
    other = resolve_model(tiny_model_dir("mistral"))
    with pytest.raises(SpanError, match="load the model the evidence names"):
        check_evidence(evidence, load_span(other, 0, 2))
    with pytest.raises(SpanError, match="blocks 1:3"):
        check_evidence(evidence, load_span(span.spec, 0, 2))


def test_cli_ledger_slash_end_to_end(tmp_path, span, model_dir, node):
    runner = CliRunner()
    data_dir, ledger_file = tmp_path / "client", tmp_path / "ledger.sqlite"
    accuser = Wallet.create(data_dir)
    with open_ledger(ledger_file, LedgerConfig(accuser_bond=BOND)) as book:
        book.deposit(node, STAKE)
        book.register_node(node, STAKE, END - START)
        book.deposit(accuser, FUNDS)
    cheat, honest = hop_inputs(13), hop_inputs(14)
    guilty_file = accuse(span, accuser, serve(span, node, cheat, cheat_at=3), cheat).to_file(
        tmp_path / "cheat.evidence")
    honest_file = accuse(span, accuser, serve(span, node, honest), honest).to_file(
        tmp_path / "honest.evidence")

    def slash(path):
        return runner.invoke(app, ["ledger", "slash", "--evidence", str(path), "--model",
                                   str(model_dir), "--data-dir", str(data_dir), "--ledger",
                                   str(ledger_file), "--json"])

    ok = slash(guilty_file)
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["slashed"] == STAKE and json.loads(ok.output)["accused"] == node.address
    again = slash(guilty_file)
    assert again.exit_code == 1 and "already convicted" in again.output
    refused = slash(honest_file)
    assert refused.exit_code == 1 and "accusation refused" in refused.output
    verify = runner.invoke(app, ["ledger", "verify", "--data-dir", str(data_dir), "--ledger",
                                 str(ledger_file), "--json"])
    assert verify.exit_code == 0 and json.loads(verify.output)["ok"], verify.output
    journal = runner.invoke(app, ["ledger", "journal", "--kind", "slash", "--ledger",
                                  str(ledger_file), "--data-dir", str(data_dir), "--json"])
    entries = [e["payload"] for e in json.loads(journal.output)]
    assert [e["verdict"] for e in entries] == ["guilty", "not_guilty"]
    assert entries[0]["operation"]["counterparty"] == node.address  # the accused, signed
    with open_ledger(ledger_file) as book:
        assert book.balance(accuser.address) == FUNDS + STAKE // 2 - BOND


def test_a_node_that_signs_a_malformed_commitment_is_guilty(book, span, node, accuser):
    """An honest node always signs commit(out); three bytes commit to nothing."""
    inputs = hop_inputs(15)
    signer = ReceiptSigner(node, "m", span.spec.model_id, Span(START, END), 1)
    cache = span.new_cache(START, END)
    receipts = []
    for step, x in enumerate(inputs):
        out = span.forward(x, cache)
        receipts.append(signer.sign_step(step, tokens_of(x), x, out,
                                         fingerprint=b"\x00" * 3 if step == 3 else commit(out)))
    verdict = check_evidence(accuse(span, accuser, receipts, inputs), span)
    assert verdict.guilty and verdict.distance == float("inf") and "malformed" in verdict.reason
    assert book.slash(accuser, verdict).slashed == STAKE
    assert book.verify().ok

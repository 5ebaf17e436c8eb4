"""`layerchain wallet ...` and `layerchain ledger ...` through the real app, in-process."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import pytest
from typer.testing import CliRunner

from layerchain.cli.main import app
from layerchain.ledger import open_ledger
from layerchain.market.vouchers import ChannelPayer, VoucherStore
from layerchain.market.wallet import Wallet

runner = CliRunner()


def _run(*args: str, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output  # stdout and stderr, interleaved
    return result, result.output


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def test_wallet_flow(home):
    _, out = _run("wallet", "create", "--data-dir", home)
    wallet = Wallet.load(home)
    assert wallet.address in out
    assert stat.S_IMODE(os.stat(home / "wallet.json").st_mode) == 0o600
    _, out = _run("wallet", "create", "--data-dir", home, code=1)
    assert "already exists" in out and "Traceback" not in out
    result, _ = _run("wallet", "show", "--data-dir", home, "--json")
    assert json.loads(result.stdout)["address"] == wallet.address
    _, out = _run("wallet", "balance", "--data-dir", home, code=1)
    assert "no ledger" in out
    result, _ = _run("wallet", "deposit", "500", "--data-dir", home, "--json")
    assert json.loads(result.stdout)["balance"] == 500
    _run("wallet", "withdraw", "120", "--data-dir", home)
    _, out = _run("wallet", "withdraw", "1000", "--data-dir", home, code=1)
    assert "380 credits" in out
    _, out = _run("wallet", "deposit", "0", "--data-dir", home, code=1)
    assert "positive integer" in out
    result, _ = _run("wallet", "balance", "--data-dir", home, "--json")
    assert json.loads(result.stdout)["balance"] == 380
    _, out = _run("wallet", "balance", "--data-dir", home)
    assert "balance 380" in out


def test_ledger_status_journal_verify_and_tamper(home, tmp_path):
    ledger_file = tmp_path / "shared.sqlite"
    _run("ledger", "init", "--ledger", ledger_file, "--dispute-window", "5")
    _run("ledger", "init", "--ledger", ledger_file, code=1)
    _run("wallet", "create", "--data-dir", home)
    _run("wallet", "deposit", "70", "--data-dir", home, "--ledger", ledger_file)
    result, _ = _run("ledger", "status", "--ledger", ledger_file, "--json")
    status = json.loads(result.stdout)
    assert status["config"]["dispute_window_s"] == 5
    assert status["journal_entries"] == 2 and status["accounts"][0]["balance"] == 70
    _, out = _run("ledger", "status", "--ledger", ledger_file)
    assert "accounts" in out
    result, _ = _run("ledger", "journal", "--ledger", ledger_file, "--json")
    assert [e["kind"] for e in json.loads(result.stdout)] == ["genesis", "deposit"]
    result, _ = _run("ledger", "journal", "--ledger", ledger_file, "--kind", "deposit", "--json")
    deposit = json.loads(result.stdout)[0]["payload"]
    assert deposit["operation"]["amount"] == 70 and deposit["balance"] == 70
    assert deposit["operation"]["actor"] == Wallet.load(home).address  # signed by its owner
    _, out = _run("ledger", "verify", "--ledger", ledger_file)
    assert out.startswith("ok: 2 journal entries")

    db = sqlite3.connect(ledger_file)
    db.execute("UPDATE journal SET payload = replace(payload, ':70,', ':7000,') WHERE seq = 2")
    db.commit()
    db.close()
    _, out = _run("ledger", "verify", "--ledger", ledger_file, code=1)
    assert "journal entry 2 (deposit)" in out
    result, _ = _run("ledger", "verify", "--ledger", ledger_file, "--json", code=1)
    assert json.loads(result.stdout)["ok"] is False
    _, out = _run("ledger", "verify", "--ledger", tmp_path / "missing.sqlite", code=1)
    assert "no ledger" in out


def test_ledger_redeem_uses_the_nodes_stored_vouchers(tmp_path, monkeypatch):
    node_dir, client_dir = tmp_path / "node", tmp_path / "client"
    ledger_file = tmp_path / "shared.sqlite"
    monkeypatch.setenv("LAYERCHAIN_LEDGER", str(ledger_file))
    _run("wallet", "create", "--data-dir", node_dir)
    _run("wallet", "create", "--data-dir", client_dir)
    _run("wallet", "deposit", "1000", "--data-dir", client_dir)
    node, client = Wallet.load(node_dir), Wallet.load(client_dir)
    with open_ledger(ledger_file) as ledger:
        payer = ChannelPayer(client, ledger, deposit=300)
        store = VoucherStore.for_data_dir(node_dir)
        for _ in range(3):
            store.save(payer.voucher_for(node.address, 40))
    result, _ = _run("ledger", "redeem", "--data-dir", node_dir, "--json")
    assert json.loads(result.stdout)["credited"] == 120
    _, out = _run("ledger", "redeem", "--data-dir", node_dir)
    assert "credited 0 from 1 voucher" in out
    result, _ = _run("wallet", "balance", "--data-dir", node_dir, "--json")
    assert json.loads(result.stdout)["balance"] == 120
    result, _ = _run("wallet", "balance", "--data-dir", client_dir, "--json")
    client_view = json.loads(result.stdout)
    assert (client_view["balance"], client_view["locked_in_channels"]) == (700, 180)
    _run("ledger", "verify", "--data-dir", node_dir)


def test_wallet_settle_refunds_the_unspent_deposit_after_the_dispute_window(home, tmp_path):
    import time

    _run("wallet", "create", "--data-dir", home)
    ledger_file = home / "ledger.sqlite"
    _run("ledger", "init", "--data-dir", home, "--dispute-window", "1")
    _run("wallet", "deposit", "1000", "--data-dir", home)
    payer_wallet, node = Wallet.load(home), Wallet.generate()
    with open_ledger(ledger_file) as book:
        payer = ChannelPayer(payer_wallet, book, deposit=600)
        voucher = payer.voucher_for(node.address, 250)
        assert book.redeem(voucher) == 250
    result, _ = _run("wallet", "settle", "--data-dir", home, "--json")
    first = json.loads(result.stdout)
    assert [c["state"] for c in first["channels"]] == ["closing"]
    assert first["balance"] == 400  # 600 still locked until the window is over
    time.sleep(1.1)
    result, _ = _run("wallet", "settle", "--data-dir", home, "--json")
    second = json.loads(result.stdout)
    assert [(c["state"], c["refund"]) for c in second["channels"]] == [("closed", 350)]
    assert second["balance"] == 750
    with open_ledger(ledger_file) as book:
        assert book.balance(node.address) == 250
        assert book.verify().ok


def test_verify_says_what_it_proves_and_checks_the_wallets_checkpoints(home, tmp_path):
    """Every wallet command keeps a signed checkpoint in its data dir; `ledger verify`
    reads it, so a journal rewritten and re-hashed in place no longer passes."""
    ledger_file = home / "ledger.sqlite"
    _run("wallet", "create", "--data-dir", home)
    _run("wallet", "deposit", "500", "--data-dir", home)
    _run("wallet", "withdraw", "200", "--data-dir", home)
    lines = (home / "checkpoints.jsonl").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [2, 3]
    _, out = _run("ledger", "verify", "--data-dir", home)
    assert out.startswith("ok: 3 journal entries: hash chain intact")
    assert "signed by their owners" in out and "entries 1..3 match 2 checkpoint(s)" in out
    other = tmp_path / "auditor"
    _run("wallet", "create", "--data-dir", other)
    result, _ = _run("ledger", "checkpoint", "--data-dir", other, "--ledger", ledger_file,
                     "--json")
    assert json.loads(result.stdout)["seq"] == 3

    # whoever can write the file drops the withdrawal (the last entry: the chain up to it
    # stays intact) and makes the tables and the recorded head agree
    from layerchain.ledger.journal import replay

    db = sqlite3.connect(ledger_file)
    db.execute("DELETE FROM journal WHERE seq = 3")
    db.execute("UPDATE accounts SET balance = 500")
    rows = db.execute("SELECT address, nonce FROM nonces").fetchall()
    db.execute("DELETE FROM nonces")
    db.commit()
    with open_ledger(ledger_file) as ledger:
        kept = replay(ledger.journal())[0].nonces
    db.executemany("INSERT INTO nonces VALUES (?, ?)", [r for r in rows if r in kept])
    head = db.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
    db.execute("UPDATE meta SET value = ? WHERE key = 'head'", (f"{head[0]}:{head[1]}",))
    db.commit()
    db.close()
    with open_ledger(ledger_file) as ledger:
        assert ledger.verify().ok  # without checkpoints nothing is wrong
    _, out = _run("ledger", "verify", "--data-dir", home, code=1)
    assert "names journal entry 3, which is missing" in out
    result, _ = _run("ledger", "verify", "--ledger", ledger_file, "--data-dir", tmp_path / "x",
                     "--checkpoints", other / "checkpoints.jsonl", "--json", code=1)
    assert json.loads(result.stdout)["ok"] is False

"""The embedded SQLite ledger: accounts, channels, stakes, rewards, journal and verify."""

from __future__ import annotations

import json
import sqlite3

import pytest

from layerchain.errors import ChannelError, InsufficientFunds, InvalidVoucher, LedgerError
from layerchain.ledger import (
    LedgerConfig,
    LivenessRecord,
    SqliteLedger,
    Voucher,
    open_ledger,
    sign_liveness,
    sign_voucher,
)
from layerchain.ledger.journal import canonical_payload, entry_hash
from layerchain.market.wallet import Wallet


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def alice() -> Wallet:
    return Wallet.generate()


@pytest.fixture(scope="module")
def bob() -> Wallet:
    return Wallet.generate()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path, clock):
    config = LedgerConfig(dispute_window_s=100, reward_per_block_hour=3, min_stake=50)
    book = open_ledger(tmp_path / "ledger.sqlite", config, clock=clock)
    yield book
    book.close()


def test_deposit_withdraw_and_insufficient_funds(ledger, alice):
    assert ledger.balance(alice.address) == 0
    assert ledger.deposit(alice.address, 100) == 100
    assert ledger.withdraw(alice.address.lower(), 30) == 70  # any address casing
    with pytest.raises(InsufficientFunds, match="has 70 credits"):
        ledger.withdraw(alice.address, 71)
    for bad in (0, -5, 2**63, 1.5, "7"):
        with pytest.raises(LedgerError, match="positive integer"):
            ledger.deposit(alice.address, bad)  # type: ignore[arg-type]
    with pytest.raises(LedgerError, match="not an address"):
        ledger.deposit("alice", 1)
    assert ledger.balance(alice.address) == 70
    assert [e.kind for e in ledger.journal()] == ["genesis", "deposit", "withdraw"]
    assert ledger.verify().ok


def test_channel_redeem_is_idempotent_and_bounded_by_the_deposit(ledger, alice, bob):
    ledger.deposit(alice.address, 1000)
    with pytest.raises(InsufficientFunds):
        ledger.open_channel(alice.address, bob.address, 1001)
    with pytest.raises(ChannelError, match="differ"):
        ledger.open_channel(alice.address, alice.address, 10)
    cid = ledger.open_channel(alice.address, bob.address, 600)
    assert ledger.balance(alice.address) == 400
    v1 = sign_voucher(alice, Voucher(cid, 1, 100))
    v2 = sign_voucher(alice, Voucher(cid, 2, 250))
    assert ledger.redeem(v2) == 250
    assert ledger.redeem(v2) == 0  # double redemption
    assert ledger.redeem(v1) == 0  # an older voucher
    assert ledger.redeem(sign_voucher(alice, Voucher(cid, 2, 400))) == 0  # nonce reuse
    assert ledger.redeem(sign_voucher(alice, Voucher(cid, 3, 250))) == 0  # nothing new
    with pytest.raises(InvalidVoucher, match="exceeds the channel deposit"):
        ledger.redeem(sign_voucher(alice, Voucher(cid, 4, 601)))
    with pytest.raises(InvalidVoucher, match="not signed by its payer"):
        ledger.redeem(sign_voucher(bob, Voucher(cid, 4, 500)))
    with pytest.raises(ChannelError, match="unknown channel"):
        ledger.redeem(sign_voucher(alice, Voucher("0x" + "00" * 32, 1, 1)))
    assert ledger.redeem(sign_voucher(alice, Voucher(cid, 9, 600))) == 350
    channel = ledger.channel(cid)
    assert (channel.redeemed, channel.nonce, channel.state) == (600, 9, "open")
    assert ledger.balance(bob.address) == 600
    assert sum(1 for e in ledger.journal() if e.kind == "redeem") == 2
    assert ledger.verify().ok


def test_close_refunds_the_unspent_deposit_after_the_dispute_window(ledger, clock, alice, bob):
    ledger.deposit(alice.address, 500)
    cid = ledger.open_channel(alice.address, bob.address, 500)
    assert ledger.redeem(sign_voucher(alice, Voucher(cid, 1, 120))) == 120
    assert ledger.close_channel(cid) == 0
    assert ledger.channel(cid).state == "closing"
    clock.now += 50
    with pytest.raises(ChannelError, match="dispute window for another 50 s"):
        ledger.close_channel(cid)
    # the payee may still redeem a later voucher during the window
    late = sign_voucher(alice, Voucher(cid, 2, 200))
    assert ledger.redeem(late) == 80
    clock.now += 50
    assert ledger.close_channel(cid) == 300
    assert ledger.balance(alice.address) == 300 and ledger.balance(bob.address) == 200
    assert ledger.redeem(late) == 0  # a stale voucher still credits nothing
    with pytest.raises(ChannelError, match="closed"):
        ledger.redeem(sign_voucher(alice, Voucher(cid, 3, 300)))
    with pytest.raises(ChannelError):
        ledger.close_channel(cid)
    assert ledger.verify().ok


def test_zero_window_closes_at_once(tmp_path, alice, bob):
    with open_ledger(tmp_path / "z.sqlite", LedgerConfig(dispute_window_s=0)) as ledger:
        ledger.deposit(alice.address, 10)
        cid = ledger.open_channel(alice.address, bob.address, 10)
        assert ledger.close_channel(cid) == 10
        assert ledger.channel(cid).state == "closed"


def test_node_stake_and_uptime_rewards(ledger, clock, bob):
    ledger.deposit(bob.address, 100)
    with pytest.raises(LedgerError, match="at least 50"):
        ledger.register_node(bob.address, 10)
    assert ledger.register_node(bob.address, 60).stake == 60
    assert ledger.account(bob.address) == type(ledger.account(bob.address))(bob.address, 40, 60)
    start = int(clock.now) - 7200
    record = LivenessRecord(bob.address, start, start + 7200, blocks=10)
    # 3 credits per block-hour x 10 blocks x 2 hours
    assert ledger.reward_uptime(sign_liveness(bob, record)) == 60
    with pytest.raises(LedgerError, match="overlaps"):
        ledger.reward_uptime(sign_liveness(bob, record))
    forged = sign_liveness(Wallet.generate(), LivenessRecord(bob.address, start + 7200,
                                                                start + 7300, 10))
    with pytest.raises(LedgerError, match="not signed by its node"):
        ledger.reward_uptime(forged)
    stranger = Wallet.generate()
    with pytest.raises(LedgerError, match="not a registered node"):
        ledger.reward_uptime(sign_liveness(stranger, LivenessRecord(
            stranger.address, start, start + 10, 1)))
    future = LivenessRecord(bob.address, int(clock.now), int(clock.now) + 3600, 1)
    with pytest.raises(LedgerError, match="future"):
        ledger.reward_uptime(sign_liveness(bob, future))
    node = ledger.node(bob.address)
    assert (node.rewards, node.rewarded_until) == (60, start + 7200)
    assert ledger.balance(bob.address) == 100
    assert ledger.verify().ok


def test_config_is_fixed_by_the_genesis_entry(tmp_path):
    path = tmp_path / "c.sqlite"
    open_ledger(path, LedgerConfig(dispute_window_s=5)).close()
    with open_ledger(path) as again:
        assert again.config.dispute_window_s == 5
    with pytest.raises(LedgerError, match="was created with"):
        open_ledger(path, LedgerConfig(dispute_window_s=6))
    bad = tmp_path / "junk.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="cannot open ledger"):
        open_ledger(bad)


def test_memory_ledger_for_fast_tests(alice):
    with SqliteLedger(":memory:") as ledger:
        ledger.deposit(alice.address, 5)
        assert ledger.balance(alice.address) == 5 and ledger.verify().ok


def _busy_ledger(path, alice, bob):
    """A ledger with a deposit, a channel and a redemption; returns the channel id."""
    with open_ledger(path, LedgerConfig(dispute_window_s=0)) as ledger:
        ledger.deposit(alice.address, 1000)
        cid = ledger.open_channel(alice.address, bob.address, 400)
        ledger.redeem(sign_voucher(alice, Voucher(cid, 1, 150)))
        ledger.withdraw(alice.address, 100)
        assert ledger.verify().ok
    return cid


def _verify(path):
    with open_ledger(path) as ledger:
        return ledger.verify()


def _edit(path, sql, *args):
    db = sqlite3.connect(path)
    db.execute(sql, args)
    db.commit()
    db.close()


def test_tampered_journal_entry_is_named(tmp_path, alice, bob):
    path = tmp_path / "t.sqlite"
    _busy_ledger(path, alice, bob)
    _edit(path, "UPDATE journal SET payload = replace(payload, '1000', '9000') WHERE seq = 2")
    report = _verify(path)
    assert not report.ok
    assert any("journal entry 2 (deposit): hash does not match" in p for p in report.problems)
    assert any("balance of" in p for p in report.problems)  # replay disagrees with the table


def test_tampered_balance_is_caught_by_the_replay(tmp_path, alice, bob):
    path = tmp_path / "t.sqlite"
    _busy_ledger(path, alice, bob)
    _edit(path, "UPDATE accounts SET balance = balance + 1 WHERE address = ?", bob.address)
    report = _verify(path)
    assert report.problems == (f"balance of {bob.address} is 151, the journal gives 150",)


def test_removed_last_entry_is_caught(tmp_path, alice, bob):
    path = tmp_path / "t.sqlite"
    _busy_ledger(path, alice, bob)
    _edit(path, "DELETE FROM journal WHERE seq = (SELECT MAX(seq) FROM journal)")
    problems = _verify(path).problems
    assert any("journal head is recorded as 5:" in p for p in problems)


def test_rehashed_forged_redemption_fails_its_signature(tmp_path, alice, bob):
    """An attacker who edits a redemption and re-chains every hash still cannot sign."""
    path = tmp_path / "t.sqlite"
    cid = _busy_ledger(path, alice, bob)
    db = sqlite3.connect(path)
    rows = db.execute("SELECT seq, kind, payload FROM journal ORDER BY seq").fetchall()
    forged = sign_voucher(bob, Voucher(cid, 1, 150)).hex()  # signed by the payee, not payer
    prev = "0" * 64
    for seq, kind, payload in rows:
        if kind == "redeem":
            data = json.loads(payload)
            data["voucher"] = forged
            payload = canonical_payload(data)
        digest = entry_hash(prev, seq, kind, payload)
        db.execute("UPDATE journal SET payload = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                   (payload, prev, digest, seq))
        prev = digest
    db.execute("UPDATE meta SET value = ? WHERE key = 'head'", (f"{rows[-1][0]}:{prev}",))
    db.commit()
    db.close()
    problems = _verify(path).problems
    assert any("journal entry 4 (redeem)" in p and "not signed by its payer" in p
               for p in problems), problems

"""The embedded SQLite ledger: signed operations, channels, stakes, rewards, journal, verify."""

from __future__ import annotations

import json
import sqlite3

import msgpack
import pytest

import layerchain.ledger.sqlite as sqlite_backend
from layerchain.errors import ChannelError, InsufficientFunds, InvalidVoucher, LedgerError
from layerchain.ledger import (
    CheckpointStore,
    LedgerConfig,
    SqliteLedger,
    Voucher,
    new_operation,
    open_ledger,
    sign_operation,
    sign_voucher,
)
from layerchain.ledger.base import MAX_BLOCKS
from layerchain.ledger.journal import RULES, canonical_payload, entry_hash, replay
from layerchain.ledger.operations import KINDS
from layerchain.market.wallet import Wallet


class Clock:
    """The machine's clock as the ledger reads it, moved by the test."""

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
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(sqlite_backend, "wall_clock", fake)
    return fake


@pytest.fixture
def ledger(tmp_path, clock):
    # no stake-yield cap here: the rules of time and paid work alone (the cap, on both
    # backends: test_ledger_conformance.py::test_self_dealing_cannot_drain_the_rewards)
    config = LedgerConfig(dispute_window_s=100, reward_per_block_hour=3, min_stake=50,
                          stake_yield_bps=None)
    book = open_ledger(tmp_path / "ledger.sqlite", config)
    yield book
    book.close()


class Impostor:
    """Names ``address`` as the actor but signs with another wallet's key."""

    def __init__(self, address: str, key: Wallet) -> None:
        self.address, self._key = address, key

    def sign_digest(self, digest: bytes) -> bytes:
        return self._key.sign_digest(digest)


def _op(signer: Wallet, ledger, kind: str, *, actor: str | None = None, **fields) -> bytes:
    """Operation bytes of ``kind`` for ``actor`` (default: the signer), signed by ``signer``."""
    who = signer if actor is None else Impostor(actor, signer)
    return sign_operation(who, new_operation(who, ledger.ledger_id, kind, now=ledger.now(), **fields))


def test_deposit_withdraw_and_insufficient_funds(ledger, alice):
    assert ledger.balance(alice.address) == 0
    assert ledger.deposit(alice, 100) == 100
    assert ledger.withdraw(alice, 30) == 70
    assert ledger.balance(alice.address.lower()) == 70  # any address casing
    with pytest.raises(InsufficientFunds, match="has 70 credits"):
        ledger.withdraw(alice, 71)
    for bad in (0, -5, 2**63, 1.5, "7"):
        with pytest.raises(LedgerError, match="positive integer"):
            ledger.deposit(alice, bad)  # type: ignore[arg-type]
    with pytest.raises(LedgerError, match="not an address"):
        ledger.balance("alice")
    assert ledger.balance(alice.address) == 70
    assert [e.kind for e in ledger.journal()] == ["genesis", "deposit", "withdraw"]
    assert ledger.verify().ok


def test_only_the_owner_can_move_its_credits(ledger, alice, bob):
    """Whoever can open the file cannot spend, stake or lock another account's credits."""
    ledger.deposit(alice, 1000)
    for kind, fields in [("withdraw", {"amount": 1000}),
                         ("register_node", {"amount": 1000, "blocks": 30}),
                         ("open_channel", {"amount": 1000, "counterparty": bob.address})]:
        forged = _op(bob, ledger, kind, actor=alice.address, **fields)
        with pytest.raises(LedgerError, match="not signed by its actor"):
            ledger.submit(forged)
    # a genuine operation of alice, its amount raised by whoever relays it
    fields = msgpack.unpackb(_op(alice, ledger, "withdraw", amount=1))
    fields[8] = 1000
    with pytest.raises(LedgerError, match="not signed by its actor"):
        ledger.submit(msgpack.packb(fields))
    cid = ledger.open_channel(alice, bob.address, 100)
    with pytest.raises(ChannelError, match="paid by"):
        ledger.close_channel(bob, cid)  # the payee cannot take the payer's refund
    assert ledger.balance(alice.address) == 900 and ledger.balance(bob.address) == 0
    assert ledger.verify().ok


def test_operations_are_used_once_on_one_ledger_before_their_deadline(ledger, clock, alice, tmp_path):
    withdraw = _op(alice, ledger, "withdraw", amount=10)
    ledger.deposit(alice, 100)
    assert ledger.submit(withdraw) == 90
    with pytest.raises(LedgerError, match="replayed"):
        ledger.submit(withdraw)
    with open_ledger(tmp_path / "other.sqlite") as other:
        other.deposit(alice, 100)
        with pytest.raises(LedgerError, match="not this one"):
            other.submit(_op(alice, ledger, "withdraw", amount=10))
    late = _op(alice, ledger, "withdraw", amount=10)  # valid for an hour from now
    clock.now += 2 * 3600
    with pytest.raises(LedgerError, match="expired"):
        ledger.submit(late)
    assert ledger.balance(alice.address) == 90
    assert ledger.verify().ok


def test_channel_redeem_is_idempotent_and_bounded_by_the_deposit(ledger, alice, bob):
    ledger.deposit(alice, 1000)
    with pytest.raises(InsufficientFunds):
        ledger.open_channel(alice, bob.address, 1001)
    with pytest.raises(ChannelError, match="differ"):
        ledger.open_channel(alice, alice.address, 10)
    cid = ledger.open_channel(alice, bob.address, 600)
    assert ledger.balance(alice.address) == 400
    v1 = sign_voucher(alice, Voucher(cid, 1, 100), ledger.domain_separator)
    v2 = sign_voucher(alice, Voucher(cid, 2, 250), ledger.domain_separator)
    assert ledger.redeem(v2) == 250
    assert ledger.redeem(v2) == 0  # double redemption
    assert ledger.redeem(v1) == 0  # an older voucher
    assert ledger.redeem(sign_voucher(alice, Voucher(cid, 2, 400), ledger.domain_separator)) == 0  # nonce reuse
    assert ledger.redeem(sign_voucher(alice, Voucher(cid, 3, 250), ledger.domain_separator)) == 0  # nothing new
    with pytest.raises(InvalidVoucher, match="exceeds the channel deposit"):
        ledger.redeem(sign_voucher(alice, Voucher(cid, 4, 601), ledger.domain_separator))
    with pytest.raises(InvalidVoucher, match="not signed by its payer"):
        ledger.redeem(sign_voucher(bob, Voucher(cid, 4, 500), ledger.domain_separator))
    with pytest.raises(ChannelError, match="unknown channel"):
        ledger.redeem(sign_voucher(alice, Voucher("0x" + "00" * 32, 1, 1), ledger.domain_separator))
    assert ledger.top_up(alice, cid, 100) == 700
    assert ledger.redeem(sign_voucher(alice, Voucher(cid, 9, 700), ledger.domain_separator)) == 450
    channel = ledger.channel(cid)
    assert (channel.redeemed, channel.nonce, channel.state) == (700, 9, "open")
    assert ledger.balance(bob.address) == 700 and ledger.balance(alice.address) == 300
    assert sum(1 for e in ledger.journal() if e.kind == "redeem") == 2
    assert ledger.verify().ok


def test_close_refunds_the_unspent_deposit_after_the_dispute_window(ledger, clock, alice, bob):
    ledger.deposit(alice, 500)
    cid = ledger.open_channel(alice, bob.address, 500)
    assert ledger.redeem(sign_voucher(alice, Voucher(cid, 1, 120), ledger.domain_separator)) == 120
    assert ledger.close_channel(alice, cid) == 0
    assert ledger.channel(cid).state == "closing"
    with pytest.raises(ChannelError, match="is closing"):
        ledger.top_up(alice, cid, 10)
    clock.now += 50
    with pytest.raises(ChannelError, match="dispute window for another 50 s"):
        ledger.close_channel(alice, cid)
    # the payee may still redeem a later voucher during the window
    late = sign_voucher(alice, Voucher(cid, 2, 200), ledger.domain_separator)
    assert ledger.redeem(late) == 80
    clock.now += 50
    assert ledger.close_channel(alice, cid) == 300
    assert ledger.balance(alice.address) == 300 and ledger.balance(bob.address) == 200
    assert ledger.redeem(late) == 0  # a stale voucher still credits nothing
    with pytest.raises(ChannelError, match="closed"):
        ledger.redeem(sign_voucher(alice, Voucher(cid, 3, 300), ledger.domain_separator))
    with pytest.raises(ChannelError):
        ledger.close_channel(alice, cid)
    assert ledger.verify().ok


def test_the_ledger_keeps_its_own_clock(tmp_path, clock, alice, bob):
    """No caller chooses the time: a client whose clock runs an hour ahead cannot cut the
    dispute window short, and ledger time never goes backwards."""
    with pytest.raises(TypeError):
        open_ledger(tmp_path / "l.sqlite", clock=lambda: clock.now + 3600)  # no such seam
    with open_ledger(tmp_path / "l.sqlite", LedgerConfig(dispute_window_s=600)) as ledger:
        ledger.deposit(alice, 100)
        cid = ledger.open_channel(alice, bob.address, 100)
        ledger.close_channel(alice, cid)
        closes_at = ledger.channel(cid).closes_at
        assert closes_at == clock.now + 600
        clock.now -= 3600  # the machine's clock steps back an hour
        ledger.deposit(alice, 1)
        stamps = [json.loads(e.payload)["ts"] for e in ledger.journal()]
        assert stamps == sorted(stamps) and stamps[-1] == stamps[-2]
        clock.now += 3600 + 599
        with pytest.raises(ChannelError, match="dispute window"):
            ledger.close_channel(alice, cid)
        assert ledger.verify().ok
        # a process on a machine with a forged clock writes the close; verify notices
        clock.now += 3600
        assert ledger.close_channel(alice, cid) == 100
        clock.now -= 3600
        report = ledger.verify()
        assert any("ahead of this machine's clock" in p for p in report.problems)


def test_zero_window_closes_at_once(tmp_path, alice, bob):
    with open_ledger(tmp_path / "z.sqlite", LedgerConfig(dispute_window_s=0)) as ledger:
        ledger.deposit(alice, 10)
        cid = ledger.open_channel(alice, bob.address, 10)
        assert ledger.close_channel(alice, cid) == 10
        assert ledger.channel(cid).state == "closed"


def test_uptime_rewards_are_earned_not_claimed(ledger, clock, alice, bob):
    """The attack of issue 12 item 11: one credit staked, 2^32-1 blocks, a day back-dated.
    Blocks above max_blocks are refused; the ledger pays only for time it saw pass since
    registration, up to the last time a client's voucher paid the node, and never more
    than those vouchers paid."""
    ledger.deposit(bob, 100)
    with pytest.raises(LedgerError, match="at least 50"):
        ledger.register_node(bob, 10, 30)
    with pytest.raises(LedgerError, match="at most 1024 blocks"):
        ledger.register_node(bob, 60, 2**32 - 1)
    node = ledger.register_node(bob, 60, 1024)
    assert (node.stake, node.blocks, node.registered_at) == (60, 1024, clock.now)
    clock.now += 24 * 3600
    with pytest.raises(LedgerError, match="no client has paid"):
        ledger.claim_reward(bob)  # a day of "uptime" nobody attests: nothing
    ledger.deposit(alice, 1000)
    cid = ledger.open_channel(alice, bob.address, 1000)
    assert ledger.redeem(sign_voucher(alice, Voucher(cid, 1, 7), ledger.domain_separator)) == 7
    clock.now += 3600
    assert ledger.claim_reward(bob) == 7  # bounded by the work clients paid for
    with pytest.raises(LedgerError, match="no client has paid"):
        ledger.claim_reward(bob)
    stranger = Wallet.generate()
    with pytest.raises(LedgerError, match="not a registered node"):
        ledger.claim_reward(stranger)
    ledger.register_node(bob, 0, 10)  # honest: 10 blocks
    start = ledger.node(bob.address).rewarded_until
    clock.now += 7200
    ledger.redeem(sign_voucher(alice, Voucher(cid, 2, 907), ledger.domain_separator))  # 900 credits of work
    clock.now += 999  # the node went quiet: time after the last payment does not count
    # 3 credits per block-hour x 10 blocks x 2 hours (registration to the last payment)
    assert ledger.claim_reward(bob) == 60
    info = ledger.node(bob.address)
    assert (info.rewards, info.rewarded_until, info.earned) == (67, start + 7200, 0)
    assert ledger.balance(bob.address) == 100 - 60 + 7 + 900 + 67
    assert ledger.verify().ok


def test_rules_dispatch_one_function_per_operation_kind():
    assert set(RULES) == set(KINDS)


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


def test_an_old_unsigned_ledger_is_refused(tmp_path):
    path = tmp_path / "old.sqlite"
    open_ledger(path).close()
    db = sqlite3.connect(path)
    payload = json.loads(db.execute("SELECT payload FROM journal WHERE seq = 1").fetchone()[0])
    del payload["version"]
    db.execute("UPDATE journal SET payload = ? WHERE seq = 1", (canonical_payload(payload),))
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="older layerchain"):
        open_ledger(path)


def test_memory_ledger_for_fast_tests(alice):
    with SqliteLedger(":memory:") as ledger:
        ledger.deposit(alice, 5)
        assert ledger.balance(alice.address) == 5 and ledger.verify().ok


def _busy_ledger(path, alice, bob):
    """A ledger with a deposit, a channel, a redemption and a withdrawal; returns the
    channel id."""
    with open_ledger(path, LedgerConfig(dispute_window_s=0)) as ledger:
        ledger.deposit(alice, 1000)
        cid = ledger.open_channel(alice, bob.address, 400)
        ledger.redeem(sign_voucher(alice, Voucher(cid, 1, 150), ledger.domain_separator))
        ledger.withdraw(alice, 100)
        assert ledger.verify().ok
    return cid


def _domain(path):
    with open_ledger(path) as ledger:
        return ledger.domain_separator


def _verify(path, checkpoints=()):
    with open_ledger(path) as ledger:
        return ledger.verify(checkpoints)


def _edit(path, sql, *args):
    db = sqlite3.connect(path)
    db.execute(sql, args)
    db.commit()
    db.close()


def _rechain(db) -> None:
    """Re-hash every journal entry in place and fix the recorded head: a forger's tidy-up."""
    rows = db.execute("SELECT seq, kind, payload FROM journal ORDER BY seq").fetchall()
    prev = "0" * 64
    for seq, kind, payload in rows:
        digest = entry_hash(prev, seq, kind, payload)
        db.execute("UPDATE journal SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
        prev = digest
    db.execute("UPDATE meta SET value = ? WHERE key = 'head'", (f"{rows[-1][0]}:{prev}",))


def test_tampered_journal_entry_is_named(tmp_path, alice, bob):
    path = tmp_path / "t.sqlite"
    _busy_ledger(path, alice, bob)
    _edit(path, "UPDATE journal SET payload = replace(payload, '\"balance\":1000', "
                "'\"balance\":9000') WHERE seq = 2")
    report = _verify(path)
    assert not report.ok
    assert any("journal entry 2 (deposit): hash does not match" in p for p in report.problems)
    assert any("rules give 1000" in p for p in report.problems)


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
    row = db.execute("SELECT seq, payload FROM journal WHERE kind = 'redeem'").fetchone()
    data = json.loads(row[1])
    data["voucher"] = sign_voucher(bob, Voucher(cid, 1, 150), _domain(path)).hex()  # signed by the payee
    db.execute("UPDATE journal SET payload = ? WHERE seq = ?", (canonical_payload(data), row[0]))
    _rechain(db)
    db.commit()
    db.close()
    problems = _verify(path).problems
    assert any("journal entry 4 (redeem)" in p and "not signed by its payer" in p
               for p in problems), problems


def _as_written_before_eip712(path, alice, *, keep_scheme=False):
    """Turn ``_busy_ledger``'s file into one an older layerchain wrote: genesis without the
    voucher scheme and the redemption's voucher in wire version 1 (EIP-191, no domain)."""
    db = sqlite3.connect(path)
    rows = dict(db.execute("SELECT kind, payload FROM journal WHERE kind IN ('genesis', 'redeem')"))
    genesis, redeem = json.loads(rows["genesis"]), json.loads(rows["redeem"])
    if not keep_scheme:
        del genesis["vouchers"]
    fields = msgpack.unpackb(bytes.fromhex(redeem["voucher"]))
    voucher = Voucher("0x" + fields[1].hex(), fields[2], fields[3])
    fields[0], fields[4] = 1, alice.sign_digest(voucher.legacy_digest())
    redeem["voucher"] = msgpack.packb(fields).hex()
    for kind, payload in (("genesis", genesis), ("redeem", redeem)):
        db.execute("UPDATE journal SET payload = ? WHERE kind = ?", (canonical_payload(payload), kind))
    _rechain(db)
    db.commit()
    db.close()


def test_a_ledger_written_before_eip712_vouchers_still_verifies(tmp_path, alice, bob):
    """Existing ledger files keep working: their old redeem entries hold EIP-191 vouchers,
    which a replay checks with the old digest; new redemptions on them are EIP-712."""
    path = tmp_path / "old.sqlite"
    cid = _busy_ledger(path, alice, bob)
    _as_written_before_eip712(path, alice)
    with open_ledger(path) as ledger:
        assert ledger.verify().ok, ledger.verify().problems
        old = msgpack.packb([1, bytes.fromhex(cid[2:]), 2, 200,
                             alice.sign_digest(Voucher(cid, 2, 200).legacy_digest())])
        with pytest.raises(InvalidVoucher, match="wire version 1"):
            ledger.redeem(old)  # live: EIP-712 only, even on an old ledger
        assert ledger.redeem(sign_voucher(alice, Voucher(cid, 2, 200), ledger.domain_separator)) == 50
        assert ledger.verify().ok


def test_an_eip191_voucher_in_a_new_ledgers_journal_is_a_problem(tmp_path, alice, bob):
    """A ledger created with EIP-712 vouchers never took a version 1 one: a forger who
    swaps one in (and re-chains) is caught even with the payer's genuine old signature."""
    path = tmp_path / "new.sqlite"
    _busy_ledger(path, alice, bob)
    _as_written_before_eip712(path, alice, keep_scheme=True)
    problems = _verify(path).problems
    assert any("journal entry 4 (redeem)" in p and "wire version 1" in p for p in problems), problems


def test_a_rewritten_and_rehashed_journal_is_caught_by_a_checkpoint(tmp_path, alice, bob):
    """Item 14: whoever can write the file removes alice's withdrawal, re-hashes the chain
    and fixes the tables: the journal alone still verifies. Alice's checkpoint, kept in her
    own directory, does not."""
    path = tmp_path / "t.sqlite"
    _busy_ledger(path, alice, bob)
    store = CheckpointStore.for_data_dir(tmp_path / "alice")
    with open_ledger(path) as ledger:
        store.append(ledger.checkpoint(alice))
        assert ledger.verify(store.load()).anchored_seq == 5
    db = sqlite3.connect(path)
    db.execute("DELETE FROM journal WHERE kind = 'withdraw'")  # the last entry
    db.execute("UPDATE accounts SET balance = balance + 100 WHERE address = ?", (alice.address,))
    db.commit()
    db.close()
    with open_ledger(path) as ledger:  # the nonces the rewritten journal uses
        kept = replay(ledger.journal())[0].nonces
    db = sqlite3.connect(path)
    for row in db.execute("SELECT address, nonce FROM nonces").fetchall():
        if row not in kept:
            db.execute("DELETE FROM nonces WHERE address = ? AND nonce = ?", row)
    _rechain(db)
    db.commit()
    db.close()
    assert _verify(path).ok  # the chain alone proves nothing against the file's writer
    report = _verify(path, store.load())
    assert not report.ok
    assert any("checkpoint signed by " + alice.address in p and "missing" in p
               for p in report.problems), report.problems


def test_operation_and_checkpoint_signatures_are_contract_checkable(ledger, alice):
    """What a contract would run: ecrecover over the EIP-191 hash of the digest."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    from layerchain.ledger import Checkpoint, sign_checkpoint, verify_checkpoint, verify_operation

    op = new_operation(alice, ledger.ledger_id, "deposit", now=ledger.now(), amount=5)
    assert len(op.canonical_bytes()) == 196
    signature = msgpack.unpackb(sign_operation(alice, op))[-1]
    assert Account.recover_message(encode_defunct(primitive=op.digest()),
                                   signature=signature) == alice.address
    assert verify_operation(sign_operation(alice, op)) == op
    checkpoint = Checkpoint(ledger.ledger_id, 1, ledger.head()[1])
    assert len(checkpoint.canonical_bytes()) == 104
    signed = verify_checkpoint(sign_checkpoint(alice, checkpoint))
    assert (signed.checkpoint, signed.signer) == (checkpoint, alice.address)


# -- slashing (the rule; evidence and its recomputation: tests/test_evidence.py) ------------


def _verdict(node, accuser, guilty: bool, step: int = 0):
    """A verdict on a receipt ``node`` signed (tensors given as digests: no model needed)."""
    from layerchain.ledger.base import EvidenceVerdict
    from layerchain.market.receipts import ReceiptSigner
    from layerchain.types import Span

    signer = ReceiptSigner(node, f"s{step}", "m", Span(0, 2), 1)
    receipt = signer.sign_step(0, 1, bytes(32), bytes([step + 1]) * 32, fingerprint=b"\x01" * 16)
    return EvidenceVerdict("0x" + f"{step:064x}",
                           accuser.address, node.address, 0, guilty, 0.5 if guilty else 0.0,
                           0.02, "test", receipt)


def test_slash_rules_and_their_replay(tmp_path, alice, bob):
    path = tmp_path / "s.sqlite"
    config = LedgerConfig(dispute_window_s=0, accuser_bond=10, slash_bps=5_000, slash_reward_bps=2_000)
    with open_ledger(path, config) as ledger:
        ledger.deposit(bob, 1000)
        ledger.register_node(bob, 800, 2)
        ledger.deposit(alice, 50)
        result = ledger.slash(alice, _verdict(bob, alice, guilty=True))
        assert (result.slashed, result.reward, result.burned) == (400, 80, 320)  # 50%, 20% of it
        assert ledger.account(bob.address).staked == 400 and ledger.balance(alice.address) == 130
        with pytest.raises(LedgerError, match="already convicted"):
            ledger.slash(alice, _verdict(bob, alice, guilty=True))  # the same receipt
        refused = ledger.slash(alice, _verdict(bob, alice, guilty=False, step=1))
        assert refused.bond == 10 and ledger.balance(bob.address) == 200 + 10
        assert ledger.balance(alice.address) == 120
        assert ledger.verify().ok
    _edit(path, "DELETE FROM convictions")  # forget the conviction: the receipt could slash again
    assert any("convicting receipt" in p for p in _verify(path).problems)


def test_a_forged_slash_entry_fails_its_receipts_signature(tmp_path, alice, bob):
    """Whoever edits a slash entry to accuse another node, and re-chains, is caught."""
    path = tmp_path / "s.sqlite"
    with open_ledger(path, LedgerConfig(accuser_bond=0)) as ledger:
        ledger.deposit(bob, 100)
        ledger.register_node(bob, 100, 2)
        ledger.slash(alice, _verdict(bob, alice, guilty=True))
    carol = Wallet.generate()
    db = sqlite3.connect(path)
    row = db.execute("SELECT seq, payload FROM journal WHERE kind = 'slash'").fetchone()
    data = json.loads(row[1])
    data["receipt"] = _verdict(carol, alice, guilty=True).receipt.hex()  # carol's, not bob's
    db.execute("UPDATE journal SET payload = ? WHERE seq = ?", (canonical_payload(data), row[0]))
    _rechain(db)
    db.commit()
    db.close()
    assert any("(slash)" in p and "receipt is" in p for p in _verify(path).problems)


def test_a_ledger_created_before_the_reward_bounds_replays_its_claims(tmp_path, clock, alice, bob):
    """A genesis without ``max_blocks`` and ``stake_yield_bps`` gets no bounds (MAX_BLOCKS, no
    yield cap), so a registration of 2^32-1 blocks and the claim it was paid replay as recorded."""
    path = tmp_path / "old.sqlite"
    legacy = LedgerConfig(dispute_window_s=0, reward_per_block_hour=3600, max_blocks=MAX_BLOCKS,
                          stake_yield_bps=None)
    with open_ledger(path, legacy) as ledger:
        ledger.deposit(bob, 10)
        ledger.register_node(bob, 1, 2**32 - 1)
        ledger.deposit(alice, 500)
        cid = ledger.open_channel(alice, bob.address, 500)
        clock.now += 60
        ledger.redeem(sign_voucher(alice, Voucher(cid, 1, 500), ledger.domain_separator))
        assert ledger.claim_reward(bob) == 500  # the old rule: min(rate x blocks x hours, earned)
    db = sqlite3.connect(path)
    genesis = json.loads(db.execute("SELECT payload FROM journal WHERE seq = 1").fetchone()[0])
    del genesis["config"]["max_blocks"], genesis["config"]["stake_yield_bps"]  # as written then
    db.execute("UPDATE journal SET payload = ? WHERE seq = 1", (canonical_payload(genesis),))
    _rechain(db)
    db.commit()
    db.close()
    with open_ledger(path) as ledger:
        assert ledger.config == legacy
        report = ledger.verify()
        assert report.ok, report.problems
    assert LedgerConfig().max_blocks == 1024 and LedgerConfig().stake_yield_bps == 1_000
    with pytest.raises(LedgerError, match="max_blocks"):
        LedgerConfig(max_blocks=0)
    with pytest.raises(LedgerError, match="max_blocks"):
        LedgerConfig(max_blocks=2**32)
    with pytest.raises(LedgerError, match="stake_yield_bps"):
        LedgerConfig(stake_yield_bps=10_001)


def test_slashing_config_defaults_for_older_genesis_and_is_checked():
    old = {"dispute_window_s": 1.0, "reward_per_block_hour": 0, "min_stake": 0,
           "max_reward_period_s": 60}
    assert LedgerConfig.from_dict(old).accuser_bond == LedgerConfig().accuser_bond
    with pytest.raises(LedgerError, match="slash_bps"):
        LedgerConfig(slash_bps=10_001)
    with pytest.raises(LedgerError, match="accuser_bond"):
        LedgerConfig(accuser_bond=-1)

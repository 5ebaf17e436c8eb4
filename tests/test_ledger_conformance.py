"""One set of scenarios, two backends: the SQLite ledger and the contract on an in-process EVM.

Every scenario runs against ``sqlite`` (a file, its clock moved by the test) and ``evm``
(``LayerchainLedger`` deployed by ``EvmLedger.deploy`` on eth-tester + py-evm, its clock
moved by eth-tester's time travel), with the same calls and the same expected balances,
refusals and error types, and ends with ``verify()`` ok. What differs by nature (where
credits come from, reward pools, gas) is set up by the fixture, not asserted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import pytest

import layerchain.ledger.sqlite as sqlite_backend
from layerchain.errors import ChannelError, InsufficientFunds, InvalidVoucher, LedgerError
from layerchain.ledger import Ledger, LedgerConfig, Voucher, open_ledger, sign_voucher
from layerchain.ledger.base import CLOSED, CLOSING, OPEN, YEAR_S
from layerchain.ledger.records import ledger_domain
from layerchain.market.wallet import Wallet
from ledgers import KEYS, verdict_on

CONFIG = LedgerConfig(
    dispute_window_s=100,
    reward_per_block_hour=3600 * 1000,  # so large that the reward is what clients paid
    min_stake=50,
    max_blocks=64,
    stake_yield_bps=1_000,  # 10 % of the stake a year
    accuser_bond=100,
    slash_bps=10_000,
    slash_reward_bps=5_000,
)


@dataclass
class Harness:
    """A ledger and what differs between backends: its clock and the reward pool."""

    ledger: Ledger
    advance: Callable[[float], None]  # move the ledger's clock forward (seconds)
    wallets: list[Wallet]  # [referee, alice, bob, carol, node, dave, erin]

    @property
    def domain(self) -> bytes:
        return self.ledger.domain_separator


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _sqlite(tmp_path, monkeypatch) -> Harness:
    clock = Clock()
    monkeypatch.setattr(sqlite_backend, "wall_clock", clock)
    ledger = open_ledger(tmp_path / "ledger.sqlite", CONFIG)

    def advance(seconds: float) -> None:
        clock.now += seconds

    return Harness(ledger, advance, [Wallet(k) for k in KEYS])


def _evm() -> Harness:
    from eth_tester import EthereumTester, PyEVMBackend
    from web3 import EthereumTesterProvider, Web3

    from layerchain.ledger.evm import EvmLedger

    tester = EthereumTester(PyEVMBackend())
    w3 = Web3(EthereumTesterProvider(tester))
    wallets = [Wallet(k) for k in KEYS]
    referee = wallets[0]
    contract = EvmLedger.deploy(w3, KEYS[0], CONFIG, unstake_delay_s=3600,
                                referees=[referee.address], quorum=1)
    ledger = EvmLedger.from_web3(w3, contract, sender=wallets[-1], referees=[referee])
    ledger.fund_rewards(referee, 1_000_000)  # the contract pays rewards from a funded pool

    def advance(seconds: float) -> None:
        if seconds > 0:  # from the pending block's time: eth-tester never travels backwards
            tester.time_travel(int(tester.get_block_by_number("pending")["timestamp"] + seconds))

    return Harness(ledger, advance, wallets)


@pytest.fixture(params=["sqlite", "evm"])
def h(request, tmp_path, monkeypatch):
    harness = _sqlite(tmp_path, monkeypatch) if request.param == "sqlite" else _evm()
    yield harness
    harness.ledger.close()


def _ok(h: Harness) -> None:
    report = h.ledger.verify()
    assert report.ok, report.problems


def test_backend_names_and_domain(h):
    assert h.ledger.backend in ("sqlite", "evm")
    assert len(h.domain) == 32
    if h.ledger.backend == "sqlite":
        assert h.domain == ledger_domain(h.ledger.ledger_id) and h.ledger.gas_used == {}


def test_deposit_withdraw_and_insufficient_funds(h):
    _, alice, bob, *_ = h.wallets
    assert h.ledger.deposit(alice, 1000) == 1000
    assert h.ledger.deposit(alice, 500) == 1500
    assert h.ledger.withdraw(alice, 400) == 1100
    with pytest.raises(InsufficientFunds):
        h.ledger.withdraw(alice, 1101)
    with pytest.raises(InsufficientFunds):
        h.ledger.withdraw(bob, 1)
    with pytest.raises(LedgerError):
        h.ledger.deposit(alice, 0)
    assert h.ledger.balance(alice.address) == 1100 and h.ledger.balance(bob.address) == 0
    assert h.ledger.account(alice.address).balance == 1100
    assert [a.address for a in h.ledger.accounts()] == [alice.address]
    _ok(h)


def test_channel_open_top_up_redeem_stale_and_replayed(h):
    _, alice, bob, *_ = h.wallets
    h.ledger.deposit(alice, 1000)
    cid = h.ledger.open_channel(alice, bob.address, 400)
    assert h.ledger.balance(alice.address) == 600
    with pytest.raises(InsufficientFunds):
        h.ledger.open_channel(alice, bob.address, 601)
    with pytest.raises(ChannelError):
        h.ledger.open_channel(alice, alice.address, 10)
    assert h.ledger.top_up(alice, cid, 100) == 500
    v1 = sign_voucher(alice, Voucher(cid, 1, 100), h.domain)
    v2 = sign_voucher(alice, Voucher(cid, 2, 250), h.domain)
    assert h.ledger.redeem(v1) == 100
    assert h.ledger.redeem(v2) == 150
    assert h.ledger.redeem(v2) == 0  # replayed
    assert h.ledger.redeem(v1) == 0  # older
    assert h.ledger.redeem(sign_voucher(alice, Voucher(cid, 2, 400), h.domain)) == 0  # nonce reuse
    assert h.ledger.redeem(sign_voucher(alice, Voucher(cid, 3, 250), h.domain)) == 0  # nothing new
    with pytest.raises(InvalidVoucher):  # above the deposit
        h.ledger.redeem(sign_voucher(alice, Voucher(cid, 4, 501), h.domain))
    channel = h.ledger.channel(cid)
    assert (channel.deposit, channel.redeemed, channel.nonce, channel.state) == (500, 250, 2, OPEN)
    assert h.ledger.balance(bob.address) == 250
    assert [c.channel_id for c in h.ledger.channels(payer=alice.address)] == [cid]
    assert [c.channel_id for c in h.ledger.channels(payee=bob.address)] == [cid]
    assert h.ledger.channels(payer=bob.address) == []
    with pytest.raises(ChannelError):
        h.ledger.channel("0x" + "00" * 32)
    _ok(h)


def test_wrong_signer_and_another_ledgers_voucher_are_refused(h):
    _, alice, bob, carol, *_ = h.wallets
    h.ledger.deposit(alice, 1000)
    cid = h.ledger.open_channel(alice, bob.address, 400)
    with pytest.raises(InvalidVoucher, match="not signed by"):
        h.ledger.redeem(sign_voucher(carol, Voucher(cid, 1, 10), h.domain))
    with pytest.raises(InvalidVoucher, match="another ledger's domain"):  # same payer, other ledger
        h.ledger.redeem(sign_voucher(alice, Voucher(cid, 1, 10), ledger_domain("0x" + "ee" * 32)))
    with pytest.raises(ChannelError):
        h.ledger.close_channel(bob, cid)  # only the payer closes
    assert h.ledger.channel(cid).redeemed == 0 and h.ledger.balance(bob.address) == 0
    _ok(h)


def test_redeem_many_is_one_step(h):
    _, alice, bob, carol, *_ = h.wallets
    h.ledger.deposit(alice, 1000)
    to_bob = h.ledger.open_channel(alice, bob.address, 300)
    to_carol = h.ledger.open_channel(alice, carol.address, 300)
    first = [sign_voucher(alice, Voucher(to_bob, 1, 50), h.domain),
             sign_voucher(alice, Voucher(to_carol, 1, 70), h.domain),
             sign_voucher(alice, Voucher(to_bob, 2, 80), h.domain),  # same channel, later
             sign_voucher(alice, Voucher(to_bob, 1, 50), h.domain)]  # stale within the batch
    assert h.ledger.redeem_many(first) == [50, 70, 30, 0]
    assert h.ledger.redeem_many(first) == [0, 0, 0, 0]
    assert h.ledger.redeem_many([]) == []
    bad = [sign_voucher(alice, Voucher(to_carol, 2, 100), h.domain),
           sign_voucher(carol, Voucher(to_bob, 3, 90), h.domain)]  # not the payer's
    with pytest.raises(InvalidVoucher):
        h.ledger.redeem_many(bad)
    assert h.ledger.channel(to_carol).redeemed == 70  # nothing of the refused batch landed
    assert (h.ledger.balance(bob.address), h.ledger.balance(carol.address)) == (80, 70)
    _ok(h)


def test_a_node_redeems_its_stored_vouchers_in_one_batch(h):
    """``redeem_stored`` (what a node runs): one ``redeem_many``; a refused voucher makes it
    fall back to one by one, so the others are still credited and the refusal is named."""
    from layerchain.market.vouchers import redeem_stored

    _, alice, bob, carol, *_ = h.wallets
    h.ledger.deposit(alice, 1000)
    h.ledger.deposit(carol, 1000)
    good = h.ledger.open_channel(alice, bob.address, 300)
    other = h.ledger.open_channel(carol, bob.address, 300)
    stored = [sign_voucher(alice, Voucher(good, 1, 120), h.domain),
              sign_voucher(alice, Voucher(other, 1, 50), h.domain)]  # not carol's signature
    results = redeem_stored(h.ledger, stored)
    assert [(r.credited, r.error is None) for r in results] == [(120, True), (0, False)]
    assert "not signed by" in (results[1].error or "")
    assert [r.credited for r in redeem_stored(h.ledger, stored[:1])] == [0]
    assert h.ledger.balance(bob.address) == 120
    _ok(h)


def test_close_waits_for_the_dispute_window(h):
    _, alice, bob, *_ = h.wallets
    h.ledger.deposit(alice, 1000)
    cid = h.ledger.open_channel(alice, bob.address, 400)
    h.ledger.redeem(sign_voucher(alice, Voucher(cid, 1, 100), h.domain))
    assert h.ledger.close_channel(alice, cid) == 0  # the window starts
    channel = h.ledger.channel(cid)
    assert channel.state == CLOSING and channel.closes_at is not None
    with pytest.raises(ChannelError):
        h.ledger.close_channel(alice, cid)  # still in the window
    with pytest.raises(ChannelError):
        h.ledger.top_up(alice, cid, 10)
    assert h.ledger.redeem(sign_voucher(alice, Voucher(cid, 2, 150), h.domain)) == 50  # in the window
    h.advance(CONFIG.dispute_window_s + 1)
    assert h.ledger.close_channel(alice, cid) == 250
    closed = h.ledger.channel(cid)
    assert (closed.state, closed.refunded, closed.redeemed) == (CLOSED, 250, 150)
    assert h.ledger.balance(alice.address) == 600 + 250
    with pytest.raises(ChannelError):
        h.ledger.redeem(sign_voucher(alice, Voucher(cid, 3, 200), h.domain))
    with pytest.raises(ChannelError):
        h.ledger.close_channel(alice, cid)
    _ok(h)


def test_register_and_earn_an_uptime_reward(h):
    _, alice, _, _, node, *_ = h.wallets
    h.ledger.deposit(node, 500_000)
    with pytest.raises(LedgerError):
        h.ledger.register_node(node, 0, 4)  # a first registration stakes
    with pytest.raises(LedgerError):
        h.ledger.register_node(node, 49, 4)  # under min_stake
    with pytest.raises(LedgerError):
        h.ledger.node(node.address)
    # 400,000 staked at 10 % a year: 109 credits a day, above what the client pays here
    info = h.ledger.register_node(node, 400_000, 4)
    assert (info.stake, info.blocks, h.ledger.balance(node.address)) == (400_000, 4, 100_000)
    assert h.ledger.account(node.address).staked == 400_000
    with pytest.raises(LedgerError):
        h.ledger.claim_reward(node)  # no client paid it yet
    h.ledger.deposit(alice, 1000)
    cid = h.ledger.open_channel(alice, node.address, 500)
    h.advance(CONFIG.max_reward_period_s)
    assert h.ledger.redeem(sign_voucher(alice, Voucher(cid, 1, 90), h.domain)) == 90
    assert h.ledger.node(node.address).earned == 90
    assert h.ledger.claim_reward(node) == 90  # bounded by what clients paid
    after = h.ledger.node(node.address)
    assert (after.earned, after.rewards, h.ledger.balance(node.address)) == (0, 90, 100_000 + 90 + 90)
    with pytest.raises(LedgerError):
        h.ledger.claim_reward(node)
    assert h.ledger.register_node(node, 10, 4).stake == 400_010
    _ok(h)


def test_self_dealing_cannot_drain_the_rewards(h):
    """E1's attack: a node registers 2^32-1 blocks, its owner's sock puppet pays it 500,000
    credits (free: they come back to the same owner), the node claims. The old rule,
    min(rate x blocks x hours, earned), paid all 500,000 (out of the contract's pool). Now
    blocks above ``max_blocks`` are refused and a claim pays at most the stake's yield."""
    _, _, _, _, node, puppet, _ = h.wallets
    stake = 1_000_000
    h.ledger.deposit(node, stake)
    for blocks in (2**32 - 1, CONFIG.max_blocks + 1):
        with pytest.raises(LedgerError, match="max_?[bB]locks"):
            h.ledger.register_node(node, stake, blocks)
    h.ledger.register_node(node, stake, CONFIG.max_blocks)
    h.ledger.deposit(puppet, 500_000)
    cid = h.ledger.open_channel(puppet, node.address, 500_000)
    h.advance(3600)
    assert h.ledger.redeem(sign_voucher(puppet, Voucher(cid, 1, 500_000), h.domain)) == 500_000
    info = h.ledger.node(node.address)
    seconds = int(info.served_at - info.rewarded_until)
    old_rule = min(CONFIG.reward_per_block_hour * CONFIG.max_blocks * seconds // 3600, info.earned)
    assert old_rule == 500_000
    assert CONFIG.stake_yield_bps is not None
    cap = stake * CONFIG.stake_yield_bps * seconds // (10_000 * YEAR_S)
    assert h.ledger.claim_reward(node) == cap  # 11 credits: a 10 % yearly yield for an hour
    assert 0 < cap < 20
    # the owner (node and puppet) is up by the stake's yield and nothing else
    assert h.ledger.balance(node.address) + h.ledger.balance(puppet.address) == 500_000 + cap
    assert h.ledger.node(node.address).rewards == cap
    _ok(h)


def test_stake_added_before_a_claim_earns_from_then_on(h):
    """The sequel: stake 1,000 for a day of self-paid uptime, add 10^7 borrowed credits just
    before claiming, claim a day's yield on 10^7, unstake. Added stake restarts the period
    (as new blocks do), so the borrowed credits earn only for the time they are staked."""
    _, _, _, _, node, puppet, _ = h.wallets
    h.ledger.deposit(node, 10_000_000)
    h.ledger.register_node(node, 1_000, CONFIG.max_blocks)
    h.ledger.deposit(puppet, 1_000)
    cid = h.ledger.open_channel(puppet, node.address, 1_000)
    h.advance(CONFIG.max_reward_period_s)
    h.ledger.redeem(sign_voucher(puppet, Voucher(cid, 1, 500), h.domain))
    assert h.ledger.node(node.address).earned == 500
    restarted = h.ledger.register_node(node, 9_999_000, CONFIG.max_blocks)
    assert (restarted.stake, restarted.earned) == (10_000_000, 0)
    assert restarted.rewarded_until >= restarted.served_at  # the day is forfeited
    with pytest.raises(LedgerError, match="no reward due"):
        h.ledger.claim_reward(node)
    h.advance(60)
    h.ledger.redeem(sign_voucher(puppet, Voucher(cid, 2, 1_000), h.domain))
    info = h.ledger.node(node.address)
    seconds = int(info.served_at - info.rewarded_until)
    assert CONFIG.stake_yield_bps is not None and seconds < 120
    cap = 10_000_000 * CONFIG.stake_yield_bps * seconds // (10_000 * YEAR_S)
    assert h.ledger.claim_reward(node) == cap  # 1 credit; without the restart: 1,000
    _ok(h)


def test_slash_guilty_once_and_not_guilty_costs_the_bond(h):
    _, alice, bob, _, node, *_ = h.wallets
    h.ledger.deposit(node, 200)
    h.ledger.register_node(node, 200, 4)
    h.ledger.deposit(alice, 150)
    with pytest.raises(InsufficientFunds):  # bob holds no bond
        h.ledger.slash(bob, verdict_on(bob, node, guilty=True))
    acquitted = h.ledger.slash(alice, verdict_on(alice, node, guilty=False, step=1))
    assert (acquitted.guilty, acquitted.bond, acquitted.slashed) == (False, 100, 0)
    assert (h.ledger.balance(alice.address), h.ledger.balance(node.address)) == (50, 100)
    h.ledger.deposit(alice, 100)
    verdict = verdict_on(alice, node, guilty=True)
    result = h.ledger.slash(alice, verdict)
    assert (result.guilty, result.slashed, result.reward, result.burned) == (True, 200, 100, 100)
    assert result.accused == node.address and result.seq == h.ledger.head()[0]
    assert h.ledger.node(node.address).stake == 0
    assert h.ledger.balance(alice.address) == 150 + 100
    with pytest.raises(LedgerError):  # a receipt convicts once
        h.ledger.slash(alice, verdict)
    with pytest.raises(LedgerError, match="receipt is"):  # pinned on someone else
        h.ledger.slash(alice, replace(verdict_on(alice, node, guilty=True, step=2), accused=bob.address))
    _ok(h)


def test_journal_is_a_hash_chain_anchored_by_checkpoints(h):
    from layerchain.ledger.journal import entry_hash

    referee, alice, bob, *_ = h.wallets
    h.ledger.deposit(alice, 100)
    checkpoint = h.ledger.checkpoint(alice)
    h.ledger.open_channel(alice, bob.address, 50)
    entries = h.ledger.journal()
    assert entries[0].kind == "genesis" and [e.seq for e in entries] == list(range(1, len(entries) + 1))
    for before, entry in zip(entries, entries[1:]):
        assert entry.prev_hash == before.hash
        assert entry_hash(entry.prev_hash, entry.seq, entry.kind, entry.payload) == entry.hash
    assert h.ledger.head() == (entries[-1].seq, entries[-1].hash)
    assert h.ledger.journal(after=1, limit=1) == entries[1:2]
    report = h.ledger.verify([checkpoint])
    assert report.ok and report.anchored_seq == len(entries) - 1
    assert report.anchor_signers == (alice.address,)


@pytest.mark.slow  # ~15-20 s: 45 transactions on py-evm
def test_random_operations_give_the_same_outcomes_on_both_backends(tmp_path, monkeypatch):
    """Differential: one seeded random sequence of deposits, withdrawals, channel opens,
    top-ups, redemptions (stale, replayed, over the deposit, by the wrong signer) and closes
    (by the payer or not, in the window or after) applied to both backends: every call has
    the same result or the same error type, and balances and channels agree throughout."""
    import random

    sqlite_h, evm_h = _sqlite(tmp_path, monkeypatch), _evm()
    wallets = sqlite_h.wallets[1:5]
    channels: list[tuple[str, str, Wallet]] = []  # (sqlite id, evm id, payer), oldest first
    signed: dict[int, int] = {}  # channel index -> highest voucher nonce signed so far
    rng = random.Random(15)

    def outcome(call: Callable[[], object]) -> object:
        try:
            return call()
        except (ChannelError, InsufficientFunds, InvalidVoucher, LedgerError) as error:
            return type(error).__name__

    def run(h: Harness, side: int, op: str, draw: dict) -> object:
        ledger, a, b, amount = h.ledger, draw["a"], draw["b"], draw["amount"]
        if op == "deposit":
            return outcome(lambda: ledger.deposit(a, amount))
        if op == "withdraw":
            return outcome(lambda: ledger.withdraw(a, amount))
        if op == "open":
            return outcome(lambda: ledger.open_channel(a, b.address, amount) != "")
        if op == "advance":
            h.advance(draw["seconds"])
            return None
        cid, payer = channels[draw["index"]][side], channels[draw["index"]][2]
        actor = a if draw["not_the_payer"] else payer
        if op == "top_up":
            return outcome(lambda: ledger.top_up(actor, cid, amount))
        if op == "close":
            return outcome(lambda: ledger.close_channel(actor, cid))
        voucher = Voucher(cid, draw["nonce"], draw["cumulative"])
        return outcome(lambda: ledger.redeem(sign_voucher(actor, voucher, h.domain)))

    for h in (sqlite_h, evm_h):
        for w in wallets:
            h.ledger.deposit(w, 1000)
    seen: set[object] = set()
    for step in range(45):
        op = rng.choice(["deposit", "withdraw", "open", "open", "top_up", "redeem", "redeem",
                         "redeem", "close", "advance"])
        if op in ("top_up", "redeem", "close") and not channels:
            op = "open"
        a, b = rng.sample(wallets, 2)
        index = rng.randrange(len(channels)) if channels else 0
        last = signed.get(index, 0)
        nonce = rng.choice([max(1, last - 1), last + 1, last + 1, last + 2])
        draw = {
            "a": a, "b": b, "amount": rng.choice([1, 50, 200, 700]), "index": index,
            "not_the_payer": rng.random() < 0.15, "nonce": nonce,
            "cumulative": rng.choice([10 * nonce, 100 * nonce, 900]),
            "seconds": rng.choice([0, 250]),  # 0, or past any dispute window
        }
        results = [run(sqlite_h, 0, op, draw), run(evm_h, 1, op, draw)]
        assert results[0] == results[1], (step, op, draw, results)
        seen.add(results[0] if isinstance(results[0], str) else op)
        if op == "open" and results[0] is True:
            channels.append((sqlite_h.ledger.channels(payer=a.address)[-1].channel_id,
                             evm_h.ledger.channels(payer=a.address)[-1].channel_id, a))
        if op == "redeem":
            signed[index] = max(last, nonce)
        if op in ("advance", "open") or isinstance(results[0], str):
            continue  # nothing moved
        for w in wallets:
            assert sqlite_h.ledger.balance(w.address) == evm_h.ledger.balance(w.address), (step, op)
        if op in ("top_up", "redeem", "close"):
            sqlite_id, evm_id, _ = channels[draw["index"]]
            mine, theirs = sqlite_h.ledger.channel(sqlite_id), evm_h.ledger.channel(evm_id)
            assert (mine.deposit, mine.redeemed, mine.nonce, mine.state, mine.refunded) == (
                theirs.deposit, theirs.redeemed, theirs.nonce, theirs.state, theirs.refunded)
    assert len(channels) >= 3 and {"redeem", "close", "top_up"} <= seen
    assert {"InsufficientFunds", "InvalidVoucher", "ChannelError"} <= seen  # refusals covered
    for h in (sqlite_h, evm_h):
        _ok(h)
        h.ledger.close()

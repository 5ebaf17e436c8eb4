"""What only the EVM backend has: reverts as typed errors, nonces under threads, gas, other
deployments' vouchers, referee-signed slashing, unstaking and payout addresses, and a
journal that catches a rewritten chain. In-process chain: eth-tester + py-evm."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from eth_abi import encode

from layerchain.errors import ChannelError, InsufficientFunds, InvalidVoucher, LedgerError
from layerchain.ledger import LedgerConfig, Voucher, sign_voucher
from layerchain.ledger.contract import load_artifact
from layerchain.ledger.evm import (
    REVERTS,
    Event,
    EvmLedger,
    _selectors,
    replay_events,
    revert_error,
    sign_verdict,
)
from layerchain.ledger.signatures import eip712_domain, keccak256
from layerchain.market.wallet import Wallet
from ledgers import KEYS, verdict_on

CONFIG = LedgerConfig(dispute_window_s=100, min_stake=10, accuser_bond=100)


class Chain:
    """One in-process chain with a deployment of the contract (more can be deployed)."""

    def __init__(self) -> None:
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import EthereumTesterProvider, Web3

        self.tester = EthereumTester(PyEVMBackend())
        self.w3 = Web3(EthereumTesterProvider(self.tester))
        self.wallets = [Wallet(k) for k in KEYS]
        self.referee = self.wallets[0]

    def deploy(self, **options) -> EvmLedger:
        contract = EvmLedger.deploy(self.w3, KEYS[0], CONFIG, unstake_delay_s=3600,
                                    referees=[self.referee.address], quorum=1)
        return EvmLedger.from_web3(self.w3, contract, **options)

    def advance(self, seconds: int) -> None:
        self.tester.time_travel(int(self.w3.eth.get_block("latest")["timestamp"]) + seconds)


@pytest.fixture
def chain() -> Chain:
    return Chain()


def test_every_custom_error_of_the_contract_maps_to_a_typed_error():
    errors = _selectors(load_artifact()["abi"])
    assert {name for name, _, _ in errors.values()} <= set(REVERTS)
    by_name = {name: selector for selector, (name, _, _) in errors.items()}
    error = revert_error(by_name["InsufficientFunds"] + encode(["uint256", "uint256"], [5, 9]),
                         errors, what="opening a channel", who="0xabc")
    assert isinstance(error, InsufficientFunds)
    assert str(error) == "0xabc has 5 credits; opening a channel needs 9"
    bad = revert_error(by_name["BadVoucher"] + encode(["string"], ["amount exceeds"]), errors,
                       what="x", who="y")
    assert isinstance(bad, InvalidVoucher) and "amount exceeds" in str(bad)
    state = revert_error(by_name["ChannelState"] + encode(["string"], ["closed"]), errors,
                         what="closing", who="y")
    assert isinstance(state, ChannelError) and str(state) == "closing: closed"
    unknown = revert_error(b"\x12\x34\x56\x78", errors, what="a call", who="y")
    assert type(unknown) is LedgerError and "0x12345678" in str(unknown)


def test_reverts_are_typed_and_cost_no_transaction(chain):
    ledger = chain.deploy(sender=chain.wallets[2])
    _, alice, bob, *_ = chain.wallets
    ledger.deposit(alice, 100)
    nonce = chain.w3.eth.get_transaction_count(alice.address)
    with pytest.raises(InsufficientFunds, match="has 100 credits; opening a channel needs 101"):
        ledger.open_channel(alice, bob.address, 101)
    with pytest.raises(LedgerError, match="withdraw a positive amount|amount must be"):
        ledger.withdraw(alice, 0)
    with pytest.raises(LedgerError, match="not a registered node with a stake"):
        ledger.claim_reward(alice)
    assert chain.w3.eth.get_transaction_count(alice.address) == nonce  # simulated, never sent
    poor = Wallet.generate()  # no ether at all
    with pytest.raises(InsufficientFunds, match="wei"):
        ledger.deposit(poor, 1)
    with pytest.raises(LedgerError, match="owner signs a transaction"):
        ledger.submit(b"\x00")
    with pytest.raises(LedgerError, match="no contract at"):
        EvmLedger.from_web3(chain.w3, "0x" + "11" * 20)


def test_redeeming_needs_a_sender_and_gas_is_tallied(chain):
    ledger = chain.deploy()
    _, alice, bob, carol, *_ = chain.wallets
    ledger.deposit(alice, 1000)
    cids = [ledger.open_channel(alice, payee.address, 100) for payee in (bob, carol, bob)]
    voucher = sign_voucher(alice, Voucher(cids[0], 1, 10), ledger.domain_separator)
    with pytest.raises(LedgerError, match="sender"):
        ledger.redeem(voucher)
    ledger.set_sender(bob)
    assert ledger.redeem(voucher) == 10
    batch = [sign_voucher(alice, Voucher(cid, 2, 20), ledger.domain_separator) for cid in cids]
    assert ledger.redeem_many(batch) == [10, 20, 20]
    assert ledger.balance(bob.address) == 40 and ledger.balance(carol.address) == 20
    gas = ledger.gas_used
    assert sorted(gas) == ["deposit", "open_channel", "redeem", "redeem_many"]
    assert len(gas["open_channel"]) == 3 and all(g > 21_000 for g in gas["open_channel"])
    assert gas["redeem_many"][0] < 3 * gas["redeem"][0]  # one transaction's overhead for three
    assert ledger.gas_price() > 0 and ledger.credit_wei == 10**9


def test_eight_threads_redeeming_for_one_payee_credit_each_voucher_once(chain):
    """One node (one sender address, one nonce sequence) redeems from 8 threads at once:
    every transaction gets its own nonce, every voucher is credited exactly once."""
    _, alice, bob, *_ = chain.wallets
    ledger = chain.deploy(sender=bob)
    ledger.deposit(alice, 8000)
    cids = [ledger.open_channel(alice, bob.address, 1000) for _ in range(8)]
    vouchers = [[sign_voucher(alice, Voucher(cid, n, 100 * n), ledger.domain_separator)
                 for n in (1, 2)] for cid in cids]
    credited: list[int] = []
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def redeem(mine: list[bytes]) -> None:
        start.wait()
        try:
            for data in mine + mine:  # each voucher twice: the second credits 0
                credited.append(ledger.redeem(data))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(error)

    threads = [threading.Thread(target=redeem, args=(v,)) for v in vouchers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    assert sorted(credited) == [0] * 16 + [100] * 16
    assert ledger.balance(bob.address) == 8 * 200
    assert all(ledger.channel(cid).nonce == 2 for cid in cids)
    assert ledger.verify().ok


def test_a_voucher_of_another_deployment_is_refused(chain):
    _, alice, bob, *_ = chain.wallets
    first, second = chain.deploy(sender=bob), chain.deploy(sender=bob)
    assert first.domain_separator != second.domain_separator
    assert second.domain_separator == eip712_domain(chain_id=second.chain_id, contract=second.address)
    for ledger in (first, second):
        ledger.deposit(alice, 500)
    on_first = first.open_channel(alice, bob.address, 100)
    on_second = second.open_channel(alice, bob.address, 100)
    with pytest.raises(ChannelError, match="unknown channel"):
        second.redeem(sign_voucher(alice, Voucher(on_first, 1, 50), first.domain_separator))
    # the payer's genuine signature, on the second deployment's channel, made for the first
    with pytest.raises(InvalidVoucher, match="another ledger's domain"):
        second.redeem(sign_voucher(alice, Voucher(on_second, 1, 50), first.domain_separator))
    assert second.redeem(sign_voucher(alice, Voucher(on_second, 1, 50), second.domain_separator)) == 50
    assert first.balance(bob.address) == 0 and second.balance(bob.address) == 50


def test_forged_verdicts_revert_and_referees_sign_elsewhere(chain):
    referee, alice, _, _, node, *_ = chain.wallets
    ledger = chain.deploy(sender=alice)  # holds no referee key
    ledger.deposit(node, 100)
    ledger.register_node(node, 100, 2)
    ledger.deposit(alice, 300)
    verdict = verdict_on(alice, node, guilty=True)
    with pytest.raises(LedgerError, match="referee signature"):
        ledger.slash(alice, verdict)
    impostor = Wallet.generate()
    forged = sign_verdict(impostor, verdict, alice.address, ledger.domain_separator)
    with pytest.raises(LedgerError, match="not a referee's"):
        ledger.slash_with_verdicts(alice, verdict, [forged])
    # a referee's signature on the verdict for another accuser does not transfer
    other = sign_verdict(referee, verdict, referee.address, ledger.domain_separator)
    with pytest.raises(LedgerError, match="not a referee's"):
        ledger.slash_with_verdicts(alice, verdict, [other])
    assert ledger.node(node.address).stake == 100 and ledger.balance(alice.address) == 300
    genuine = sign_verdict(referee, verdict, alice.address, ledger.domain_separator)
    result = ledger.slash_with_verdicts(alice, verdict, [genuine])
    assert (result.slashed, result.reward, ledger.node(node.address).stake) == (100, 50, 0)
    assert ledger.convicted("0x" + keccak256(_canonical(verdict)).hex())
    assert ledger.verify().ok


def _canonical(verdict) -> bytes:
    from layerchain.market.receipts import SignedReceipt

    return SignedReceipt.from_bytes(verdict.receipt).receipt.canonical_bytes()


def test_unstaking_waits_and_stays_slashable_payout_takes_the_earnings(chain):
    referee, alice, owner, _, node, *_ = chain.wallets
    ledger = chain.deploy(sender=node, referees=[referee])
    ledger.deposit(node, 100)
    ledger.register_node(node, 100, 2)
    ledger.set_payout(node, owner.address)
    assert ledger.payout(node.address) == owner.address
    ledger.deposit(alice, 500)
    cid = ledger.open_channel(alice, node.address, 200)
    assert ledger.redeem(sign_voucher(alice, Voucher(cid, 1, 30), ledger.domain_separator)) == 30
    assert (ledger.balance(owner.address), ledger.balance(node.address)) == (30, 0)
    with pytest.raises(LedgerError, match="minimum"):
        ledger.request_unstake(node, 95)  # would leave 5, under min_stake 10
    unstake_at = ledger.request_unstake(node, 40)
    assert ledger.unstaking(node.address) == (40, unstake_at) and ledger.node(node.address).stake == 60
    with pytest.raises(LedgerError, match="not over"):
        ledger.complete_unstake(node)
    result = ledger.slash(alice, verdict_on(alice, node, guilty=True))
    assert result.slashed == 100  # the stake and what is unstaking
    chain.advance(3601)
    with pytest.raises(LedgerError, match="nothing is unstaking"):
        ledger.complete_unstake(node)
    assert ledger.verify().ok


def test_verify_catches_a_rewritten_chain_and_bad_events(chain):
    _, alice, bob, *_ = chain.wallets
    ledger = chain.deploy(sender=bob)
    ledger.deposit(alice, 100)
    snapshot = chain.tester.take_snapshot()
    ledger.open_channel(alice, bob.address, 60)
    checkpoint = ledger.checkpoint(alice)
    assert ledger.verify([checkpoint]).ok
    chain.tester.revert_to_snapshot(snapshot)  # history rewritten after alice's checkpoint
    ledger.withdraw(alice, 100)
    problems = ledger.verify([checkpoint]).problems
    assert problems and any("checkpoint" in p or "entry" in p for p in problems), problems
    # the replay's own checks, on events the contract could not have emitted
    a = "0x" + "aa" * 20
    events = [Event("Deposited", {"account": a, "credits": 5}, 1, 0, "0x", 1),
              Event("Withdrawn", {"account": a, "credits": 9}, 2, 0, "0x", 2)]
    assert any("spends 9 credits holding 5" in p for p in replay_events(events, CONFIG).problems)


def test_the_replay_checks_each_reward_against_the_rules():
    """A ``RewardPaid`` the rules do not give (the sock-puppet drain: a whole self-payment
    paid back on a small stake) is a problem of ``verify``; the one they give is not."""
    config = LedgerConfig(reward_per_block_hour=1_000, stake_yield_bps=1_000)
    node, payer, cid = "0x" + "aa" * 20, "0x" + "bb" * 20, "0x" + "cc" * 32

    def events(stake: int, amount: int) -> list[Event]:
        return [Event("RewardsFunded", {"credits": 10_000}, 1, 0, "0x", 100),
                Event("Deposited", {"account": node, "credits": stake}, 1, 1, "0x", 100),
                Event("NodeRegistered", {"node": node, "stake": stake, "blocks": 4}, 1, 2, "0x", 100),
                Event("Deposited", {"account": payer, "credits": 500}, 1, 3, "0x", 100),
                Event("ChannelOpened", {"id": cid, "payer": payer, "payee": node, "deposit": 500},
                      1, 4, "0x", 100),
                Event("Redeemed", {"id": cid, "payee": node, "nonce": 1, "cumulativeAmount": 500,
                                   "credited": 500}, 2, 0, "0x", 3_700),
                Event("RewardPaid", {"node": node, "amount": amount, "period": 3_600}, 3, 0, "0x", 3_800)]

    # 10^9 staked for an hour at 10 % a year: 11,415 credits, above the 500 paid: 500 is due
    assert replay_events(events(10**9, 500), config).problems == []
    drained = replay_events(events(1_000, 500), config).problems  # 1,000 staked: 0 is due
    assert any("pays 500 for 3600 s, the rules give 0" in p for p in drained), drained


def test_the_ledger_package_exports_evmledger_without_importing_the_evm_side():
    """``from layerchain.ledger import EvmLedger`` works; ``import layerchain.ledger`` alone
    (every SQLite user, the CLI) loads neither evm.py nor web3."""
    probe = ("import sys\nimport layerchain.ledger as ledger\n"
             "assert 'layerchain.ledger.evm' not in sys.modules and 'web3' not in sys.modules\n"
             "from layerchain.ledger.evm import EvmLedger\n"
             "assert ledger.EvmLedger is EvmLedger\n")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)
    import layerchain.ledger as package

    with pytest.raises(AttributeError, match="NoSuchLedger"):
        getattr(package, "NoSuchLedger")

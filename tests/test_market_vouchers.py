"""Payment channels: the client's ChannelPayer, the node's VoucherBook and VoucherStore."""

from __future__ import annotations

import msgpack
import pytest

from layerchain.errors import ChannelError, InsufficientFunds, InvalidVoucher
from layerchain.ledger import LedgerConfig, open_ledger
from layerchain.ledger.base import Channel
from layerchain.ledger.records import ledger_domain
from layerchain.ledger.signatures import eip712_domain
from layerchain.market.vouchers import (
    ChannelPayer,
    Voucher,
    VoucherBook,
    VoucherStore,
    decode_voucher,
    redeem_stored,
    sign_voucher,
    verify_voucher,
)
from layerchain.market.wallet import Wallet

CHANNEL_ID = "0x" + "ab" * 32
DOMAIN = ledger_domain("0x" + "cd" * 32)  # the EIP-712 domain of one embedded ledger


@pytest.fixture(scope="module")
def client() -> Wallet:
    return Wallet.generate()


@pytest.fixture(scope="module")
def node() -> Wallet:
    return Wallet.generate()


@pytest.fixture
def channel(client, node) -> Channel:
    return Channel(CHANNEL_ID, client.address, node.address, deposit=1000)


def test_verify_voucher_accepts_a_new_voucher_over_literals(client, channel):
    data = sign_voucher(client, Voucher(CHANNEL_ID, 1, 300), DOMAIN)
    assert verify_voucher(data, channel, DOMAIN) == Voucher(CHANNEL_ID, 1, 300)
    assert decode_voucher(data)[0] == Voucher(CHANNEL_ID, 1, 300)


def test_voucher_replay_and_nonce_reuse_are_rejected(client, channel):
    first = sign_voucher(client, Voucher(CHANNEL_ID, 5, 300), DOMAIN)
    with pytest.raises(InvalidVoucher, match="nonce 5 reused"):
        verify_voucher(first, channel, DOMAIN, last_nonce=5, last_amount=300)  # replay
    reuse = sign_voucher(client, Voucher(CHANNEL_ID, 5, 400), DOMAIN)  # same nonce, more money
    with pytest.raises(InvalidVoucher, match="nonce 5 reused"):
        verify_voucher(reuse, channel, DOMAIN, last_nonce=5, last_amount=300)
    lower = sign_voucher(client, Voucher(CHANNEL_ID, 6, 200), DOMAIN)
    with pytest.raises(InvalidVoucher, match="below"):
        verify_voucher(lower, channel, DOMAIN, last_nonce=5, last_amount=300)


def test_amount_above_the_deposit_wrong_signer_and_wrong_channel(client, node, channel):
    with pytest.raises(InvalidVoucher, match="exceeds the channel deposit"):
        verify_voucher(sign_voucher(client, Voucher(CHANNEL_ID, 1, 1001), DOMAIN), channel, DOMAIN)
    with pytest.raises(InvalidVoucher, match="not signed by its payer"):
        verify_voucher(sign_voucher(node, Voucher(CHANNEL_ID, 1, 10), DOMAIN), channel, DOMAIN)
    other = "0x" + "cd" * 32
    with pytest.raises(InvalidVoucher, match="is for channel"):
        verify_voucher(sign_voucher(client, Voucher(other, 1, 10), DOMAIN), channel, DOMAIN)
    closed = Channel(CHANNEL_ID, client.address, node.address, 1000, state="closed")
    with pytest.raises(ChannelError, match="closed"):
        verify_voucher(sign_voucher(client, Voucher(CHANNEL_ID, 1, 10), DOMAIN), closed, DOMAIN)


def test_tampered_or_malformed_voucher_bytes(client, channel):
    data = sign_voucher(client, Voucher(CHANNEL_ID, 1, 10), DOMAIN)
    fields = msgpack.unpackb(data)
    fields[3] = 999  # raise the amount, keep the signature
    with pytest.raises(InvalidVoucher, match="not signed by its payer"):
        verify_voucher(msgpack.packb(fields), channel, DOMAIN)
    for junk in (b"", b"\x01\x02", msgpack.packb([1, b"short", 1, 1, b""])):
        with pytest.raises(InvalidVoucher):
            verify_voucher(junk, channel, DOMAIN)
    with pytest.raises(InvalidVoucher):
        Voucher(CHANNEL_ID, -1, 0)
    with pytest.raises(InvalidVoucher):
        Voucher("0x12", 1, 0)


def test_payer_and_book_keep_pace_and_the_node_stops_when_behind(client, node, tmp_path):
    ledger = open_ledger(tmp_path / "ledger.sqlite")
    ledger.deposit(client, 10_000)
    payer = ChannelPayer(client, ledger, deposit=500)
    store = VoucherStore.for_data_dir(tmp_path / "node")
    book = VoucherBook(node.address, ledger.channel, domain=ledger.domain_separator, store=store)
    served = 0
    for cost in (120, 40, 40):  # prefill, then two decode steps
        served += cost
        book.accept(payer.voucher_for(node.address, cost), served)
    channel_id = payer.channel(node.address).channel_id
    assert payer.spent(node.address) == 200 and book.paid(channel_id) == 200
    # the client pays for less than the next step: the voucher is kept, the session refused
    behind = payer.voucher_for(node.address, 10)
    with pytest.raises(InsufficientFunds, match="not served further"):
        book.accept(behind, served + 40)
    # a replay of an accepted voucher is refused by the node
    with pytest.raises(InvalidVoucher, match="reused"):
        book.accept(behind, served)
    # the client cannot promise more than the deposit
    with pytest.raises(InsufficientFunds, match="holds 500"):
        payer.voucher_for(node.address, 400)
    # the store holds the latest voucher; redeeming it credits exactly what was promised
    assert len(store.latest()) == 1
    results = redeem_stored(ledger, store.latest())
    assert [r.credited for r in results] == [210]
    assert redeem_stored(ledger, store.latest())[0].credited == 0  # double redemption
    assert ledger.balance(node.address) == 210
    assert ledger.balance(client.address) == 10_000 - 500
    assert ledger.verify().ok
    ledger.close()


def test_book_refuses_channels_paying_someone_else(client, node):
    other = Wallet.generate()
    ch = Channel(CHANNEL_ID, client.address, other.address, 1000)
    book = VoucherBook(node.address, lambda _id: ch, domain=DOMAIN)
    with pytest.raises(InvalidVoucher, match="not this node"):
        book.accept(sign_voucher(client, Voucher(CHANNEL_ID, 1, 10), DOMAIN), 10)


def test_book_allows_a_bounded_unpaid_amount(client, node, channel):
    book = VoucherBook(node.address, lambda _id: channel, domain=DOMAIN, max_unpaid=50)
    book.accept(sign_voucher(client, Voucher(CHANNEL_ID, 1, 100), DOMAIN), 150)
    with pytest.raises(InsufficientFunds):
        book.require_paid(CHANNEL_ID, 151)


def test_store_keeps_only_the_highest_nonce(client, tmp_path):
    store = VoucherStore(tmp_path / "v")
    assert store.latest() == []
    v2 = sign_voucher(client, Voucher(CHANNEL_ID, 2, 20), DOMAIN)
    assert store.save(v2)
    assert not store.save(sign_voucher(client, Voucher(CHANNEL_ID, 1, 10), DOMAIN))
    assert store.latest() == [v2]
    assert store.save(sign_voucher(client, Voucher(CHANNEL_ID, 3, 30), DOMAIN))
    assert decode_voucher(store.latest()[0])[0].nonce == 3


def test_payer_without_channel_or_ledger(client, node):
    payer = ChannelPayer(client, domain=DOMAIN)
    with pytest.raises(ChannelError, match="no payment channel"):
        payer.voucher_for(node.address, 1)
    with pytest.raises(ChannelError, match="not paid by this wallet"):
        payer.attach(node.address, Channel(CHANNEL_ID, node.address, client.address, 10))
    payer.attach(node.address, Channel(CHANNEL_ID, client.address, node.address, 10))
    data = payer.voucher_for(node.address.lower(), 4)
    assert decode_voucher(data)[0] == Voucher(CHANNEL_ID, 1, 4)
    with pytest.raises(InvalidVoucher):
        payer.voucher_for(node.address, -1)


def test_ledger_config_window_keeps_channel_usable_until_closed(client, node, tmp_path):
    ledger = open_ledger(tmp_path / "l.sqlite", LedgerConfig(dispute_window_s=60))
    ledger.deposit(client, 100)
    payer = ChannelPayer(client, ledger, deposit=100)
    voucher = payer.voucher_for(node.address, 30)
    channel_id = payer.channel(node.address).channel_id
    assert payer.close(channel_id) == 0  # window starts, signed by the payer's wallet
    assert ledger.redeem(voucher) == 30  # the node can still redeem during the window
    ledger.close()


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_closed_channel_stops_paying(client, node, tmp_path):
    """Item 13: the client asks to close its channel (its refund is coming) and keeps
    sending vouchers on it. Within ``recheck_s`` the node re-reads the channel, refuses to
    serve on it and lists it for redemption; the redemption still lands in the window."""
    ledger = open_ledger(tmp_path / "l.sqlite", LedgerConfig(dispute_window_s=60))
    ledger.deposit(client, 1000)
    payer = ChannelPayer(client, ledger, deposit=500)
    ticks = Ticks()
    book = VoucherBook(node.address, ledger.channel, domain=ledger.domain_separator, recheck_s=1.0, clock=ticks)
    book.accept(payer.voucher_for(node.address, 100), 100)
    channel_id = payer.channel(node.address).channel_id
    payer.close(channel_id)
    ticks.now += 0.5  # a state at most recheck_s old is trusted
    book.accept(payer.voucher_for(node.address, 10), 110)
    ticks.now += 0.5
    with pytest.raises(ChannelError, match="closing: its payer asked for the refund"):
        book.accept(payer.voucher_for(node.address, 10), 120)
    assert book.closing == {channel_id}
    assert [r.credited for r in redeem_stored(ledger, book.latest())] == [110]
    assert ledger.channel(channel_id).redeemed == 110
    ledger.close()


def test_voucher_signature_is_eip712_as_a_contract_checks_it(client):
    """eth-account's own EIP-712 encoder (what a wallet and ``ecrecover`` on the contract's
    digest use) recovers the payer from our signature, for both kinds of domain."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    voucher = Voucher(CHANNEL_ID, 3, 77)
    assert len(voucher.canonical_bytes()) == 128  # abi.encode(typehash, bytes32, uint64, uint64)
    types = {"Voucher": [{"name": "channelId", "type": "bytes32"},
                         {"name": "nonce", "type": "uint64"},
                         {"name": "cumulativeAmount", "type": "uint64"}]}
    message = {"channelId": bytes.fromhex(CHANNEL_ID[2:]), "nonce": 3, "cumulativeAmount": 77}
    contract = "0x" + "12" * 20
    domains = [
        ({"name": "layerchain", "version": "1", "salt": bytes.fromhex("cd" * 32)}, DOMAIN),
        ({"name": "layerchain", "version": "1", "chainId": 31337, "verifyingContract": contract},
         eip712_domain(chain_id=31337, contract=contract)),
    ]
    for fields, separator in domains:
        _, signature = decode_voucher(sign_voucher(client, voucher, separator))
        typed = encode_typed_data(domain_data=fields, message_types=types, message_data=message)
        assert Account.recover_message(typed, signature=signature) == client.address


def test_a_voucher_signed_for_another_ledger_is_refused(client, node, channel, tmp_path):
    """Replay across ledgers: the same channel id, nonce and amount signed under ledger A's
    domain is worthless on ledger B (two SQLite files, and an EVM-style domain)."""
    other = ledger_domain("0x" + "ce" * 32)
    contract = eip712_domain(chain_id=1, contract="0x" + "12" * 20)
    for foreign in (other, contract):
        data = sign_voucher(client, Voucher(CHANNEL_ID, 1, 10), foreign)
        assert verify_voucher(data, channel, foreign).nonce == 1
        with pytest.raises(InvalidVoucher, match="another ledger's domain"):
            verify_voucher(data, channel, DOMAIN)
        with pytest.raises(InvalidVoucher, match="another ledger's domain"):
            VoucherBook(node.address, lambda _id: channel, domain=DOMAIN).accept(data, 10)
    a = open_ledger(tmp_path / "a.sqlite", LedgerConfig(dispute_window_s=0))
    b = open_ledger(tmp_path / "b.sqlite", LedgerConfig(dispute_window_s=0))
    assert a.domain_separator != b.domain_separator
    a.deposit(client, 100)
    cid = a.open_channel(client, node.address, 100)
    signed_for_b = sign_voucher(client, Voucher(cid, 1, 40), b.domain_separator)
    with pytest.raises(InvalidVoucher, match="another ledger's domain"):
        a.redeem(signed_for_b)
    assert a.redeem(sign_voucher(client, Voucher(cid, 1, 40), a.domain_separator)) == 40
    a.close()
    b.close()


def test_old_eip191_vouchers_are_refused(client, channel):
    """Wire version 1 (no domain: valid on every ledger) is no longer accepted live."""
    voucher = Voucher(CHANNEL_ID, 1, 10)
    legacy = msgpack.packb([1, bytes.fromhex(CHANNEL_ID[2:]), 1, 10,
                            client.sign_digest(voucher.legacy_digest())])
    with pytest.raises(InvalidVoucher, match="wire version 1"):
        verify_voucher(legacy, channel, DOMAIN)
    assert verify_voucher(legacy, channel, DOMAIN, legacy=True) == voucher  # journal replay only


def test_payer_keeps_a_checkpoint_of_each_change_it_makes(client, node, tmp_path):
    """A client is a ledger writer too: its channel openings and closings are anchored in
    its own directory, so dropping them from the journal is caught."""
    from layerchain.ledger import CheckpointStore

    ledger = open_ledger(tmp_path / "l.sqlite", LedgerConfig(dispute_window_s=60))
    ledger.deposit(client, 100)
    store = CheckpointStore.for_data_dir(tmp_path / "client")
    payer = ChannelPayer(client, ledger, deposit=100, checkpoints=store)
    channel = payer.open(node.address)
    payer.close(channel.channel_id)
    report = ledger.verify(store.load())
    assert len(store.load()) == 2 and report.ok
    assert (report.anchored_seq, report.anchor_signers) == (4, (client.address,))
    ledger.close()

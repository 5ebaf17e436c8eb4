"""Wallets on disk, and signatures that Ethereum tooling (hence a contract) accepts."""

from __future__ import annotations

import os
import stat

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from layerchain.errors import ConfigError
from layerchain.ledger.signatures import (
    BadSignature,
    checksum_address,
    keccak256,
    recover_address,
)
from layerchain.market.wallet import Wallet


def test_create_writes_owner_only_files(tmp_path):
    data_dir = tmp_path / "node"
    wallet = Wallet.create(data_dir)
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(wallet.path).st_mode) == 0o600
    assert wallet.path == data_dir / "wallet.json"
    assert Account.from_key(wallet.export_private_key()).address == wallet.address
    assert wallet.export_private_key().hex() not in repr(wallet)


def test_load_or_create_is_stable_and_create_refuses_to_overwrite(tmp_path):
    first = Wallet.load_or_create(tmp_path)
    assert Wallet.load_or_create(tmp_path).address == first.address
    assert Wallet.load(tmp_path).address == first.address
    with pytest.raises(ConfigError, match="already exists"):
        Wallet.create(tmp_path)


def test_load_refuses_a_key_readable_by_others(tmp_path):
    wallet = Wallet.create(tmp_path)
    os.chmod(wallet.path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        Wallet.load(tmp_path)


def test_missing_and_corrupt_wallets_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no wallet"):
        Wallet.load(tmp_path)
    path = Wallet.file(tmp_path)
    path.write_text("{not json")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="corrupt"):
        Wallet.load(tmp_path)


def test_signature_is_eip191_personal_sign_over_the_digest():
    wallet = Wallet.generate()
    digest = keccak256(b"some canonical bytes")
    signature = wallet.sign_digest(digest)
    assert len(signature) == 65 and signature[64] in (27, 28)
    # What eth-account (and OpenZeppelin's ECDSA on a contract) recovers:
    message = encode_defunct(primitive=digest)
    assert Account.recover_message(message, signature=signature) == wallet.address
    # eth-account's own signature over the same message is byte-identical (RFC 6979, low s).
    theirs = Account.sign_message(message, private_key=wallet.export_private_key()).signature
    assert bytes(theirs) == signature
    assert recover_address(digest, signature) == wallet.address


def test_bad_signatures_are_rejected():
    wallet = Wallet.generate()
    digest = keccak256(b"x")
    signature = wallet.sign_digest(digest)
    with pytest.raises(BadSignature):
        recover_address(digest, signature[:64])
    with pytest.raises(BadSignature):
        recover_address(digest, signature[:64] + b"\x05")
    # the malleable twin (n - s, flipped v) is refused: one signature, one encoding
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = int.from_bytes(signature[32:64], "big")
    twin = signature[:32] + (n - s).to_bytes(32, "big") + bytes([55 - signature[64]])
    with pytest.raises(BadSignature, match="lower half"):
        recover_address(digest, twin)
    assert recover_address(keccak256(b"y"), signature) != wallet.address


def test_checksum_address_matches_eip55():
    from eth_utils import to_checksum_address

    for i in range(50):
        raw = keccak256(bytes([i]))[:20]
        assert checksum_address(raw) == to_checksum_address(raw)


def test_raw_hash_signatures_and_transactions_are_ethereum_compatible():
    """``sign_hash`` signs an EIP-712 digest as is (no EIP-191 prefix), low-s, as
    eth-account's ``unsafe_sign_hash`` and Solidity's ``ecrecover`` see it; a transaction
    signed by the wallet recovers to its address."""
    from layerchain.errors import LedgerError
    from layerchain.ledger.signatures import recover_hash_address

    wallet = Wallet.generate()
    digest = keccak256(b"an EIP-712 digest")
    signature = wallet.sign_hash(digest)
    assert signature == bytes(Account.unsafe_sign_hash(digest, wallet.export_private_key()).signature)
    assert recover_hash_address(digest, signature) == wallet.address
    assert recover_address(digest, signature) != wallet.address  # not an EIP-191 signature
    assert int.from_bytes(signature[32:64], "big") <= 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
    with pytest.raises(BadSignature):
        recover_hash_address(digest[:31], signature)
    tx = {"to": "0x" + "11" * 20, "value": 5, "gas": 21_000, "nonce": 0, "chainId": 1,
          "maxFeePerGas": 2 * 10**9, "maxPriorityFeePerGas": 10**9}
    raw = wallet.sign_transaction(tx)
    assert Account.recover_transaction(raw) == wallet.address
    with pytest.raises(LedgerError, match="cannot sign the transaction"):
        wallet.sign_transaction({**tx, "value": -1})


def test_keccak256_is_ethereums_whatever_the_backend():
    # the fast backend (safe-pysha3, when installed) against eth-hash's, and a known value
    from eth_hash.auto import keccak

    for size in (0, 1, 31, 32, 33, 135, 136, 137, 284, 1000):
        data = os.urandom(size)
        assert keccak256(data) == keccak(data)
    assert keccak256(b"").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"

"""Receipts: valid chains pass; forged, altered, reordered and replayed receipts do not."""

from __future__ import annotations

import dataclasses
import time

import msgpack
import numpy as np
import pytest
import torch
from eth_account import Account
from eth_account.messages import encode_defunct

from layerchain.errors import InvalidReceipt
from layerchain.market.receipts import (
    ZERO_HASH,
    Receipt,
    ReceiptSigner,
    ReceiptVerifier,
    SignedReceipt,
    receipt_hash,
    sign_receipt,
    step_amount,
    tensor_sha256,
    verify_receipt,
)
from layerchain.market.wallet import Wallet
from layerchain.types import Span

SPAN = Span(4, 10)
PRICE = 7


@pytest.fixture(scope="module")
def node() -> Wallet:
    return Wallet.generate()


def _steps(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    first = (torch.randn(1, 5, 16, generator=gen), torch.randn(1, 5, 16, generator=gen))
    rest = [(torch.randn(1, 1, 16, generator=gen), torch.randn(1, 1, 16, generator=gen))
            for _ in range(n - 1)]
    return [first, *rest]


def _chain(node: Wallet, n: int = 4):
    signer = ReceiptSigner(node, "sess-1", "model-abc", SPAN, PRICE)
    steps = _steps(n)
    receipts = [signer.sign_step(i, x.shape[0] * x.shape[1], x, y)
                for i, (x, y) in enumerate(steps)]
    return steps, receipts


def _verifier(node: Wallet) -> ReceiptVerifier:
    return ReceiptVerifier(node.address, "sess-1", "model-abc", SPAN, PRICE)


def test_a_valid_chain_verifies_and_prices_each_step(node):
    steps, receipts = _chain(node)
    verifier = _verifier(node)
    amounts = [verifier.check(data, x, y).amount for (x, y), data in zip(steps, receipts)]
    # prefill of 5 tokens + 3 decode steps of 1 token, each over 6 blocks at price 7
    assert amounts == [5 * 6 * PRICE] + [6 * PRICE] * 3
    assert verifier.next_step == 4


def test_receipt_round_trips_and_is_contract_checkable(node):
    _, receipts = _chain(node, 2)
    signed = SignedReceipt.from_bytes(receipts[1])
    assert SignedReceipt.from_bytes(signed.to_bytes()) == signed
    assert signed.receipt.node_address == node.address
    assert len(signed.receipt.canonical_bytes()) == 284
    assert signed.receipt.prev_hash == receipt_hash(SignedReceipt.from_bytes(receipts[0]).receipt)
    # a contract recovers the signer from the receipt hash with ecrecover (EIP-191)
    message = encode_defunct(primitive=receipt_hash(signed.receipt))
    assert Account.recover_message(message, signature=signed.signature) == node.address


def test_receipt_from_another_key_is_forged(node):
    steps, receipts = _chain(node, 1)
    impostor = Wallet.generate()
    forged = ReceiptSigner(impostor, "sess-1", "model-abc", SPAN, PRICE).sign_step(
        0, 5, *steps[0]
    )
    with pytest.raises(InvalidReceipt, match="not from node"):
        _verifier(node).check(forged, *steps[0])
    # and a receipt claiming the node's address but signed by the impostor
    receipt = dataclasses.replace(SignedReceipt.from_bytes(receipts[0]).receipt)
    signed = SignedReceipt(receipt, impostor.sign_digest(receipt_hash(receipt)))
    with pytest.raises(InvalidReceipt, match="not from node"):
        _verifier(node).check(signed.to_bytes(), *steps[0])


@pytest.mark.parametrize(
    "field, value",
    [
        ("session_id", "sess-2"),
        ("step", 1),
        ("model_id", "model-xyz"),
        ("start", 3),
        ("end", 11),
        ("tokens", 4),
        ("input_sha256", b"\x01" * 32),
        ("output_sha256", b"\x02" * 32),
        ("price_per_block", PRICE - 1),
        ("amount", 1),
        ("prev_hash", b"\x03" * 32),
        ("fingerprint", b"topk"),
    ],
)
def test_any_flipped_field_breaks_the_signature(node, field, value):
    steps, receipts = _chain(node, 1)
    signed = SignedReceipt.from_bytes(receipts[0])
    altered = SignedReceipt(dataclasses.replace(signed.receipt, **{field: value}), signed.signature)
    with pytest.raises(InvalidReceipt, match="not from node"):
        _verifier(node).check(altered.to_bytes(), *steps[0])


def test_reordered_and_replayed_receipts_are_rejected(node):
    steps, receipts = _chain(node, 3)
    verifier = _verifier(node)
    with pytest.raises(InvalidReceipt, match="out of order"):
        verifier.check(receipts[1], *steps[1])  # step 1 before step 0
    verifier.check(receipts[0], *steps[0])
    with pytest.raises(InvalidReceipt, match="replayed"):
        verifier.check(receipts[0], *steps[0])  # step 0 again
    verifier.check(receipts[1], *steps[1])
    assert verifier.next_step == 2


def test_a_receipt_from_another_chain_breaks_continuity(node):
    steps, receipts = _chain(node, 2)
    other = ReceiptSigner(node, "sess-1", "model-abc", SPAN, PRICE)
    other.last_hash = b"\x09" * 32  # a fork of the same session
    fork = other.sign_step(1, 1, *steps[1])
    verifier = _verifier(node)
    verifier.check(receipts[0], *steps[0])
    with pytest.raises(InvalidReceipt, match="chain broken"):
        verifier.check(fork, *steps[1])


def test_hashes_of_what_was_actually_sent_and_received_are_checked(node):
    steps, receipts = _chain(node, 1)
    x, y = steps[0]
    tampered = y.clone()
    tampered[0, 0, 0] += 1e-3
    with pytest.raises(InvalidReceipt, match="output hash"):
        _verifier(node).check(receipts[0], x, tampered)
    with pytest.raises(InvalidReceipt, match="input hash"):
        _verifier(node).check(receipts[0], x * 2, y)


def test_honestly_signed_but_wrong_terms_are_rejected(node):
    x, y = _steps(1)[0]
    # the node signs a price above the agreed one
    pricier = ReceiptSigner(node, "sess-1", "model-abc", SPAN, PRICE + 1).sign_step(0, 5, x, y)
    with pytest.raises(InvalidReceipt, match="price"):
        _verifier(node).check(pricier, x, y)
    # the node over-counts tokens
    greedy = ReceiptSigner(node, "sess-1", "model-abc", SPAN, PRICE).sign_step(0, 50, x, y)
    with pytest.raises(InvalidReceipt, match="tokens"):
        _verifier(node).check(greedy, x, y)
    # an amount that is not tokens x blocks x price
    receipt = Receipt("sess-1", 0, "model-abc", 4, 10, 5, tensor_sha256(x), tensor_sha256(y),
                      PRICE, 999, ZERO_HASH, node.address)
    with pytest.raises(InvalidReceipt, match="amount"):
        _verifier(node).check(sign_receipt(node, receipt).to_bytes(), x, y)
    # another span
    wide = ReceiptSigner(node, "sess-1", "model-abc", Span(0, 10), PRICE).sign_step(0, 5, x, y)
    with pytest.raises(InvalidReceipt, match="covers blocks"):
        _verifier(node).check(wide, x, y)


def test_malformed_bytes_are_invalid_receipts(node):
    _, receipts = _chain(node, 1)
    for junk in (b"", b"\x00" * 10, receipts[0][:-5], msgpack.packb([2, "x"]),
                 msgpack.packb({"a": 1})):
        with pytest.raises(InvalidReceipt):
            SignedReceipt.from_bytes(junk)
    fields = msgpack.unpackb(receipts[0])
    fields[7] = b"short"
    with pytest.raises(InvalidReceipt, match="32 bytes"):
        SignedReceipt.from_bytes(msgpack.packb(fields))


def test_verify_receipt_is_pure_over_literals(node):
    receipt = Receipt("s", 0, "m", 0, 2, 3, b"\x11" * 32, b"\x22" * 32, 5,
                      step_amount(3, 2, 5), ZERO_HASH, node.address)
    data = sign_receipt(node, receipt).to_bytes()
    got = verify_receipt(
        data, expected_node_address=node.address.lower(), session_id="s", expected_step=0,
        input_sha256=b"\x11" * 32, output_sha256=b"\x22" * 32, prev_hash=ZERO_HASH,
        price_per_block=5,
    )
    assert got == receipt and got.amount == 30


def test_tensor_sha256_covers_bytes_dtype_and_shape():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_sha256(a) == tensor_sha256(a.clone())
    assert tensor_sha256(a) == tensor_sha256(a.numpy())  # torch and numpy agree
    assert tensor_sha256(a) == tensor_sha256(a.t().contiguous().t())  # layout-independent
    assert tensor_sha256(a) != tensor_sha256(a.reshape(4, 3))
    assert tensor_sha256(a) != tensor_sha256(a.view(torch.int32))
    assert tensor_sha256(a.to(torch.bfloat16)) != tensor_sha256(a.to(torch.float16))
    empty = np.zeros((0, 4), np.float32)
    assert tensor_sha256(empty) != tensor_sha256(empty.reshape(4, 0))
    digest = tensor_sha256(a)
    assert tensor_sha256(digest) == digest  # a digest passes through


def test_sign_and_verify_cost(node, capsys):
    """Per-step cost on the hot path (one decode step of one hop), printed for the report."""
    x, y = torch.randn(1, 1, 576), torch.randn(1, 1, 576)
    signer = ReceiptSigner(node, "s", "m", SPAN, PRICE)
    verifier = ReceiptVerifier(node.address, "s", "m", SPAN, PRICE)
    n = 200
    t0 = time.perf_counter()
    receipts = [signer.sign_step(i, 1, x, y) for i in range(n)]
    t1 = time.perf_counter()
    for data in receipts:
        verifier.check(data, x, y)
    t2 = time.perf_counter()
    sign_us, verify_us = (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6
    with capsys.disabled():
        print(f"\nreceipt sign {sign_us:.0f} us, verify {verify_us:.0f} us per step "
              f"(hidden 576, incl. tensor hashing)")
    assert sign_us < 5000 and verify_us < 5000  # generous: a shared CI core

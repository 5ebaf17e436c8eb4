"""Helpers of the ledger tests: the dev keys of an in-process EVM, signed receipts and
verdicts on them (what an accuser brings to ``Ledger.slash``)."""

from __future__ import annotations

from layerchain.ledger.base import EvidenceVerdict
from layerchain.market.receipts import ZERO_HASH, Receipt, SignedReceipt, receipt_hash, sign_receipt
from layerchain.market.wallet import Wallet

# eth-tester's funded dev keys (private keys 1..7), used as the wallets of every backend
KEYS = [bytes(31) + bytes([n]) for n in range(1, 8)]


def signed_receipt(node: Wallet, step: int = 0) -> bytes:
    receipt = Receipt(
        session_id="s-1", step=step, model_id="tiny", start=0, end=4, tokens=1,
        input_sha256=b"\x01" * 32, output_sha256=b"\x02" * 32, price_per_block=1, amount=4,
        prev_hash=ZERO_HASH, node_address=node.address, fingerprint=b"\x03" * 16,
    )
    return sign_receipt(node, receipt).to_bytes()


def verdict_on(accuser: Wallet, node: Wallet, *, guilty: bool, step: int = 0) -> EvidenceVerdict:
    receipt = signed_receipt(node, step)
    return EvidenceVerdict(
        evidence_hash="0x" + receipt_hash_of(receipt).hex(), accuser=accuser.address,
        accused=node.address, step=step, guilty=guilty, distance=1.0 if guilty else 0.0,
        tolerance=0.1, reason="test verdict", receipt=receipt,
    )


def receipt_hash_of(wire: bytes) -> bytes:
    """keccak256 of the canonical bytes of a signed receipt's wire form."""
    return receipt_hash(SignedReceipt.from_bytes(wire).receipt)

"""Receipts: a node's signed proof of contribution for one step of one session.

For every step a hop computes, the node signs a ``Receipt`` naming what it computed
(session, step, model, span, token count), the sha256 of the tensors it received and
returned, its price and the amount owed, and the hash of its previous receipt in the
session, so a session's receipts form a hash chain that cannot be reordered, replayed or
cut without the client noticing. The client checks every receipt against what it actually
sent and received (``verify_receipt``, pure) and stops using a peer whose receipt is wrong.

Canonical bytes (Solidity ``abi.encodePacked``, 284 bytes)::

    bytes32 RECEIPT_TYPEHASH = keccak256("layerchain.Receipt.v1")
    bytes32 keccak256(session_id)     uint64  step
    bytes32 keccak256(model_id)       uint32  start, uint32 end    (blocks [start, end))
    uint64  tokens                    bytes32 input_sha256, bytes32 output_sha256
    uint64  price_per_block           uint64  amount = tokens * (end - start) * price
    bytes32 prev_hash (zeros at step 0)          address node
    bytes32 keccak256(fingerprint)    (the commitment of the output: market.commitment)

The fingerprint is ``commit(output)`` (``layerchain.market.commitment``, 16 bytes per token):
the receipt pins down *what* the node returned, so a client checks on every step that it
is the commitment of the tensor received (a node signing one output and returning another
is caught at once) and an audit can compare a recomputation with it later.

``receipt_hash = keccak256(canonical bytes)``; the node signs it EIP-191 (``personal_sign``),
so a contract can check a receipt with ``ecrecover``. Wire form: msgpack
``[1, fields..., signature]``. Cost on one CPU core with coincurve: sign ~60 µs, verify
~100 µs (see tests/test_market_receipts.py::test_sign_and_verify_cost).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from layerchain.errors import InvalidReceipt
from layerchain.ledger.base import MAX_AMOUNT
from layerchain.market.commitment import check_commitment, commit
from layerchain.ledger.signatures import (
    BadSignature,
    Signer,
    address_bytes,
    checksum_address,
    keccak256,
    keccak256_cached,
    recover_address_bytes,
)
from layerchain.types import Span

RECEIPT_TYPEHASH = keccak256(b"layerchain.Receipt.v1")
ZERO_HASH = bytes(32)  # prev_hash of a session's first receipt
_WIRE_VERSION = 1
_PACKED = struct.Struct(">32s32sQ32sIIQ32s32sQQ32s20s32s")


def step_amount(tokens: int, blocks: int, price_per_block: int) -> int:
    """Credits owed for one step: every token times every block times the price (ints)."""
    return tokens * blocks * price_per_block


RESERVATION_TOKENS = 64  # a priced node charges one token's worth per this many cache tokens reserved


def reservation_amount(max_length: int, blocks: int, price_per_block: int) -> int:
    """Credits a priced node charges to open a session of ``max_length`` cache tokens on
    ``blocks`` blocks: one token's worth (``blocks x price``) per ``RESERVATION_TOKENS``
    tokens reserved, rounded up. Paid with the ``OpenSession`` voucher, not refunded: it
    pays for holding the cache, so squatting a node's whole cache (32k tokens: 512 tokens'
    worth) costs credits, while an honest 2k-token session pays 32 tokens' worth on top
    of the steps it runs."""
    return -(-max(1, max_length) // RESERVATION_TOKENS) * blocks * price_per_block


def tensor_sha256(tensor: Any) -> bytes:
    """sha256 over ``"dtype:shape:"`` and the raw bytes of a torch tensor or numpy array.

    dtype and shape are hashed so a reinterpreted buffer does not collide; bytes are in
    the host's order (little-endian on every platform layerchain runs on). A 32-byte
    ``bytes`` argument is taken to be a digest already and returned as it is.
    """
    if isinstance(tensor, (bytes, bytearray)) and len(tensor) == 32:
        return bytes(tensor)
    if hasattr(tensor, "detach"):  # torch.Tensor, without importing torch here
        flat = tensor.detach()
        if flat.device.type != "cpu" or not flat.is_contiguous():
            flat = flat.cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        try:
            buffer = flat.numpy()  # the hot path: float32 hidden states, no copy
        except TypeError:  # bfloat16 has no numpy dtype: hash its bytes
            import torch

            buffer = flat.reshape(-1).view(torch.uint8).numpy()
    else:
        import numpy as np

        array = np.ascontiguousarray(tensor)
        dtype = str(array.dtype)
        buffer = array.reshape(-1).view(np.uint8)
    shape = ",".join(str(int(d)) for d in tensor.shape)
    digest = hashlib.sha256(f"{dtype}:{shape}:".encode())
    digest.update(buffer)
    return digest.digest()


def _check_receipt_fields(r: Receipt) -> None:
    for name in ("input_sha256", "output_sha256", "prev_hash"):
        value = getattr(r, name)
        if not isinstance(value, bytes) or len(value) != 32:
            raise InvalidReceipt(f"receipt {name} must be 32 bytes")
    for name in ("step", "start", "end", "tokens", "price_per_block", "amount"):
        value = getattr(r, name)
        if type(value) is not int or not 0 <= value <= MAX_AMOUNT:
            raise InvalidReceipt(f"receipt {name} must be a non-negative integer, got {value!r}")
    if r.end >= 2**32 or r.end <= r.start:
        raise InvalidReceipt(f"receipt span {r.start}:{r.end} is empty or out of range")
    if not isinstance(r.fingerprint, bytes):
        raise InvalidReceipt("receipt fingerprint must be bytes")


@dataclass(frozen=True)
class Receipt:
    """What a node signs for one step; see the module docstring for the signed layout."""

    session_id: str
    step: int  # 0-based index of the forward call within the session on this hop
    model_id: str
    start: int  # first block computed
    end: int  # one past the last block computed
    tokens: int  # token positions processed in this step (batch x new tokens)
    input_sha256: bytes  # tensor_sha256 of the hidden states received
    output_sha256: bytes  # tensor_sha256 of the hidden states returned
    price_per_block: int  # credits per block per token
    amount: int  # tokens * (end - start) * price_per_block
    prev_hash: bytes  # receipt_hash of step - 1, ZERO_HASH at step 0
    node_address: str  # the signer's checksummed address
    fingerprint: bytes = b""  # commit(output): market.commitment, 16 bytes per token

    def __post_init__(self) -> None:
        _check_receipt_fields(self)

    @property
    def blocks(self) -> int:
        return self.end - self.start

    def canonical_bytes(self) -> bytes:
        try:
            return _PACKED.pack(
                RECEIPT_TYPEHASH,
                keccak256_cached(self.session_id.encode()),
                self.step,
                keccak256_cached(self.model_id.encode()),
                self.start,
                self.end,
                self.tokens,
                self.input_sha256,
                self.output_sha256,
                self.price_per_block,
                self.amount,
                self.prev_hash,
                address_bytes(self.node_address),
                keccak256_cached(self.fingerprint),
            )
        except (struct.error, ValueError, AttributeError) as error:
            raise InvalidReceipt(f"receipt fields cannot be encoded: {error}") from None


def receipt_hash(receipt: Receipt) -> bytes:
    """keccak256 of the canonical bytes: the chain link and the signed digest."""
    return keccak256(receipt.canonical_bytes())


@dataclass(frozen=True)
class SignedReceipt:
    """A receipt with its 65-byte EIP-191 signature; ``to_bytes`` is the wire form."""

    receipt: Receipt
    signature: bytes

    def to_bytes(self) -> bytes:
        r = self.receipt
        return msgpack.packb(
            [
                _WIRE_VERSION, r.session_id, r.step, r.model_id, r.start, r.end, r.tokens,
                r.input_sha256, r.output_sha256, r.price_per_block, r.amount, r.prev_hash,
                address_bytes(r.node_address), r.fingerprint, self.signature,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedReceipt:
        """Decode the wire form; InvalidReceipt if malformed."""
        try:
            fields = msgpack.unpackb(data, raw=False)
            if not isinstance(fields, list) or len(fields) != 15 or fields[0] != _WIRE_VERSION:
                raise ValueError("not a version-1 receipt")
            node = fields[12]
            if not isinstance(node, bytes) or len(node) != 20 or not isinstance(fields[14], bytes):
                raise ValueError("bad node address or signature")
            if not isinstance(fields[1], str) or not isinstance(fields[3], str):
                raise ValueError("session and model ids must be strings")
            # 11 fields from a list checked to hold 15: mypy cannot count a slice
            receipt = Receipt(*fields[1:12], checksum_address(node), fields[13])  # type: ignore[call-arg]
        except InvalidReceipt:
            raise
        except Exception as error:
            raise InvalidReceipt(f"receipt bytes are malformed ({error})") from None
        return cls(receipt, fields[14])


def sign_receipt(signer: Signer, receipt: Receipt) -> SignedReceipt:
    """Sign ``receipt`` with the node's wallet; its ``node_address`` must be the signer's."""
    return _sign(signer, receipt)[0]


def _sign(signer: Signer, receipt: Receipt) -> tuple[SignedReceipt, bytes]:
    if address_bytes(receipt.node_address) != address_bytes(signer.address):
        raise InvalidReceipt(f"receipt names node {receipt.node_address}, not {signer.address}")
    digest = receipt_hash(receipt)
    return SignedReceipt(receipt, signer.sign_digest(digest)), digest


def verify_receipt(
    receipt_bytes: bytes,
    *,
    expected_node_address: str,
    session_id: str,
    expected_step: int,
    input_sha256: bytes,
    output_sha256: bytes,
    prev_hash: bytes,
    price_per_block: int,
    model_id: str | None = None,
    span: Span | None = None,
    tokens: int | None = None,
) -> Receipt:
    """Check a receipt against what the client knows; return it, or raise InvalidReceipt.

    Checks, in order: wire form; signature by ``expected_node_address`` (a forged or altered
    receipt fails here); session; step (lower: replayed, higher: out of order); chain link
    ``prev_hash``; model and span when given; the input and output hashes of what was
    actually sent and received; token count when given; price and amount. Pure.
    """
    return _verify(
        receipt_bytes, expected_node_address, session_id, expected_step, input_sha256,
        output_sha256, prev_hash, price_per_block, model_id, span, tokens,
    )[0]


def _verify(
    receipt_bytes: bytes,
    expected_node_address: str,
    session_id: str,
    expected_step: int,
    input_sha256: bytes,
    output_sha256: bytes,
    prev_hash: bytes,
    price_per_block: int,
    model_id: str | None,
    span: Span | None,
    tokens: int | None,
) -> tuple[Receipt, bytes]:
    """verify_receipt, also returning the receipt's hash (the next link of the chain)."""
    signed = SignedReceipt.from_bytes(receipt_bytes)
    r = signed.receipt
    node = address_bytes(expected_node_address)
    digest = receipt_hash(r)
    try:
        signer = recover_address_bytes(digest, signed.signature)
    except BadSignature as error:
        raise InvalidReceipt(f"receipt signature is invalid: {error}") from None
    if signer != node:
        raise InvalidReceipt(
            f"receipt signature is not from node {expected_node_address} (forged or altered)"
        )
    if address_bytes(r.node_address) != node:
        raise InvalidReceipt(f"receipt names node {r.node_address}, not {expected_node_address}")
    if r.session_id != session_id:
        raise InvalidReceipt(f"receipt is for session {r.session_id!r}, not {session_id!r}")
    if r.step < expected_step:
        raise InvalidReceipt(
            f"replayed receipt: step {r.step} was already receipted (expected step {expected_step})"
        )
    if r.step > expected_step:
        raise InvalidReceipt(f"receipt out of order: step {r.step}, expected step {expected_step}")
    if r.prev_hash != prev_hash:
        raise InvalidReceipt(
            f"receipt chain broken at step {r.step}: prev_hash is not the previous receipt's hash"
        )
    if model_id is not None and r.model_id != model_id:
        raise InvalidReceipt(f"receipt is for model {r.model_id!r}, not {model_id!r}")
    if span is not None and (r.start, r.end) != (span.start, span.end):
        raise InvalidReceipt(f"receipt covers blocks {r.start}:{r.end}, not {span}")
    if r.input_sha256 != input_sha256:
        raise InvalidReceipt(f"receipt input hash at step {r.step} does not match what was sent")
    if r.output_sha256 != output_sha256:
        raise InvalidReceipt(
            f"receipt output hash at step {r.step} does not match what was received"
        )
    if tokens is not None and r.tokens != tokens:
        raise InvalidReceipt(f"receipt counts {r.tokens} tokens, {tokens} were sent")
    if r.price_per_block != price_per_block:
        raise InvalidReceipt(
            f"receipt price {r.price_per_block} is not the agreed {price_per_block} per block"
        )
    if r.amount != step_amount(r.tokens, r.blocks, r.price_per_block):
        raise InvalidReceipt(
            f"receipt amount {r.amount} is not {r.tokens} tokens x {r.blocks} blocks x "
            f"{r.price_per_block}"
        )
    return r, digest


def tokens_of(hidden_states: Any) -> int:
    """Token positions in hidden states ``[batch, new_tokens, hidden]``: batch x new_tokens."""
    count = 1
    for d in tuple(hidden_states.shape)[:-1]:
        count *= int(d)
    return count


class ReceiptSigner:
    """Node side: signs the receipt chain of one session on one hop.

    ``sign_step`` is called once per forward call, in step order; it links each receipt to
    the previous one. Not thread-safe: one signer per session.
    """

    def __init__(
        self, wallet: Signer, session_id: str, model_id: str, span: Span, price_per_block: int
    ) -> None:
        self.wallet, self.session_id, self.model_id = wallet, session_id, model_id
        self.span, self.price_per_block = span, price_per_block
        self.last_hash = ZERO_HASH  # receipt_hash of the last signed receipt

    def sign_step(
        self, step: int, tokens: int, input_tensor: Any, output_tensor: Any,
        fingerprint: bytes | None = None,
    ) -> bytes:
        """Wire bytes of the signed receipt for ``step``; tensors or their 32-byte digests.

        ``fingerprint`` defaults to ``commit(output_tensor)`` (empty when only the output's
        digest is given): the receipt commits to the tensor returned, whatever it is."""
        if fingerprint is None:
            fingerprint = b"" if isinstance(output_tensor, (bytes, bytearray)) else commit(output_tensor)
        amount = step_amount(tokens, self.span.length, self.price_per_block)
        receipt = Receipt(
            self.session_id, step, self.model_id, self.span.start, self.span.end, tokens,
            tensor_sha256(input_tensor), tensor_sha256(output_tensor), self.price_per_block,
            amount, self.last_hash, self.wallet.address, fingerprint,
        )
        signed, self.last_hash = _sign(self.wallet, receipt)
        return signed.to_bytes()


class ReceiptVerifier:
    """Client side: checks one hop's receipt chain for one session, step after step.

    State advances only on a valid receipt, so after an InvalidReceipt the caller bans
    the peer. What was paid is the session's to count (its per-peer tally), not this
    checker's.
    """

    def __init__(
        self,
        node_address: str,
        session_id: str,
        model_id: str,
        span: Span,
        price_per_block: int,
    ) -> None:
        self.node_address, self.session_id, self.model_id = node_address, session_id, model_id
        self.span, self.price_per_block = span, price_per_block
        self.next_step = 0
        self.last_hash = ZERO_HASH

    def check(
        self, receipt_bytes: bytes, input_tensor: Any, output_tensor: Any,
        tokens: int | None = None,
    ) -> Receipt:
        """Verify the next receipt against the tensors sent and received; advance the chain.

        ``tokens`` defaults to ``tokens_of(input_tensor)`` when a tensor (not a digest) is given.
        When ``output_tensor`` is a tensor, its commitment must be the receipt's fingerprint
        (``check_commitment``): InvalidOutput if not, the node signed another output.
        """
        if tokens is None and not isinstance(input_tensor, (bytes, bytearray)):
            tokens = tokens_of(input_tensor)
        receipt, digest = _verify(
            receipt_bytes,
            self.node_address,
            self.session_id,
            self.next_step,
            tensor_sha256(input_tensor),
            tensor_sha256(output_tensor),
            self.last_hash,
            self.price_per_block,
            self.model_id,
            self.span,
            tokens,
        )
        if not isinstance(output_tensor, (bytes, bytearray)):
            check_commitment(receipt.fingerprint, output_tensor)
        self.next_step += 1
        self.last_hash = digest
        return receipt

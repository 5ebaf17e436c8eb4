"""Signed records the ledger settles: vouchers (payment channels) and liveness records.

Each record is a frozen dataclass with canonical bytes (Solidity ``abi.encodePacked`` of
fixed-width fields, so a contract recomputes them), a 32-byte ``digest`` (keccak256 of the
canonical bytes) signed EIP-191 style by ``layerchain.ledger.signatures``, and a compact
wire form: msgpack ``[version, fields..., signature]``.

Voucher canonical bytes (80 bytes)::

    bytes32 VOUCHER_TYPEHASH = keccak256("layerchain.Voucher.v1")
    bytes32 channel_id
    uint64  nonce                # strictly increasing per channel, starting at 1
    uint64  cumulative_amount    # total credits owed to the payee on this channel so far

Liveness canonical bytes (72 bytes)::

    bytes32 LIVENESS_TYPEHASH = keccak256("layerchain.Liveness.v1")
    address node
    uint64  period_start, uint64 period_end   # unix seconds, half-open [start, end)
    uint32  blocks                             # blocks served during the whole period

``verify_voucher`` is the pure rule a node and the ledger both apply. This module knows
nothing of storage.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack

from layerchain.errors import ChannelError, InvalidVoucher, LedgerError
from layerchain.ledger.base import CLOSED, MAX_AMOUNT, Channel
from layerchain.ledger.signatures import (
    BadSignature,
    Signer,
    address_bytes,
    checksum_address,
    keccak256,
    recover_address_bytes,
)

VOUCHER_TYPEHASH = keccak256(b"layerchain.Voucher.v1")
LIVENESS_TYPEHASH = keccak256(b"layerchain.Liveness.v1")
_WIRE_VERSION = 1
_U64 = struct.Struct(">QQ")


def channel_id_bytes(channel_id: str) -> bytes:
    """The 32 bytes of a ``0x``-prefixed channel id; InvalidVoucher if malformed."""
    try:
        raw = bytes.fromhex(channel_id[2:]) if channel_id.startswith("0x") else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise InvalidVoucher(f"channel id {channel_id!r} is not 0x + 64 hex digits")
    return raw


def _check_amount(name: str, value: int, error: type[Exception]) -> None:
    if type(value) is not int or not 0 <= value <= MAX_AMOUNT:
        raise error(f"{name} must be an integer in [0, 2^63), got {value!r}")


@dataclass(frozen=True)
class Voucher:
    """The payer's promise: ``cumulative_amount`` credits in total on ``channel_id``."""

    channel_id: str
    nonce: int
    cumulative_amount: int

    def __post_init__(self) -> None:
        channel_id_bytes(self.channel_id)
        _check_amount("voucher nonce", self.nonce, InvalidVoucher)
        _check_amount("voucher amount", self.cumulative_amount, InvalidVoucher)

    def canonical_bytes(self) -> bytes:
        return (
            VOUCHER_TYPEHASH
            + channel_id_bytes(self.channel_id)
            + _U64.pack(self.nonce, self.cumulative_amount)
        )

    def digest(self) -> bytes:
        """keccak256 of the canonical bytes: what the payer signs (EIP-191)."""
        return keccak256(self.canonical_bytes())


def sign_voucher(signer: Signer, voucher: Voucher) -> bytes:
    """The wire bytes of ``voucher`` signed by ``signer`` (the channel's payer)."""
    signature = signer.sign_digest(voucher.digest())
    return msgpack.packb(
        [
            _WIRE_VERSION,
            channel_id_bytes(voucher.channel_id),
            voucher.nonce,
            voucher.cumulative_amount,
            signature,
        ]
    )


def decode_voucher(data: bytes) -> tuple[Voucher, bytes]:
    """``(voucher, signature)`` from wire bytes; InvalidVoucher if malformed."""
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
        version, channel_raw, nonce, amount, signature = fields
    except Exception:
        raise InvalidVoucher("voucher bytes are malformed") from None
    if version != _WIRE_VERSION:
        raise InvalidVoucher(f"voucher wire version {version!r} is not {_WIRE_VERSION}")
    if not isinstance(channel_raw, bytes) or len(channel_raw) != 32:
        raise InvalidVoucher("voucher channel id is not 32 bytes")
    if not isinstance(signature, bytes):
        raise InvalidVoucher("voucher signature is not bytes")
    return Voucher("0x" + channel_raw.hex(), nonce, amount), signature


def voucher_signer(voucher: Voucher, signature: bytes) -> bytes:
    """The 20-byte address that signed ``voucher``; InvalidVoucher if the signature is bad."""
    try:
        return recover_address_bytes(voucher.digest(), signature)
    except BadSignature as error:
        raise InvalidVoucher(f"voucher signature is invalid: {error}") from None


def verify_voucher(
    data: bytes,
    channel: Channel,
    *,
    last_nonce: int | None = None,
    last_amount: int | None = None,
) -> Voucher:
    """Check a voucher against ``channel``; return it if it is new and valid.

    ``last_nonce``/``last_amount`` default to what the channel has redeemed; a node passes
    the last voucher it accepted instead. Raises InvalidVoucher (malformed, other channel,
    not the payer's signature, nonce not above ``last_nonce``, amount below
    ``last_amount`` or above the deposit) or ChannelError (channel closed). Pure.
    """
    voucher, signature = decode_voucher(data)
    if voucher.channel_id != channel.channel_id:
        raise InvalidVoucher(
            f"voucher is for channel {voucher.channel_id[:10]}..., not {channel.channel_id[:10]}..."
        )
    if voucher_signer(voucher, signature) != address_bytes(channel.payer):
        raise InvalidVoucher(
            f"voucher for channel {channel.channel_id[:10]}... is not signed by its payer "
            f"{channel.payer}"
        )
    if channel.state == CLOSED:
        raise ChannelError(f"channel {channel.channel_id[:10]}... is closed")
    last_nonce = channel.nonce if last_nonce is None else last_nonce
    last_amount = channel.redeemed if last_amount is None else last_amount
    if voucher.nonce <= last_nonce:
        raise InvalidVoucher(
            f"voucher nonce {voucher.nonce} reused: the last accepted nonce is {last_nonce}"
        )
    if voucher.cumulative_amount < last_amount:
        raise InvalidVoucher(
            f"voucher amount {voucher.cumulative_amount} is below the {last_amount} "
            "already promised on this channel"
        )
    if voucher.cumulative_amount > channel.deposit:
        raise InvalidVoucher(
            f"voucher amount {voucher.cumulative_amount} exceeds the channel deposit "
            f"{channel.deposit}"
        )
    return voucher


@dataclass(frozen=True)
class LivenessRecord:
    """A node's claim: it served ``blocks`` blocks during ``[period_start, period_end)``."""

    node_address: str
    period_start: int  # unix seconds
    period_end: int  # unix seconds
    blocks: int

    def canonical_bytes(self) -> bytes:
        return (
            LIVENESS_TYPEHASH
            + address_bytes(self.node_address)
            + _U64.pack(self.period_start, self.period_end)
            + struct.pack(">I", self.blocks)
        )

    def digest(self) -> bytes:
        return keccak256(self.canonical_bytes())

    @property
    def seconds(self) -> int:
        return self.period_end - self.period_start


def sign_liveness(signer: Signer, record: LivenessRecord) -> bytes:
    """Wire bytes of ``record`` signed by ``signer`` (the node itself)."""
    signature = signer.sign_digest(record.digest())
    return msgpack.packb(
        [
            _WIRE_VERSION,
            address_bytes(record.node_address),
            record.period_start,
            record.period_end,
            record.blocks,
            signature,
        ]
    )


def verify_liveness(data: bytes) -> LivenessRecord:
    """Decode a liveness record and check it is signed by its node; LedgerError if not."""
    try:
        version, node_raw, start, end, blocks, signature = msgpack.unpackb(data, raw=False)
        if version != _WIRE_VERSION or len(node_raw) != 20:
            raise ValueError
        if not all(type(x) is int and 0 <= x < 2**63 for x in (start, end, blocks)):
            raise ValueError
        record = LivenessRecord(checksum_address(node_raw), start, end, blocks)
    except Exception:
        raise LedgerError("liveness record bytes are malformed") from None
    if blocks >= 2**32 or end <= start:
        raise LedgerError(f"liveness record has an empty period or too many blocks ({blocks})")
    try:
        signer = recover_address_bytes(record.digest(), signature)
    except BadSignature as error:
        raise LedgerError(f"liveness record signature is invalid: {error}") from None
    if signer != node_raw:
        raise LedgerError(f"liveness record is not signed by its node {record.node_address}")
    return record

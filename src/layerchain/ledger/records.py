"""Signed records the ledger settles: vouchers (payment channels).

Each record is a frozen dataclass with canonical bytes (Solidity ``abi.encodePacked`` of
fixed-width fields, so a contract recomputes them), a 32-byte ``digest`` (keccak256 of the
canonical bytes) signed EIP-191 style by ``layerchain.ledger.signatures``, and a compact
wire form: msgpack ``[version, fields..., signature]``.

Voucher canonical bytes (80 bytes)::

    bytes32 VOUCHER_TYPEHASH = keccak256("layerchain.Voucher.v1")
    bytes32 channel_id
    uint64  nonce                # strictly increasing per channel, starting at 1
    uint64  cumulative_amount    # total credits owed to the payee on this channel so far

Uptime is not a record a node signs about itself: the ledger rewards what it saw
(``journal._claim_reward``). Ledger operations are signed in ``operations.py``.

``verify_voucher`` is the pure rule a node and the ledger both apply. This module knows
nothing of storage.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack

from layerchain.errors import ChannelError, InvalidVoucher
from layerchain.ledger.base import CLOSED, MAX_AMOUNT, Channel
from layerchain.ledger.signatures import (
    id32_bytes,
    BadSignature,
    Signer,
    address_bytes,
    keccak256,
    recover_address_bytes,
)

VOUCHER_TYPEHASH = keccak256(b"layerchain.Voucher.v1")
_WIRE_VERSION = 1
_U64 = struct.Struct(">QQ")


def channel_id_bytes(channel_id: str) -> bytes:
    """The 32 bytes of a ``0x``-prefixed channel id; InvalidVoucher if malformed."""
    try:
        return id32_bytes(channel_id)
    except ValueError:
        raise InvalidVoucher(f"channel id {channel_id!r} is not 0x + 64 hex digits") from None


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

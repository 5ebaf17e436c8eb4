"""Signed records the ledger settles: vouchers (payment channels), as EIP-712 typed data.

A voucher is a frozen dataclass with canonical bytes (Solidity ``abi.encode`` of its
EIP-712 struct, so a contract recomputes them), a 32-byte ``digest(domain)`` that the
payer signs raw (no EIP-191 prefix), and a compact wire form: msgpack
``[version, channel_id, nonce, cumulative_amount, signature]``.

EIP-712 (what a contract checks with ``ecrecover``)::

    VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint64 nonce,uint64 cumulativeAmount)")
    structHash       = keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, nonce, cumulativeAmount))
    digest           = keccak256("\\x19\\x01" || domainSeparator || structHash)

``nonce`` is strictly increasing per channel, starting at 1; ``cumulativeAmount`` is the
total owed to the payee on the channel so far. The domain binds a voucher to one ledger,
so a voucher signed for one ledger is worthless on another:

* an EVM ledger: the contract's ``domainSeparator()``, ``EIP712Domain(string name,string
  version,uint256 chainId,address verifyingContract)`` with name "layerchain", version "1";
* an embedded (SQLite) ledger: ``ledger_domain(ledger_id)``, ``EIP712Domain(string name,
  string version,bytes32 salt)`` with name "layerchain", version "1" and the ledger's
  32-byte ``ledger_id`` as salt.

Wire version 2 is the EIP-712 voucher. Version 1 (before domains: EIP-191 over
``keccak256(keccak256("layerchain.Voucher.v1") || channel_id || uint64 nonce || uint64
amount)``, valid on any ledger) is refused everywhere except when replaying the journal
of a ledger created before version 2 (``verify_voucher(..., legacy=True)``), whose old
redeem entries must keep verifying.

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
    BadSignature,
    Signer,
    address_bytes,
    eip712_digest,
    eip712_domain,
    id32_bytes,
    keccak256,
    recover_address_bytes,
    recover_hash_address_bytes,
)

VOUCHER_TYPEHASH = keccak256(b"Voucher(bytes32 channelId,uint64 nonce,uint64 cumulativeAmount)")
LEGACY_VOUCHER_TYPEHASH = keccak256(b"layerchain.Voucher.v1")  # wire version 1 (EIP-191)
WIRE_VERSION = 2  # EIP-712 under a ledger's domain
LEGACY_WIRE_VERSION = 1  # EIP-191, no domain: only replayed from old journals
_U64 = struct.Struct(">QQ")


def ledger_domain(ledger_id: str) -> bytes:
    """The EIP-712 domain separator of an embedded ledger: its 32-byte id as the salt."""
    return eip712_domain(salt=id32_bytes(ledger_id))


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
        """``abi.encode(VOUCHER_TYPEHASH, channelId, nonce, cumulativeAmount)``: 128 bytes."""
        return (
            VOUCHER_TYPEHASH
            + channel_id_bytes(self.channel_id)
            + self.nonce.to_bytes(32, "big")
            + self.cumulative_amount.to_bytes(32, "big")
        )

    def struct_hash(self) -> bytes:
        """EIP-712 ``hashStruct(voucher)``."""
        return keccak256(self.canonical_bytes())

    def digest(self, domain: bytes) -> bytes:
        """The EIP-712 digest under ``domain`` (32 bytes): what the payer signs raw."""
        return eip712_digest(_domain_bytes(domain), self.struct_hash())

    def legacy_digest(self) -> bytes:
        """What a wire version 1 voucher was signed over (EIP-191, no domain)."""
        return keccak256(
            LEGACY_VOUCHER_TYPEHASH
            + channel_id_bytes(self.channel_id)
            + _U64.pack(self.nonce, self.cumulative_amount)
        )


def _domain_bytes(domain: bytes) -> bytes:
    if not isinstance(domain, bytes) or len(domain) != 32:
        raise InvalidVoucher("a voucher's domain separator must be 32 bytes (ledger.domain_separator)")
    return domain


def sign_voucher(signer: Signer, voucher: Voucher, domain: bytes) -> bytes:
    """The wire bytes of ``voucher`` signed by ``signer`` (the channel's payer) for the
    ledger whose EIP-712 domain separator is ``domain`` (``ledger.domain_separator``)."""
    signature = signer.sign_hash(voucher.digest(domain))
    return msgpack.packb(
        [
            WIRE_VERSION,
            channel_id_bytes(voucher.channel_id),
            voucher.nonce,
            voucher.cumulative_amount,
            signature,
        ]
    )


def decode_voucher(data: bytes) -> tuple[Voucher, bytes]:
    """``(voucher, signature)`` from wire bytes (version 2); InvalidVoucher if malformed or
    of another version."""
    voucher, signature, version = decode_any_voucher(data)
    if version != WIRE_VERSION:
        raise InvalidVoucher(
            f"voucher wire version {version} (signed without a ledger domain) is no longer "
            "accepted: the payer must sign it again"
        )
    return voucher, signature


def decode_any_voucher(data: bytes) -> tuple[Voucher, bytes, int]:
    """``(voucher, signature, wire version)`` of version 1 or 2 bytes; InvalidVoucher if
    malformed. Only a journal replay has a use for version 1."""
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
        version, channel_raw, nonce, amount, signature = fields
    except Exception:
        raise InvalidVoucher("voucher bytes are malformed") from None
    if version not in (WIRE_VERSION, LEGACY_WIRE_VERSION):
        raise InvalidVoucher(f"voucher wire version {version!r} is not {WIRE_VERSION}")
    if not isinstance(channel_raw, bytes) or len(channel_raw) != 32:
        raise InvalidVoucher("voucher channel id is not 32 bytes")
    if not isinstance(signature, bytes):
        raise InvalidVoucher("voucher signature is not bytes")
    return Voucher("0x" + channel_raw.hex(), nonce, amount), signature, version


def voucher_signer(
    voucher: Voucher, signature: bytes, domain: bytes, *, version: int = WIRE_VERSION
) -> bytes:
    """The 20-byte address that signed ``voucher`` under ``domain`` (version 1: the old
    EIP-191 digest, no domain); InvalidVoucher if the signature is bad."""
    try:
        if version == LEGACY_WIRE_VERSION:
            return recover_address_bytes(voucher.legacy_digest(), signature)
        return recover_hash_address_bytes(voucher.digest(domain), signature)
    except BadSignature as error:
        raise InvalidVoucher(f"voucher signature is invalid: {error}") from None


def verify_voucher(
    data: bytes,
    channel: Channel,
    domain: bytes,
    *,
    last_nonce: int | None = None,
    last_amount: int | None = None,
    legacy: bool = False,
) -> Voucher:
    """Check a voucher against ``channel`` on the ledger whose EIP-712 domain separator is
    ``domain``; return it if it is new and valid.

    ``last_nonce``/``last_amount`` default to what the channel has redeemed; a node passes
    the last voucher it accepted instead. ``legacy`` also accepts wire version 1 (a replay
    of a journal written before domains). Raises InvalidVoucher (malformed, other channel,
    signed for another ledger or not by the payer, nonce not above ``last_nonce``, amount
    below ``last_amount`` or above the deposit) or ChannelError (channel closed). Pure.
    """
    _domain_bytes(domain)
    if legacy:
        voucher, signature, version = decode_any_voucher(data)
    else:
        (voucher, signature), version = decode_voucher(data), WIRE_VERSION
    if voucher.channel_id != channel.channel_id:
        raise InvalidVoucher(
            f"voucher is for channel {voucher.channel_id[:10]}..., not {channel.channel_id[:10]}..."
        )
    if voucher_signer(voucher, signature, domain, version=version) != address_bytes(channel.payer):
        raise InvalidVoucher(
            f"voucher for channel {channel.channel_id[:10]}... is not signed by its payer "
            f"{channel.payer} for this ledger (another signer, or another ledger's domain)"
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

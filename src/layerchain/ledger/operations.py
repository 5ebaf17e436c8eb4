"""Signed ledger operations: every change of an account is authorised by its owner's key.

An ``Operation`` is what one actor asks of one ledger, like a transaction: deposit,
withdraw, open a channel, top it up, close it, register as a node, claim an uptime reward,
accuse a node with evidence of cheating (``slash``).
The actor signs its canonical bytes (EIP-191 over keccak256, as receipts and vouchers are
signed, see ``layerchain.ledger.signatures``), the ledger recovers the signer and applies
the operation only to the signer's own credits. Whoever can open the ledger file can
submit operations, but cannot sign one for somebody else's account.

Replay protection: each operation carries the id of the ledger it is for (a random
bytes32 fixed in the genesis entry, so an operation signed for one ledger is refused by
another), a ``nonce`` the ledger remembers per actor (any value, used once: random 63-bit
numbers let several processes share one wallet without coordinating), and a ``deadline``
in ledger seconds after which it is refused.

Deposits: the embedded ledger is a test ledger, credits have no outside source. A deposit
is a signed operation of the depositor *minting* test credits into its own account; the
journal says so (kind ``deposit``, signed by the credited account). A ledger backed by a
real chain would instead transfer tokens in.

Canonical bytes (Solidity ``abi.encodePacked``, 196 bytes)::

    bytes32 OPERATION_TYPEHASH = keccak256("layerchain.Operation.v1")
    bytes32 ledger_id      # the ledger's id (genesis entry)
    bytes32 keccak256(kind)
    address actor          # the signer; whose credits move
    uint64  nonce          # used once per actor
    uint64  deadline       # unix seconds on the ledger's clock; refused after it
    address counterparty   # open_channel: the payee; slash: the accused; zero otherwise
    bytes32 channel_id     # top_up, close_channel: the channel; slash: the evidence hash
                           # (``ledger/evidence.py``); zero otherwise
    uint64  amount         # deposit, withdraw, open_channel, top_up, register_node (stake)
    uint32  blocks         # register_node: the blocks the node serves

Wire form: msgpack ``[1, ledger_id, kind, actor, nonce, deadline, counterparty,
channel_id, amount, blocks, signature]``. ``verify_operation`` is pure; it knows nothing
of balances (``journal.py`` holds the rules).
"""

from __future__ import annotations

import secrets
import struct
import time
from dataclasses import dataclass

import msgpack

from layerchain.errors import LedgerError
from layerchain.ledger.base import MAX_AMOUNT
from layerchain.ledger.signatures import (
    id32_bytes,
    BadSignature,
    Signer,
    address_bytes,
    checksum_address,
    keccak256,
    recover_address_bytes,
)

OPERATION_TYPEHASH = keccak256(b"layerchain.Operation.v1")
KINDS = (
    "deposit", "withdraw", "open_channel", "top_up", "close_channel", "register_node",
    "claim_reward", "slash",
)
ZERO_ADDRESS = "0x" + "00" * 20
ZERO_ID = "0x" + "00" * 32
DEFAULT_VALIDITY_S = 3600  # an operation signed now may be submitted for this long
_WIRE_VERSION = 1
_PACKED = struct.Struct(">32s32s32s20sQQ20s32sQI")


def id_bytes(value: str, what: str = "id") -> bytes:
    """The 32 bytes of a ``0x`` + 64 hex digits id; LedgerError if malformed."""
    try:
        return id32_bytes(value)
    except ValueError:
        raise LedgerError(f"{what} {value!r} is not 0x + 64 hex digits") from None


def _address_bytes(value: str, what: str) -> bytes:
    try:
        return address_bytes(value)
    except ValueError:
        raise LedgerError(f"{what} {value!r} is not an address (0x + 40 hex digits)") from None


@dataclass(frozen=True)
class Operation:
    """One signed request of ``actor`` to the ledger ``ledger_id``; see the module docstring."""

    ledger_id: str  # "0x" + 64 hex digits
    kind: str  # one of KINDS
    actor: str  # checksummed address of the signer
    nonce: int  # used once per actor
    deadline: int  # unix seconds (ledger clock)
    counterparty: str = ZERO_ADDRESS  # open_channel: the payee; slash: the accused
    channel_id: str = ZERO_ID  # top_up, close_channel; slash: the evidence hash
    amount: int = 0  # credits
    blocks: int = 0  # register_node

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LedgerError(f"unknown operation kind {self.kind!r}")
        for name in ("nonce", "deadline", "amount"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_AMOUNT:
                raise LedgerError(f"operation {name} must be an integer in [0, 2^63), got {value!r}")
        if type(self.blocks) is not int or not 0 <= self.blocks < 2**32:
            raise LedgerError(f"operation blocks must be an integer in [0, 2^32), got {self.blocks!r}")

    def canonical_bytes(self) -> bytes:
        return _PACKED.pack(
            OPERATION_TYPEHASH,
            id_bytes(self.ledger_id, "ledger id"),
            keccak256(self.kind.encode()),
            _address_bytes(self.actor, "actor"),
            self.nonce,
            self.deadline,
            _address_bytes(self.counterparty, "counterparty"),
            id_bytes(self.channel_id, "channel id"),
            self.amount,
            self.blocks,
        )

    def digest(self) -> bytes:
        """keccak256 of the canonical bytes: what the actor signs (EIP-191)."""
        return keccak256(self.canonical_bytes())


def new_operation(
    signer: Signer,
    ledger_id: str,
    kind: str,
    *,
    now: float | None = None,
    validity_s: int = DEFAULT_VALIDITY_S,
    **fields: object,
) -> Operation:
    """An operation of ``signer`` with a fresh random nonce, valid for ``validity_s`` after
    ``now`` (the ledger's clock when known, else this machine's)."""
    start = time.time() if now is None else now
    return Operation(
        ledger_id, kind, checksum_address(address_bytes(signer.address)),
        nonce=secrets.randbits(63), deadline=int(start) + validity_s, **fields,  # type: ignore[arg-type]
    )


def sign_operation(signer: Signer, operation: Operation) -> bytes:
    """Wire bytes of ``operation`` signed by ``signer``, who must be its actor."""
    if address_bytes(signer.address) != address_bytes(operation.actor):
        raise LedgerError(f"{signer.address} cannot sign an operation of {operation.actor}")
    signature = signer.sign_digest(operation.digest())
    o = operation
    return msgpack.packb([
        _WIRE_VERSION, id_bytes(o.ledger_id), o.kind, address_bytes(o.actor), o.nonce,
        o.deadline, address_bytes(o.counterparty), id_bytes(o.channel_id), o.amount, o.blocks,
        signature,
    ])


def verify_operation(data: bytes) -> Operation:
    """Decode an operation and check it is signed by its actor; LedgerError if not. Pure."""
    try:
        fields = msgpack.unpackb(data, raw=False)
        if not isinstance(fields, list) or len(fields) != 11 or fields[0] != _WIRE_VERSION:
            raise ValueError("not a version-1 operation")
        _, ledger_raw, kind, actor, nonce, deadline, other, channel, amount, blocks, sig = fields
        for raw, size in ((ledger_raw, 32), (actor, 20), (other, 20), (channel, 32)):
            if not isinstance(raw, bytes) or len(raw) != size:
                raise ValueError("a field has the wrong length")
        if not isinstance(kind, str) or not isinstance(sig, bytes):
            raise ValueError("kind or signature has the wrong type")
        operation = Operation(
            "0x" + ledger_raw.hex(), kind, checksum_address(actor), nonce, deadline,
            checksum_address(other), "0x" + channel.hex(), amount, blocks,
        )
    except LedgerError:
        raise
    except Exception as error:
        raise LedgerError(f"operation bytes are malformed ({error})") from None
    try:
        signer = recover_address_bytes(operation.digest(), sig)
    except BadSignature as error:
        raise LedgerError(f"operation signature is invalid: {error}") from None
    if signer != actor:
        raise LedgerError(
            f"{operation.kind} operation is not signed by its actor {operation.actor} "
            "(only an account's owner can move its credits)"
        )
    return operation


def channel_id_of(ledger_id: str, payer: str, nonce: int) -> str:
    """The id of the channel opened by ``payer``'s operation ``nonce``: deterministic, so the
    payer knows it before the ledger answers, and no two opening operations share one."""
    raw = keccak256(id_bytes(ledger_id) + address_bytes(payer) + nonce.to_bytes(8, "big"))
    return "0x" + raw.hex()

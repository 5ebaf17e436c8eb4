"""The Ledger seam: accounts, channels, node stakes and a hash-chained journal.

A ledger is where credits live. Clients deposit, open one payment channel per node (the
deposit moves from the payer's balance into the channel), and sign cumulative vouchers off
the ledger; a node redeems its latest voucher, which credits it the difference from the
last redemption. Closing a channel returns the unspent deposit to the payer after a
dispute window, during which the payee can still redeem. Nodes register with a stake and
earn an uptime reward per block-hour from signed liveness records.

Invariants every backend keeps (and ``verify`` checks):

* amounts are integers in ``[0, MAX_AMOUNT]``; no balance ever goes negative;
* a channel's ``redeemed`` never exceeds its ``deposit``; ``nonce`` and ``redeemed`` only grow;
* redemption is idempotent: a voucher at or below the last redeemed nonce or amount
  credits 0 and changes nothing;
* every mutation is one atomic step that also appends one journal entry, and the journal
  is a hash chain from which every balance, channel and stake can be recomputed.

Backends: ``layerchain.ledger.sqlite.SqliteLedger`` (one file shared by processes, or
``":memory:"`` for tests); an EVM contract later, behind the same Protocol. This module
knows nothing of wallets on disk, receipts or the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_AMOUNT = 2**63 - 1  # SQLite INTEGER and msgpack int64: the largest amount anywhere

# Channel states: open -> closing (dispute window running) -> closed (deposit settled).
OPEN, CLOSING, CLOSED = "open", "closing", "closed"


@dataclass(frozen=True)
class LedgerConfig:
    """Rules of one ledger, fixed when it is created (its genesis journal entry holds them)."""

    dispute_window_s: float = 3600.0  # seconds between a close request and the refund
    reward_per_block_hour: int = 0  # credits per block served for one hour of liveness
    min_stake: int = 0  # credits a node must stake to register
    max_liveness_period_s: int = 24 * 3600  # longest period one liveness record may claim

    def to_dict(self) -> dict[str, Any]:
        return {
            "dispute_window_s": self.dispute_window_s,
            "reward_per_block_hour": self.reward_per_block_hour,
            "min_stake": self.min_stake,
            "max_liveness_period_s": self.max_liveness_period_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerConfig:
        return cls(
            dispute_window_s=float(data["dispute_window_s"]),
            reward_per_block_hour=int(data["reward_per_block_hour"]),
            min_stake=int(data["min_stake"]),
            max_liveness_period_s=int(data["max_liveness_period_s"]),
        )


@dataclass(frozen=True)
class AccountInfo:
    """One address's credits: spendable ``balance`` and ``staked`` (locked by registration)."""

    address: str
    balance: int
    staked: int = 0


@dataclass(frozen=True)
class Channel:
    """A payment channel from ``payer`` to ``payee`` holding ``deposit`` credits."""

    channel_id: str  # "0x" + 64 hex digits (a bytes32 on a contract)
    payer: str  # checksummed address that signs vouchers
    payee: str  # checksummed address that redeems them
    deposit: int  # credits locked at opening
    redeemed: int = 0  # cumulative amount paid to the payee so far
    nonce: int = 0  # nonce of the last redeemed voucher (0: none yet)
    state: str = OPEN  # OPEN, CLOSING or CLOSED
    closes_at: float | None = None  # unix seconds when a CLOSING channel may be settled
    refunded: int = 0  # credits returned to the payer when CLOSED

    @property
    def unspent(self) -> int:
        return self.deposit - self.redeemed


@dataclass(frozen=True)
class NodeInfo:
    """A registered node: its stake and the end of the last rewarded liveness period."""

    address: str
    stake: int
    rewarded_until: int = 0  # unix seconds; a new liveness record must start at or after it
    rewards: int = 0  # total uptime rewards paid


@dataclass(frozen=True)
class JournalEntry:
    """One journal row: ``hash = sha256(prev_hash | seq | kind | payload_json)`` (hex)."""

    seq: int  # 1-based; entry 1 is the genesis entry holding the LedgerConfig
    kind: str  # genesis, deposit, withdraw, open_channel, redeem, close_request, close, ...
    payload: str  # canonical JSON (sorted keys, no spaces) exactly as hashed
    prev_hash: str  # hash of entry seq-1, or 64 zeros for the genesis entry
    hash: str


@dataclass(frozen=True)
class VerifyReport:
    """What ``Ledger.verify`` found: ``ok`` is True only when ``problems`` is empty."""

    entries: int  # journal entries checked
    head_hash: str  # hash of the last entry
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


class Ledger(Protocol):
    """The seam every backend implements. Amounts are ints; addresses are ``0x`` hex strings.

    Errors: InsufficientFunds (a balance too small), InvalidVoucher (bad signature, amount
    above the deposit, malformed), ChannelError (unknown, closed, window still running),
    LedgerError (bad argument, unreachable or corrupt ledger).
    """

    config: LedgerConfig

    def balance(self, address: str) -> int:
        """Spendable credits of ``address`` (0 for an unknown address)."""

    def account(self, address: str) -> AccountInfo:
        """Balance and stake of ``address``."""

    def accounts(self) -> list[AccountInfo]:
        """Every address the ledger has seen, sorted by address."""

    def deposit(self, address: str, amount: int) -> int:
        """Add ``amount`` credits from outside the ledger; return the new balance."""

    def withdraw(self, address: str, amount: int) -> int:
        """Take ``amount`` credits out of the ledger; return the new balance."""

    def open_channel(self, payer: str, payee: str, deposit: int) -> str:
        """Move ``deposit`` from the payer's balance into a new channel; return its id."""

    def channel(self, channel_id: str) -> Channel:
        """The channel's current state; ChannelError if unknown."""

    def channels(self, *, payer: str | None = None, payee: str | None = None) -> list[Channel]:
        """Channels, optionally filtered by payer and/or payee, oldest first."""

    def redeem(self, voucher_bytes: bytes) -> int:
        """Credit the payee ``cumulative - redeemed``; return it (0 if nothing new)."""

    def close_channel(self, channel_id: str) -> int:
        """Start (OPEN) or finish (CLOSING, window over) closing; return the refund (or 0)."""

    def register_node(self, address: str, stake: int) -> NodeInfo:
        """Stake ``stake`` credits from the node's balance (added to any earlier stake)."""

    def node(self, address: str) -> NodeInfo:
        """A registered node; LedgerError if not registered."""

    def reward_uptime(self, record_bytes: bytes) -> int:
        """Pay a signed liveness record: reward_per_block_hour * blocks * hours; return it."""

    def journal(self, *, after: int = 0, limit: int | None = None) -> list[JournalEntry]:
        """Journal entries with ``seq > after``, oldest first."""

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last journal entry."""

    def verify(self) -> VerifyReport:
        """Re-hash the whole journal, replay it, and compare with the current state."""

    def close(self) -> None:
        """Release the connection; the ledger object is unusable afterwards."""

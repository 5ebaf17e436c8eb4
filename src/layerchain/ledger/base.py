"""The Ledger seam: accounts, channels, node stakes and a hash-chained journal.

A ledger is where credits live. Clients deposit, open one payment channel per node (the
deposit moves from the payer's balance into the channel), and sign cumulative vouchers off
the ledger; a node redeems its latest voucher, which credits it the difference from the
last redemption. Closing a channel returns the unspent deposit to the payer after a
dispute window, during which the payee can still redeem. Nodes register a stake and the
blocks they serve, and earn an uptime reward for time the ledger can vouch for; a node
whose cheating an accuser proves with evidence (``evidence.py``) loses its stake to a
``slash``, and an accuser whose evidence proves nothing loses its bond.

Authority: every change of an account is a signed ``Operation`` of its owner
(``operations.py``); the convenience methods below take the owner's ``Signer`` and sign
one. A voucher is the payer's signature, so anybody may submit it (it only pays the payee).

Time: the ledger keeps its own clock. Every entry is stamped by the backend, never by the
caller, and stamps never go backwards; dispute windows and reward periods are measured on it.

Invariants every backend keeps (and ``verify`` checks):

* amounts are integers in ``[0, MAX_AMOUNT]``; no balance ever goes negative;
* a channel's ``redeemed`` never exceeds its ``deposit``; ``nonce`` and ``redeemed`` only grow;
* redemption is idempotent: a voucher at or below the last redeemed nonce or amount
  credits 0 and changes nothing;
* an operation nonce is used once per actor;
* every mutation is one atomic step that also appends one journal entry, and the journal
  is a hash chain from which every balance, channel and stake can be recomputed.

Backends (``backend``): ``"sqlite"``, ``layerchain.ledger.sqlite.SqliteLedger`` (one file
shared by processes, or ``":memory:"`` for tests), and ``"evm"``,
``layerchain.ledger.evm.EvmLedger`` (the ``LayerchainLedger`` contract on an EVM chain:
the owner signs a transaction instead of an operation, the contract's events are the
journal, gas is what a mutation costs). Vouchers are EIP-712 under the ledger's
``domain_separator`` on both (``records.py``), so a voucher is worth something on one
ledger only. This module knows nothing of wallets on disk, receipts or the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

from layerchain.errors import LedgerError
from layerchain.ledger.signatures import Signer

MAX_AMOUNT = 2**63 - 1  # SQLite INTEGER and msgpack int64: the largest amount anywhere
MAX_BLOCKS = 2**32 - 1  # the most blocks an operation (uint32) or the contract can name
YEAR_S = 365 * 24 * 3600  # seconds of the year a stake yield is quoted over

# Channel states: open -> closing (dispute window running) -> closed (deposit settled).
OPEN, CLOSING, CLOSED = "open", "closing", "closed"


@dataclass(frozen=True)
class LedgerConfig:
    """Rules of one ledger, fixed when it is created (its genesis journal entry holds them)."""

    dispute_window_s: float = 3600.0  # seconds between a close request and the refund
    reward_per_block_hour: int = 0  # credits per registered block per hour of attested uptime
    min_stake: int = 0  # credits a node must stake to register
    max_reward_period_s: int = 24 * 3600  # longest period one reward claim may cover
    # Slashing (``ledger/evidence.py``): an accuser must hold ``accuser_bond`` credits to
    # accuse; evidence that does not prove cheating pays the bond to the accused. Evidence
    # that does takes ``slash_bps`` / 10_000 of the convicted node's stake, of which
    # ``slash_reward_bps`` / 10_000 goes to the accuser and the rest is burned.
    accuser_bond: int = 1000  # credits
    slash_bps: int = 10_000  # basis points of the stake taken (10_000: all of it)
    slash_reward_bps: int = 5_000  # basis points of the slashed credits paid to the accuser
    # Uptime rewards are bounded by what paying oneself cannot fake (``journal._claim_reward``):
    # a registration names at most ``max_blocks`` blocks, and a claim pays at most
    # ``stake_yield_bps`` / 10_000 of the node's stake per year (YEAR_S) of the period, the
    # yield on capital a slash can take. None: no yield cap, only for ledgers created before
    # it (their genesis has no such key) or whose creator trusts every node; a contract
    # always has one.
    max_blocks: int = 1024  # blocks one node may register
    stake_yield_bps: int | None = 1_000  # basis points of the stake per year (1_000: 10 %)

    def __post_init__(self) -> None:
        if type(self.accuser_bond) is not int or not 0 <= self.accuser_bond <= MAX_AMOUNT:
            raise LedgerError(f"accuser_bond must be an integer in [0, 2^63), got {self.accuser_bond!r}")
        for name in ("slash_bps", "slash_reward_bps", "stake_yield_bps"):
            value = getattr(self, name)
            if name == "stake_yield_bps" and value is None:
                continue
            if type(value) is not int or not 0 <= value <= 10_000:
                raise LedgerError(f"{name} must be an integer in [0, 10000], got {value!r}")
        if type(self.max_blocks) is not int or not 0 < self.max_blocks <= MAX_BLOCKS:
            raise LedgerError(f"max_blocks must be an integer in [1, 2^32), got {self.max_blocks!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "dispute_window_s": self.dispute_window_s,
            "reward_per_block_hour": self.reward_per_block_hour,
            "min_stake": self.min_stake,
            "max_reward_period_s": self.max_reward_period_s,
            "accuser_bond": self.accuser_bond,
            "slash_bps": self.slash_bps,
            "slash_reward_bps": self.slash_reward_bps,
            "max_blocks": self.max_blocks,
            "stake_yield_bps": self.stake_yield_bps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerConfig:
        """The config a genesis entry holds; slashing fields default for ledgers created
        before slashing existed (they had no slash entries, so the defaults change nothing
        that happened). Ledgers created before the reward bounds get none (``MAX_BLOCKS``,
        no yield cap): their registrations and claims replay as they were recorded."""
        defaults = cls()
        stake_yield_bps = data.get("stake_yield_bps")
        return cls(
            dispute_window_s=float(data["dispute_window_s"]),
            reward_per_block_hour=int(data["reward_per_block_hour"]),
            min_stake=int(data["min_stake"]),
            max_reward_period_s=int(data["max_reward_period_s"]),
            accuser_bond=int(data.get("accuser_bond", defaults.accuser_bond)),
            slash_bps=int(data.get("slash_bps", defaults.slash_bps)),
            slash_reward_bps=int(data.get("slash_reward_bps", defaults.slash_reward_bps)),
            max_blocks=int(data.get("max_blocks", MAX_BLOCKS)),
            stake_yield_bps=None if stake_yield_bps is None else int(stake_yield_bps),
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
    """A registered node, and what the ledger itself saw of its work (ledger-clock seconds).

    The reward for ``[rewarded_until, served_at)`` is bounded by the blocks registered,
    that period's length, ``earned`` and the yield of ``stake`` over it: nothing here comes
    from the node's own word, and only the stake is what paying oneself cannot fake."""

    address: str
    stake: int
    blocks: int = 0  # blocks the node registered to serve
    registered_at: float = 0.0  # when it first registered
    rewarded_until: float = 0.0  # end of the last rewarded period (registration at first)
    served_at: float = 0.0  # the last time a client's voucher paid it (0: never)
    earned: int = 0  # credits redeemed from clients' vouchers since the last reward
    rewards: int = 0  # total uptime rewards paid


@dataclass(frozen=True)
class EvidenceVerdict:
    """What recomputing one piece of evidence found (``ledger/evidence.check_evidence``).

    Guilty only when every signature and chain link holds and the accused receipt's
    commitment is further than ``tolerance`` from what the model computes on the same
    inputs; a verdict is not guilty with the ``reason`` otherwise. The ledger records it
    with the accuser's signed ``slash`` operation; ``receipt`` lets a replay check the
    accused's signature without the model."""

    evidence_hash: str  # "0x" + 64 hex digits: what the accuser signed (Evidence.digest)
    accuser: str  # checksummed address that signed the evidence
    accused: str  # checksummed address of the node that signed the receipts ("" if none)
    step: int  # the disputed step k
    guilty: bool
    distance: float  # commitment_distance of step k (inf: no valid commitment; 0.0 unchecked)
    tolerance: float  # AUDIT_TOLERANCE the distance was compared with
    reason: str  # one line: why guilty or not
    receipt: bytes = b""  # the accused's SignedReceipt wire bytes of step k (b"": unreadable)


@dataclass(frozen=True)
class SlashResult:
    """What a ``slash`` entry did: a conviction moves stake, a false accusation a bond."""

    evidence_hash: str  # "0x" + 64 hex digits
    accuser: str
    accused: str
    guilty: bool
    slashed: int = 0  # credits taken from the accused's stake (guilty)
    reward: int = 0  # of which paid to the accuser
    burned: int = 0  # of which destroyed
    bond: int = 0  # credits taken from the accuser and paid to the accused (not guilty)
    seq: int = 0  # the journal entry that recorded it


@dataclass(frozen=True)
class JournalEntry:
    """One journal row: ``hash = sha256(prev_hash | seq | kind | payload_json)`` (hex)."""

    seq: int  # 1-based; entry 1 is the genesis entry holding the LedgerConfig
    kind: str  # genesis, redeem, or an operation kind (deposit, open_channel, ...)
    payload: str  # canonical JSON (sorted keys, no spaces) exactly as hashed
    prev_hash: str  # hash of entry seq-1, or 64 zeros for the genesis entry
    hash: str


@dataclass(frozen=True)
class VerifyReport:
    """What ``Ledger.verify`` found: ``ok`` is True only when ``problems`` is empty.

    What an ok report proves: entries ``1..entries`` form an unbroken hash chain; replaying
    them under the ledger's rules (every operation signed by its owner and used once,
    every voucher by its payer, ledger time never going backwards) gives exactly the stored
    balances, channels and stakes; and entries ``1..anchored_seq`` are the ones the
    ``anchor_signers`` saw when they signed their checkpoints. Entries after
    ``anchored_seq`` are not anchored: whoever can write the file could rewrite them."""

    entries: int  # journal entries checked
    head_hash: str  # hash of the last entry
    problems: tuple[str, ...] = field(default_factory=tuple)
    anchored_seq: int = 0  # entries 1..anchored_seq match a signed checkpoint
    anchor_signers: tuple[str, ...] = ()  # addresses whose checkpoints matched

    @property
    def ok(self) -> bool:
        return not self.problems


class Ledger(Protocol):
    """The seam every backend implements. Amounts are ints; addresses are ``0x`` hex strings.

    Mutations take the owner's ``Signer`` and submit a signed operation (``submit`` takes
    one signed elsewhere). Errors: InsufficientFunds (a balance too small), InvalidVoucher
    (bad signature, amount above the deposit, malformed), ChannelError (unknown, closed,
    window still running), LedgerError (bad argument or signature, replayed or expired
    operation, unreachable or corrupt ledger).
    """

    config: LedgerConfig
    ledger_id: str  # "0x" + 64 hex digits, fixed at creation; operations name it
    backend: str  # "sqlite" | "evm"
    domain_separator: bytes  # 32 bytes: the EIP-712 domain vouchers of this ledger are signed in
    # Gas of each transaction sent by this object, by kind ("deposit", "open_channel",
    # "redeem", "redeem_many", "close_channel", ...), in order; always empty off-chain.
    gas_used: dict[str, list[int]]

    def now(self) -> float:
        """The ledger's clock (unix seconds, never going backwards)."""

    def balance(self, address: str) -> int:
        """Spendable credits of ``address`` (0 for an unknown address)."""

    def account(self, address: str) -> AccountInfo:
        """Balance and stake of ``address``."""

    def accounts(self) -> list[AccountInfo]:
        """Every address the ledger has seen, sorted by address."""

    def submit(self, operation: bytes) -> int:
        """Apply one signed operation; return its result (balance, refund, reward...).
        LedgerError on a chain, where the owner signs a transaction instead."""

    def deposit(self, owner: Signer, amount: int) -> int:
        """Add ``amount`` credits to the owner's account (SQLite: minted test credits; EVM:
        ``amount x creditWei`` wei of the owner's ether); return the new balance."""

    def withdraw(self, owner: Signer, amount: int) -> int:
        """Take ``amount`` credits out of the owner's account (EVM: as ether to the owner);
        return the new balance."""

    def open_channel(self, payer: Signer, payee: str, deposit: int) -> str:
        """Move ``deposit`` from the payer's balance into a new channel; return its id."""

    def top_up(self, payer: Signer, channel_id: str, amount: int) -> int:
        """Add ``amount`` to an open channel's deposit; return the new deposit."""

    def channel(self, channel_id: str) -> Channel:
        """The channel's current state; ChannelError if unknown."""

    def channels(self, *, payer: str | None = None, payee: str | None = None) -> list[Channel]:
        """Channels, optionally filtered by payer and/or payee, oldest first."""

    def redeem(self, voucher_bytes: bytes) -> int:
        """Credit the payee ``cumulative - redeemed``; return it (0 if nothing new)."""

    def redeem_many(self, vouchers: Sequence[bytes]) -> list[int]:
        """Redeem every voucher in one atomic step (one transaction on a chain: a node
        redeems all its channels for the gas of one); return the credits of each, in order.
        A stale voucher credits 0; a bad one (signature, amount above the deposit, closed
        or unknown channel) raises and nothing of the batch is applied."""

    def close_channel(self, payer: Signer, channel_id: str) -> int:
        """Start (OPEN) or finish (CLOSING, window over) closing; return the refund (or 0)."""

    def register_node(self, node: Signer, stake: int, blocks: int) -> NodeInfo:
        """Stake ``stake`` more credits and register ``blocks`` served, at most
        ``config.max_blocks`` (stake may be 0 once registered, to change the blocks). New
        blocks, or stake added under a yield cap, restart the reward period."""

    def node(self, address: str) -> NodeInfo:
        """A registered node; LedgerError if not registered."""

    def claim_reward(self, node: Signer) -> int:
        """Pay the node's uptime reward since its last one, as far as the ledger saw it work:
        ``journal.reward_due``, at most the stake's yield (``config.stake_yield_bps``) for
        the period. LedgerError when none is due (no client paid it since, or it rounds to 0)."""

    def slash(self, accuser: Signer, verdict: EvidenceVerdict) -> SlashResult:
        """Record ``verdict`` under the accuser's signed ``slash`` operation: guilty takes
        the accused's stake (a receipt convicts once), not guilty pays the accuser's bond to
        the accused. InsufficientFunds if the accuser holds less than the bond. Callers get
        the verdict from ``check_evidence``; ``evidence.submit_evidence`` does both. On a
        chain the verdict must also carry the deployment's referees' signatures (the
        contract cannot run the model): LedgerError when the ledger holds no referee key."""

    def journal(self, *, after: int = 0, limit: int | None = None) -> list[JournalEntry]:
        """Journal entries with ``seq > after``, oldest first."""

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last journal entry."""

    def checkpoint(self, signer: Signer) -> bytes:
        """The current head signed by ``signer`` (``checkpoints.py``), to keep elsewhere."""

    def verify(self, checkpoints: Iterable[bytes] = ()) -> VerifyReport:
        """Re-hash and replay the whole journal, compare with the current state, and check
        the journal against ``checkpoints`` kept outside it."""

    def close(self) -> None:
        """Release the connection; the ledger object is unusable afterwards."""

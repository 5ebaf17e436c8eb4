"""The ledger's rules as pure transitions, and the hash chain of journal entries.

Every mutation of a ledger is one journal entry ``(seq, kind, payload)``. ``apply`` is the
one place the rules live: it takes a ``State`` (the rows an entry may touch) and an entry,
checks the entry is allowed, mutates the state, and returns the entry's result (the new
balance, the credited amount, the refund...). A backend runs ``apply`` on the rows it
loaded inside its transaction and writes them back; ``replay`` runs it over the whole
journal from an empty state, which is how ``verify`` recomputes every balance, channel
and stake and compares them with what the backend stores. ``apply`` dispatches on the
kind through ``RULES``, one small function per kind.

Entries (payload keys; ``ts`` is the ledger's clock, unix seconds, on every entry)::

    genesis        config, ledger_id, version, vouchers ("eip712"; absent on ledgers created
                   before EIP-712 vouchers, whose old redeem entries hold EIP-191 ones)
    redeem         voucher (hex wire bytes, signature re-checked under the ledger's
                   domain, ``records.ledger_domain(ledger_id)``), credited
    deposit        op (hex signed operation, signature re-checked on replay), balance
    withdraw       op, balance
    open_channel   op, channel_id
    top_up         op, deposit
    close_channel  op, closes_at (a close request) or refunded (the close)
    register_node  op, stake
    claim_reward   op, amount, period (seconds rewarded)
    slash          op, verdict ("guilty" | "not_guilty"), receipt (hex: the accused's signed
                   receipt of the disputed step, "" if unreadable), step, distance,
                   tolerance, reason; then slashed, reward, burned (guilty) or bond

A ``slash`` entry records a verdict of ``ledger/evidence.check_evidence``, which needs the
model; a replay re-checks the accuser's operation (the evidence hash is its ``channel_id``),
the accused's signature on the receipt, the one conviction per receipt and the arithmetic,
not the recomputation: whoever doubts a verdict re-checks the evidence file with that hash.

Every operation entry must be signed by its actor, name this ledger, be submitted before
its deadline and carry a nonce its actor never used. ``ts`` never goes backwards.

``hash = sha256(prev_hash | seq | kind | payload)`` in hex, ``payload`` being canonical
JSON (sorted keys, no spaces); the genesis entry's ``prev_hash`` is 64 zeros.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Callable, Iterable

from layerchain.errors import (
    ChannelError,
    InsufficientFunds,
    InvalidVoucher,
    LayerchainError,
    LedgerError,
)
from layerchain.ledger.base import (
    CLOSED,
    CLOSING,
    MAX_AMOUNT,
    OPEN,
    YEAR_S,
    AccountInfo,
    Channel,
    JournalEntry,
    LedgerConfig,
    NodeInfo,
)
from layerchain.ledger.operations import ZERO_ADDRESS, Operation, channel_id_of, verify_operation
from layerchain.ledger.records import decode_any_voucher, ledger_domain, verify_voucher

GENESIS_PREV_HASH = "0" * 64
JOURNAL_VERSION = 2  # 1: unsigned operations, caller-stamped time (no longer accepted)
VOUCHER_SCHEME = "eip712"  # genesis "vouchers" of ledgers that only ever took EIP-712 vouchers


def canonical_payload(payload: dict[str, Any]) -> str:
    """The exact JSON text that is stored and hashed."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(prev_hash: str, seq: int, kind: str, payload: str) -> str:
    """Hex sha256 linking an entry to its predecessor."""
    return hashlib.sha256(f"{prev_hash}|{seq}|{kind}|{payload}".encode()).hexdigest()


@dataclass
class State:
    """Rows of a ledger (all of them in a replay, the touched ones in a transaction).

    Absent accounts have balance 0; absent channels and nodes do not exist; ``nonces``
    holds the ``(actor, nonce)`` pairs already used (in a transaction: the one asked about,
    when used); ``clock`` is the stamp of the last entry.
    """

    config: LedgerConfig | None = None
    ledger_id: str = ""
    clock: float = 0.0
    balances: dict[str, int] = field(default_factory=dict)
    channels: dict[str, Channel] = field(default_factory=dict)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    nonces: set[tuple[str, int]] = field(default_factory=set)
    convicted: set[str] = field(default_factory=set)  # "0x" receipt hashes that slashed a stake
    legacy_vouchers: bool = False  # a ledger from before EIP-712 vouchers: replay accepts v1 ones

    def balance(self, address: str) -> int:
        return self.balances.get(address, 0)

    def accounts(self) -> list[AccountInfo]:
        addresses = sorted(set(self.balances) | set(self.nodes))
        return [
            AccountInfo(a, self.balance(a), self.nodes[a].stake if a in self.nodes else 0)
            for a in addresses
        ]

    def channel(self, channel_id: str) -> Channel:
        if channel_id not in self.channels:
            raise ChannelError(f"unknown channel {channel_id[:10]}...")
        return self.channels[channel_id]


def positive_amount(value: Any, what: str = "amount") -> int:
    """``value`` if it is an int in ``[1, MAX_AMOUNT]``; LedgerError otherwise."""
    if type(value) is not int or not 0 < value <= MAX_AMOUNT:
        raise LedgerError(f"{what} must be a positive integer below 2^63, got {value!r}")
    return value


def _credit(state: State, address: str, amount: int) -> int:
    new = state.balance(address) + amount
    if new > MAX_AMOUNT:
        raise LedgerError(f"balance of {address} would overflow 2^63")
    state.balances[address] = new
    return new


def _debit(state: State, address: str, amount: int, why: str) -> int:
    have = state.balance(address)
    if have < amount:
        raise InsufficientFunds(f"{address} has {have} credits, {why} needs {amount}")
    state.balances[address] = have - amount
    return have - amount


def _record(payload: dict[str, Any], key: str, value: Any) -> None:
    """Put an entry's computed result in its payload; in a replay it must equal the recorded one.

    Only called once every check of the entry has passed, so a rejected entry leaves the
    payload as it was.
    """
    if key in payload and payload[key] != value:
        raise LedgerError(f"recorded {key} {payload[key]} but the rules give {value}")
    payload[key] = value


def _payers_channel(state: State, op: Operation) -> Channel:
    channel = state.channel(op.channel_id)
    if channel.payer != op.actor:
        raise ChannelError(
            f"channel {channel.channel_id[:10]}... is paid by {channel.payer}, not {op.actor}"
        )
    return channel


# -- one rule per kind: (state, config, op, ts, payload) -> result ------------------------


def _deposit(state: State, config: LedgerConfig, op: Operation, ts: float, payload: dict[str, Any]) -> int:
    # The embedded ledger's credit source: the signer mints test credits to itself.
    balance = _credit(state, op.actor, positive_amount(op.amount))
    _record(payload, "balance", balance)
    return balance


def _withdraw(state: State, config: LedgerConfig, op: Operation, ts: float, payload: dict[str, Any]) -> int:
    amount = positive_amount(op.amount)
    balance = _debit(state, op.actor, amount, f"withdrawing {amount}")
    _record(payload, "balance", balance)
    return balance


def _open_channel(state: State, config: LedgerConfig, op: Operation, ts: float, payload: dict[str, Any]) -> int:
    deposit = positive_amount(op.amount, "channel deposit")
    if op.counterparty == op.actor:
        raise ChannelError("a channel's payer and payee must differ")
    if int(op.counterparty, 16) == 0:
        raise ChannelError("a channel needs a payee")
    channel_id = channel_id_of(state.ledger_id, op.actor, op.nonce)
    if channel_id in state.channels:
        raise ChannelError(f"channel {channel_id[:10]}... already exists")
    _debit(state, op.actor, deposit, "the channel deposit")
    _record(payload, "channel_id", channel_id)
    state.channels[channel_id] = Channel(channel_id, op.actor, op.counterparty, deposit)
    return deposit


def _top_up(state: State, config: LedgerConfig, op: Operation, ts: float, payload: dict[str, Any]) -> int:
    amount = positive_amount(op.amount, "top-up")
    channel = _payers_channel(state, op)
    if channel.state != OPEN:
        raise ChannelError(f"channel {channel.channel_id[:10]}... is {channel.state}")
    deposit = channel.deposit + amount
    if deposit > MAX_AMOUNT:
        raise LedgerError("channel deposit would overflow 2^63")
    _debit(state, op.actor, amount, "the top-up")
    _record(payload, "deposit", deposit)
    state.channels[channel.channel_id] = replace(channel, deposit=deposit)
    return deposit


def _close_channel(state: State, config: LedgerConfig, op: Operation, ts: float, payload: dict[str, Any]) -> int:
    channel = _payers_channel(state, op)
    if channel.state == OPEN and config.dispute_window_s > 0:
        closes_at = ts + config.dispute_window_s
        _record(payload, "closes_at", closes_at)
        state.channels[channel.channel_id] = replace(channel, state=CLOSING, closes_at=closes_at)
        return 0
    if channel.state == CLOSED:
        raise ChannelError(f"channel {channel.channel_id[:10]}... is already closed")
    if channel.closes_at is not None and ts < channel.closes_at:
        raise ChannelError(
            f"channel {channel.channel_id[:10]}... is in its dispute window for another "
            f"{channel.closes_at - ts:.0f} s"
        )
    refund = channel.unspent
    _record(payload, "refunded", refund)
    _credit(state, channel.payer, refund)
    state.channels[channel.channel_id] = replace(
        channel, state=CLOSED, refunded=refund, closes_at=channel.closes_at or ts
    )
    return refund


def _register_node(state: State, config: LedgerConfig, op: Operation, ts: float, payload: dict[str, Any]) -> int:
    old = state.nodes.get(op.actor)
    if op.amount == 0 and old is None:
        raise LedgerError("a node registers with a positive stake")
    if op.blocks <= 0:
        raise LedgerError("a node registers the blocks it serves (at least 1)")
    if op.blocks > config.max_blocks:
        raise LedgerError(
            f"a node registers at most {config.max_blocks} blocks (the ledger's max_blocks), "
            f"not {op.blocks}"
        )
    stake = (old.stake if old else 0) + op.amount
    if stake < config.min_stake:
        raise LedgerError(f"a node must stake at least {config.min_stake} credits")
    if op.amount:
        _debit(state, op.actor, op.amount, "the stake")
    _record(payload, "stake", stake)
    if old is None:
        state.nodes[op.actor] = NodeInfo(op.actor, stake, op.blocks, ts, ts)
    elif op.blocks == old.blocks and not restarts_reward_period(config, op.amount):
        state.nodes[op.actor] = replace(old, stake=stake)
    else:  # new blocks or stake count from now: the unclaimed period so far is forfeited
        state.nodes[op.actor] = replace(
            old, stake=stake, blocks=op.blocks, rewarded_until=ts, earned=0
        )
    return stake


def restarts_reward_period(config: LedgerConfig, added_stake: int) -> bool:
    """Whether adding ``added_stake`` to a registered node restarts its reward period.

    Under a stake-yield cap, yes for any stake added: the period's yield is then on stake
    held the whole period (capital staked just before a claim and unstaked after it would
    earn a whole period's yield for a moment's lock-up otherwise). Without the cap (ledgers
    created before it) stake never did. Pure; the contract has the same rule."""
    return added_stake > 0 and config.stake_yield_bps is not None


def stake_yield_cap(config: LedgerConfig, stake: int, seconds: float) -> int | None:
    """The most a reward for ``seconds`` may pay a node staking ``stake`` credits:
    ``stake x stake_yield_bps / 10_000 x seconds / YEAR_S``, floored, in exact arithmetic
    (as the contract computes it in uint256); None when the ledger has no yield cap. Pure."""
    if config.stake_yield_bps is None:
        return None
    return int(stake * config.stake_yield_bps * Fraction(seconds) // (10_000 * YEAR_S))


def reward_due(config: LedgerConfig, node: NodeInfo, seconds: float) -> int:
    """``min(rate x blocks x hours, earned, stake yield)`` for a period of ``seconds``
    (integer seconds on a chain: exact; the ledger clock's float seconds on SQLite, as
    recorded). Pure: ``_claim_reward`` pays it, the EVM event replay checks the contract did."""
    by_time = int(config.reward_per_block_hour * node.blocks * seconds // 3600)
    by_stake = stake_yield_cap(config, node.stake, seconds)
    return min(by_time, node.earned, MAX_AMOUNT if by_stake is None else by_stake)


def _claim_reward(state: State, config: LedgerConfig, op: Operation, ts: float, payload: dict[str, Any]) -> int:
    """reward = min(rate x blocks x hours, earned, stake yield): hours from the last reward
    (or the registration) to the last time a client's voucher paid the node, on the ledger's
    clock, at most ``max_reward_period_s``; ``earned`` is what those vouchers paid in that
    time. ``earned`` alone bounds nothing (a node's sock puppet pays it for free: the
    credits come back to the same owner); the stake yield (``stake_yield_cap``) does: paying
    oneself extracts at most the ledger's yield on capital a slash can take."""
    node = state.nodes.get(op.actor)
    if node is None or node.stake <= 0:
        raise LedgerError(f"{op.actor} is not a registered node with a stake")
    end = min(node.served_at, node.rewarded_until + config.max_reward_period_s)
    if node.earned <= 0 or end <= node.rewarded_until:
        raise LedgerError(
            f"no reward due: no client has paid {op.actor} since its last reward "
            "(uptime counts only as far as clients' vouchers attest it)"
        )
    seconds = end - node.rewarded_until
    amount = reward_due(config, node, seconds)
    if amount <= 0:  # the period keeps growing until it is worth a credit
        raise LedgerError(
            f"no reward due yet: {seconds:.0f} s x {node.blocks} blocks on a stake of "
            f"{node.stake} rounds to 0"
        )
    _record(payload, "amount", amount)
    _record(payload, "period", seconds)
    _credit(state, op.actor, amount)
    state.nodes[op.actor] = replace(
        node, rewarded_until=end, earned=0, rewards=node.rewards + amount
    )
    return amount


def receipt_signer(receipt_hex: str) -> tuple[str, str]:
    """``(signer address, "0x" receipt hash)`` of a signed receipt's wire bytes (hex)."""
    # imported here: market.receipts imports the ledger package
    from layerchain.errors import InvalidReceipt
    from layerchain.ledger.signatures import BadSignature, checksum_address, recover_address_bytes
    from layerchain.market.receipts import SignedReceipt, receipt_hash

    try:
        signed = SignedReceipt.from_bytes(bytes.fromhex(receipt_hex))
        digest = receipt_hash(signed.receipt)
        signer = checksum_address(recover_address_bytes(digest, signed.signature))
    except (InvalidReceipt, BadSignature, ValueError) as error:
        raise LedgerError(f"the slash entry's receipt is not a signed receipt ({error})") from None
    if signer != signed.receipt.node_address:
        raise LedgerError("the slash entry's receipt is not signed by the node it names")
    return signer, "0x" + digest.hex()


def _slash(state: State, config: LedgerConfig, op: Operation, ts: float, payload: dict[str, Any]) -> int:
    """A verdict on the accuser's evidence (``ledger/evidence.py``). Guilty: the accused's
    stake loses ``slash_bps``, ``slash_reward_bps`` of it to the accuser, the rest burned;
    a receipt convicts once. Not guilty: the accuser's bond goes to the accused (the
    receipt's signer; the node the accuser named when no receipt is valid; burned if none). Either way the accuser must hold the bond."""
    verdict, receipt = payload.get("verdict"), payload.get("receipt")
    if verdict not in ("guilty", "not_guilty") or not isinstance(receipt, str):
        raise LedgerError("a slash operation is recorded with its verdict (Ledger.slash)")
    bond = config.accuser_bond
    if state.balance(op.actor) < bond:
        raise InsufficientFunds(
            f"{op.actor} has {state.balance(op.actor)} credits; an accusation needs a bond of {bond}"
        )
    accused, receipt_id = receipt_signer(receipt) if receipt else (op.counterparty, "")
    if accused != op.counterparty:
        raise LedgerError(f"the slash operation accuses {op.counterparty}, the receipt is {accused}'s")
    if verdict == "not_guilty":  # without a valid receipt: the node the accuser named
        _debit(state, op.actor, bond, "the accusation's bond")
        _record(payload, "bond", bond)
        if accused != ZERO_ADDRESS:
            _credit(state, accused, bond)
        return bond
    if not receipt:
        raise LedgerError("a guilty verdict names the accused's receipt")
    if receipt_id in state.convicted:
        raise LedgerError(f"receipt {receipt_id[:10]}... already convicted its node (evidence used twice)")
    node = state.nodes.get(accused)
    if node is None or node.stake <= 0:
        raise LedgerError(f"{accused} has no stake to slash")
    slashed = node.stake * config.slash_bps // 10_000
    reward = slashed * config.slash_reward_bps // 10_000
    _record(payload, "slashed", slashed)
    _record(payload, "reward", reward)
    _record(payload, "burned", slashed - reward)
    state.nodes[accused] = replace(node, stake=node.stake - slashed)
    _credit(state, op.actor, reward)
    state.convicted.add(receipt_id)
    return slashed


OperationRule = Callable[[State, LedgerConfig, Operation, float, dict[str, Any]], int]
RULES: dict[str, OperationRule] = {
    "deposit": _deposit,
    "withdraw": _withdraw,
    "open_channel": _open_channel,
    "top_up": _top_up,
    "close_channel": _close_channel,
    "register_node": _register_node,
    "claim_reward": _claim_reward,
    "slash": _slash,
}


def _redeem(state: State, config: LedgerConfig, ts: float, payload: dict[str, Any]) -> int:
    data = bytes.fromhex(payload["voucher"])
    voucher, _, _ = decode_any_voucher(data)
    channel = state.channel(voucher.channel_id)
    # signature under this ledger's domain, nonce, monotone, <= deposit, not closed
    verify_voucher(data, channel, ledger_domain(state.ledger_id), legacy=state.legacy_vouchers)
    credited = voucher.cumulative_amount - channel.redeemed
    if credited <= 0:
        raise InvalidVoucher("voucher credits nothing new")
    _record(payload, "credited", credited)
    _credit(state, channel.payee, credited)
    state.channels[channel.channel_id] = replace(
        channel, redeemed=voucher.cumulative_amount, nonce=voucher.nonce
    )
    node = state.nodes.get(channel.payee)
    if node is not None:  # a client's signature attests the node worked until now
        state.nodes[channel.payee] = replace(
            node, served_at=ts, earned=min(MAX_AMOUNT, node.earned + credited)
        )
    return credited


def _genesis(state: State, payload: dict[str, Any]) -> int:
    if state.config is not None:
        raise LedgerError("a second genesis entry")
    if payload.get("version") != JOURNAL_VERSION:
        raise LedgerError(
            f"journal version {payload.get('version', 1)} is not {JOURNAL_VERSION}: this ledger "
            "was written by an older layerchain (unsigned operations)",
            hint="start a new ledger file",
        )
    state.config = LedgerConfig.from_dict(payload["config"])
    state.ledger_id = payload["ledger_id"]
    state.clock = float(payload["ts"])
    state.legacy_vouchers = payload.get("vouchers") != VOUCHER_SCHEME
    return 0


def authorize(state: State, operation: Operation, ts: float) -> None:
    """LedgerError unless ``operation`` may run now: this ledger's, before its deadline,
    with a nonce its actor has not used (the signature was checked when it was decoded)."""
    if operation.ledger_id != state.ledger_id:
        raise LedgerError(
            f"operation is for ledger {operation.ledger_id[:10]}..., not this one "
            f"({state.ledger_id[:10]}...)"
        )
    if ts > operation.deadline:
        raise LedgerError(
            f"{operation.kind} operation expired {ts - operation.deadline:.0f} s ago "
            "(deadline passed on the ledger's clock)"
        )
    if (operation.actor, operation.nonce) in state.nonces:
        raise LedgerError(
            f"{operation.kind} operation replayed: {operation.actor} already used nonce "
            f"{operation.nonce}"
        )


def apply(state: State, kind: str, payload: dict[str, Any]) -> int:
    """Apply one entry to ``state`` (mutating it) and return its result; raise if not allowed.

    Results the rules compute (``credited``, ``closes_at``, ``refunded``, ``amount``...) are
    written into ``payload`` so the journal records them. Every check of an entry runs
    before its first mutation, so a refused entry leaves state and payload unchanged.
    """
    if kind == "genesis":
        return _genesis(state, payload)
    config = state.config
    if config is None:
        raise LedgerError(f"{kind} entry before the genesis entry")
    ts = float(payload["ts"])
    if ts < state.clock:
        raise LedgerError(f"entry stamped {state.clock - ts:.3f} s before the entry before it")
    if kind == "redeem":
        result = _redeem(state, config, ts, payload)
    else:
        rule = RULES.get(kind)
        if rule is None:
            raise LedgerError(f"unknown journal entry kind {kind!r}")
        operation = verify_operation(bytes.fromhex(payload["op"]))
        if operation.kind != kind:
            raise LedgerError(f"a {operation.kind} operation recorded as {kind}")
        authorize(state, operation, ts)
        result = rule(state, config, operation, ts, payload)
        state.nonces.add((operation.actor, operation.nonce))
    state.clock = ts
    return result


def replay(entries: Iterable[JournalEntry]) -> tuple[State, list[str]]:
    """Re-hash and re-apply a whole journal; return the state it gives and every problem.

    Problems name the entry: a broken hash, a broken link, a gap in ``seq``, an entry the
    rules reject (forged signature, replayed operation, overdraft...). Replay continues
    past problems.
    """
    state, problems = State(), []
    prev_hash, expected_seq = GENESIS_PREV_HASH, 1
    for entry in entries:
        where = f"journal entry {entry.seq} ({entry.kind})"
        if entry.seq != expected_seq:
            problems.append(f"{where}: expected seq {expected_seq} (entries missing)")
        if entry.prev_hash != prev_hash:
            problems.append(f"{where}: prev_hash does not match the hash of the entry before")
        if entry_hash(entry.prev_hash, entry.seq, entry.kind, entry.payload) != entry.hash:
            problems.append(f"{where}: hash does not match its content (entry edited)")
        try:
            payload = json.loads(entry.payload)
            if canonical_payload(payload) != entry.payload:
                raise LedgerError("payload is not canonical JSON")
            apply(state, entry.kind, payload)
        except LayerchainError as error:
            problems.append(f"{where}: {error}")
        except (ValueError, KeyError, TypeError) as error:
            problems.append(f"{where}: unreadable payload ({error.__class__.__name__}: {error})")
        prev_hash, expected_seq = entry.hash, entry.seq + 1
    if expected_seq == 1:
        problems.append("the journal is empty (no genesis entry)")
    return state, problems


def compare(replayed: State, stored: State) -> list[str]:
    """Differences between the state the journal gives and the state a backend stores."""
    problems = []
    for address in sorted(set(replayed.balances) | set(stored.balances)):
        want, have = replayed.balance(address), stored.balance(address)
        if want != have:
            problems.append(f"balance of {address} is {have}, the journal gives {want}")
    for channel_id in sorted(set(replayed.channels) | set(stored.channels)):
        want_c, have_c = replayed.channels.get(channel_id), stored.channels.get(channel_id)
        if want_c != have_c:
            problems.append(
                f"channel {channel_id[:10]}... is stored as {have_c}, the journal gives {want_c}"
            )
    for address in sorted(set(replayed.nodes) | set(stored.nodes)):
        want_n, have_n = replayed.nodes.get(address), stored.nodes.get(address)
        if want_n != have_n:
            problems.append(f"node {address} is stored as {have_n}, the journal gives {want_n}")
    if replayed.nonces != stored.nonces:
        problems.append(
            f"{len(replayed.nonces ^ stored.nonces)} used operation nonce(s) differ from the journal's"
        )
    if replayed.convicted != stored.convicted:
        problems.append(
            f"{len(replayed.convicted ^ stored.convicted)} convicting receipt(s) differ from the journal's"
        )
    if replayed.config != stored.config:
        problems.append(f"config is stored as {stored.config}, genesis gives {replayed.config}")
    return problems

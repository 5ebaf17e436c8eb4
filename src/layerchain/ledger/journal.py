"""The ledger's rules as pure transitions, and the hash chain of journal entries.

Every mutation of a ledger is one journal entry ``(seq, kind, payload)``. ``apply`` is the
one place the rules live: it takes a ``State`` (the rows an entry may touch) and an entry,
checks the entry is allowed, mutates the state, and returns the entry's result (the new
balance, the credited amount, the refund...). A backend runs ``apply`` on the rows it
loaded inside its transaction and writes them back; ``replay`` runs it over the whole
journal from an empty state, which is how ``verify`` recomputes every balance, channel
and stake and compares them with what the backend stores.

Entries (payload keys; ``ts`` is unix seconds on every entry)::

    genesis        config
    deposit        address, amount
    withdraw       address, amount
    open_channel   channel_id, payer, payee, deposit
    redeem         channel_id, voucher (hex wire bytes, signature re-checked), credited
    close_request  channel_id, closes_at
    close          channel_id, refunded
    register_node  address, stake
    reward         address, record (hex wire bytes, signature re-checked), amount

``hash = sha256(prev_hash | seq | kind | payload)`` in hex, ``payload`` being canonical
JSON (sorted keys, no spaces); the genesis entry's ``prev_hash`` is 64 zeros.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

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
    AccountInfo,
    Channel,
    JournalEntry,
    LedgerConfig,
    NodeInfo,
)
from layerchain.ledger.records import decode_voucher, verify_liveness, verify_voucher

GENESIS_PREV_HASH = "0" * 64


def canonical_payload(payload: dict[str, Any]) -> str:
    """The exact JSON text that is stored and hashed."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(prev_hash: str, seq: int, kind: str, payload: str) -> str:
    """Hex sha256 linking an entry to its predecessor."""
    return hashlib.sha256(f"{prev_hash}|{seq}|{kind}|{payload}".encode()).hexdigest()


@dataclass
class State:
    """Rows of a ledger (all of them in a replay, the touched ones in a transaction).

    Absent accounts have balance 0; absent channels and nodes do not exist.
    """

    config: LedgerConfig | None = None
    balances: dict[str, int] = field(default_factory=dict)
    channels: dict[str, Channel] = field(default_factory=dict)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)

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


def _record(payload: dict[str, Any], key: str, value: float) -> None:
    """Put an entry's computed result in its payload; in a replay it must equal the recorded one.

    Only called once every check of the entry has passed, so a rejected entry leaves the
    payload as it was.
    """
    if key in payload and payload[key] != value:
        raise LedgerError(f"recorded {key} {payload[key]} but the rules give {value}")
    payload[key] = value


def apply(state: State, kind: str, payload: dict[str, Any]) -> int:
    """Apply one entry to ``state`` (mutating it) and return its result; raise if not allowed.

    Results the rules compute (``credited``, ``closes_at``, ``refunded``, ``amount``) are
    written into ``payload`` so the journal records them. The state and payload are left
    unchanged when this raises.
    """
    if kind == "genesis":
        if state.config is not None:
            raise LedgerError("a second genesis entry")
        state.config = LedgerConfig.from_dict(payload["config"])
        return 0
    config = state.config
    if config is None:
        raise LedgerError(f"{kind} entry before the genesis entry")
    ts = float(payload["ts"])
    if kind == "deposit":
        return _credit(state, payload["address"], positive_amount(payload["amount"]))
    if kind == "withdraw":
        amount = positive_amount(payload["amount"])
        return _debit(state, payload["address"], amount, f"withdrawing {amount}")
    if kind == "open_channel":
        channel_id, payer, payee = payload["channel_id"], payload["payer"], payload["payee"]
        deposit = positive_amount(payload["deposit"], "channel deposit")
        if channel_id in state.channels:
            raise ChannelError(f"channel {channel_id[:10]}... already exists")
        if payer == payee:
            raise ChannelError("a channel's payer and payee must differ")
        _debit(state, payer, deposit, "the channel deposit")
        state.channels[channel_id] = Channel(channel_id, payer, payee, deposit)
        return deposit
    if kind == "redeem":
        data = bytes.fromhex(payload["voucher"])
        voucher, _ = decode_voucher(data)
        channel = state.channel(voucher.channel_id)
        verify_voucher(data, channel)  # signature, nonce, monotone, <= deposit, not closed
        credited = voucher.cumulative_amount - channel.redeemed
        if credited <= 0:
            raise InvalidVoucher("voucher credits nothing new")
        _record(payload, "credited", credited)
        _credit(state, channel.payee, credited)
        state.channels[channel.channel_id] = replace(
            channel, redeemed=voucher.cumulative_amount, nonce=voucher.nonce
        )
        return credited
    if kind == "close_request":
        channel = state.channel(payload["channel_id"])
        if channel.state != OPEN:
            raise ChannelError(f"channel {channel.channel_id[:10]}... is already {channel.state}")
        closes_at = ts + config.dispute_window_s
        _record(payload, "closes_at", closes_at)
        state.channels[channel.channel_id] = replace(channel, state=CLOSING, closes_at=closes_at)
        return 0
    if kind == "close":
        channel = state.channel(payload["channel_id"])
        if channel.state != CLOSING or channel.closes_at is None:
            raise ChannelError(f"channel {channel.channel_id[:10]}... is {channel.state}")
        if ts < channel.closes_at:
            raise ChannelError(
                f"channel {channel.channel_id[:10]}... is in its dispute window for another "
                f"{channel.closes_at - ts:.0f} s"
            )
        refund = channel.unspent
        _record(payload, "refunded", refund)
        _credit(state, channel.payer, refund)
        state.channels[channel.channel_id] = replace(channel, state=CLOSED, refunded=refund)
        return refund
    if kind == "register_node":
        address = payload["address"]
        stake = positive_amount(payload["stake"], "stake")
        old = state.nodes.get(address, NodeInfo(address, 0))
        if old.stake + stake < config.min_stake:
            raise LedgerError(f"a node must stake at least {config.min_stake} credits")
        _debit(state, address, stake, "the stake")
        state.nodes[address] = replace(old, stake=old.stake + stake)
        return old.stake + stake
    if kind == "reward":
        return _apply_reward(state, config, payload, ts)
    raise LedgerError(f"unknown journal entry kind {kind!r}")


def _apply_reward(state: State, config: LedgerConfig, payload: dict[str, Any], ts: float) -> int:
    record = verify_liveness(bytes.fromhex(payload["record"]))
    node = state.nodes.get(record.node_address)
    if node is None or node.stake <= 0:
        raise LedgerError(f"{record.node_address} is not a registered node with a stake")
    if record.period_start < node.rewarded_until:
        raise LedgerError(
            f"liveness period starting at {record.period_start} overlaps one already rewarded "
            f"(until {node.rewarded_until})"
        )
    if record.period_end > ts + 60:  # a minute of clock skew
        raise LedgerError("liveness period ends in the future")
    if record.seconds > config.max_liveness_period_s:
        raise LedgerError(
            f"liveness period of {record.seconds} s exceeds {config.max_liveness_period_s} s"
        )
    amount = config.reward_per_block_hour * record.blocks * record.seconds // 3600
    _record(payload, "amount", amount)
    _credit(state, record.node_address, amount)
    state.nodes[record.node_address] = replace(
        node, rewarded_until=record.period_end, rewards=node.rewards + amount
    )
    return amount


def replay(entries: Iterable[JournalEntry]) -> tuple[State, list[str]]:
    """Re-hash and re-apply a whole journal; return the state it gives and every problem.

    Problems name the entry: a broken hash, a broken link, a gap in ``seq``, an entry the
    rules reject (forged voucher, overdraft...). Replay continues past problems.
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
    if replayed.config != stored.config:
        problems.append(f"config is stored as {stored.config}, genesis gives {replayed.config}")
    return problems

"""The EVM ledger's journal: the contract's events, hash-chained and replayed. Pure.

``journal_entries`` turns the ``LayerchainLedger`` events (oldest first) into the same
``JournalEntry`` hash chain a SQLite ledger keeps (``journal.entry_hash``): entry 1 is a
genesis entry (chain id, contract, config), then one entry per event, ``kind`` its name in
snake case, ``payload`` canonical JSON of ``{"args", "block", "log", "ts", "tx"}``.
Checkpoints (``checkpoints.py``) anchor it as they anchor a SQLite journal, so a chain
rewritten after a checkpoint (a reorg, another node at the same URL) is caught.

``replay_events`` rebuilds balances, channels, node stakes, what is unstaking, payout
addresses, the reward pool and convictions from the events alone, with the contract's
rules (``contracts/LayerchainLedger.sol``); ``EvmLedger.verify`` compares the result with
the contract's views. The events carry no signatures (the chain checked them when it ran
the transactions): a replay checks the arithmetic and the order, not the authority.

This module knows nothing of Web3, RPC or keys: events come in decoded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from layerchain.ledger.base import CLOSED, CLOSING, Channel, JournalEntry, LedgerConfig, NodeInfo
from layerchain.ledger.journal import (
    GENESIS_PREV_HASH,
    canonical_payload,
    entry_hash,
    restarts_reward_period,
    reward_due,
)

ZERO_ADDRESS = "0x" + "00" * 20
MAX_EARNED = 2**64 - 1  # the contract's node.earned saturates at uint64


@dataclass(frozen=True)
class Event:
    """One decoded contract event, where it happened and when (block timestamp, seconds)."""

    name: str  # the Solidity event name, e.g. "Redeemed"
    args: Mapping[str, int | str | bool]  # ints, checksummed addresses, "0x" hex for bytes32
    block: int
    log_index: int
    tx: str  # "0x" transaction hash
    timestamp: int

    @property
    def kind(self) -> str:
        """The journal kind: the event name in snake case ("ChannelOpened" -> "channel_opened")."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower()

    def payload(self) -> str:
        return canonical_payload(
            {"args": dict(self.args), "block": self.block, "log": self.log_index, "tx": self.tx,
             "ts": self.timestamp}
        )


def journal_entries(genesis: Mapping[str, Any], events: Sequence[Event]) -> list[JournalEntry]:
    """Genesis then one entry per event, hash-chained as ``journal.entry_hash`` chains a
    SQLite journal. Pure."""
    entries, prev = [], GENESIS_PREV_HASH
    for seq, (kind, payload) in enumerate(
        [("genesis", canonical_payload(dict(genesis)))] + [(e.kind, e.payload()) for e in events],
        start=1,
    ):
        digest = entry_hash(prev, seq, kind, payload)
        entries.append(JournalEntry(seq, kind, payload, prev, digest))
        prev = digest
    return entries


@dataclass
class ReplayState:
    """What the events say: balances, channels, nodes (with what is unstaking and the payout
    address), the reward pool and the convicted receipts."""

    balances: dict[str, int] = field(default_factory=dict)
    channels: dict[str, Channel] = field(default_factory=dict)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    unstaking: dict[str, int] = field(default_factory=dict)
    payouts: dict[str, str] = field(default_factory=dict)
    pool: int = 0
    convicted: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    def credit(self, address: str, amount: int) -> None:
        self.balances[address] = self.balances.get(address, 0) + amount

    def debit(self, address: str, amount: int, where: str) -> None:
        have = self.balances.get(address, 0)
        if have < amount:
            self.problems.append(f"{where}: {address} spends {amount} credits holding {have}")
        self.balances[address] = have - amount


def replay_events(events: Iterable[Event], config: LedgerConfig) -> ReplayState:
    """Rebuild balances, channels, stakes and the pool from the contract's events, with the
    contract's rules (``LayerchainLedger.sol``). Pure; problems name the event."""
    s = ReplayState()
    for n, e in enumerate(events, start=2):
        where, a = f"journal entry {n} ({e.kind})", e.args
        try:
            _replay_one(s, e, a, where, config)
        except (KeyError, TypeError, ValueError) as error:
            s.problems.append(f"{where}: cannot be replayed ({error.__class__.__name__}: {error})")
    return s


def _replay_one(
    s: ReplayState, e: Event, a: Mapping[str, Any], where: str, config: LedgerConfig
) -> None:
    name = e.name
    if name == "Deposited":
        s.credit(a["account"], a["credits"])
    elif name == "Withdrawn":
        s.debit(a["account"], a["credits"], where)
    elif name == "RewardsFunded":
        s.pool += a["credits"]
    elif name == "ChannelOpened":
        s.debit(a["payer"], a["deposit"], where)
        s.channels[a["id"]] = Channel(a["id"], a["payer"], a["payee"], a["deposit"])
    elif name == "ToppedUp":
        c = s.channels[a["id"]]
        s.debit(c.payer, a["amount"], where)
        s.channels[c.channel_id] = replace(c, deposit=c.deposit + a["amount"])
    elif name == "Redeemed":
        c = s.channels[a["id"]]
        if a["credited"] != a["cumulativeAmount"] - c.redeemed or a["cumulativeAmount"] > c.deposit:
            s.problems.append(f"{where}: credits {a['credited']} on a channel that had redeemed "
                              f"{c.redeemed} of {c.deposit}")
        s.channels[c.channel_id] = replace(c, redeemed=a["cumulativeAmount"], nonce=a["nonce"])
        node = s.nodes.get(c.payee)
        if node is not None:
            s.nodes[c.payee] = replace(node, served_at=float(e.timestamp),
                                       earned=min(MAX_EARNED, node.earned + a["credited"]))
        s.credit(s.payouts.get(c.payee, c.payee), a["credited"])
    elif name == "CloseRequested":
        c = s.channels[a["id"]]
        s.channels[c.channel_id] = replace(c, state=CLOSING, closes_at=float(a["closesAt"]))
    elif name == "ChannelClosed":
        c = s.channels[a["id"]]
        if a["refund"] != c.unspent:
            s.problems.append(f"{where}: refunds {a['refund']}, the channel had {c.unspent} unspent")
        closes_at = c.closes_at if c.closes_at is not None else float(e.timestamp)
        s.channels[c.channel_id] = replace(c, state=CLOSED, refunded=a["refund"], closes_at=closes_at)
        s.credit(c.payer, a["refund"])
    elif name == "NodeRegistered":
        node_address, ts = a["node"], float(e.timestamp)
        old = s.nodes.get(node_address)
        added = a["stake"] - (old.stake if old else 0)
        if added < 0:
            s.problems.append(f"{where}: the stake goes down to {a['stake']}")
        s.debit(node_address, max(0, added), where)
        if old is None:
            s.nodes[node_address] = NodeInfo(node_address, a["stake"], a["blocks"], ts, ts)
        elif a["blocks"] == old.blocks and not restarts_reward_period(config, added):
            s.nodes[node_address] = replace(old, stake=a["stake"])
        else:
            s.nodes[node_address] = replace(old, stake=a["stake"], blocks=a["blocks"],
                                            rewarded_until=ts, earned=0)
    elif name == "UnstakeRequested":
        node = s.nodes[a["node"]]
        s.nodes[node.address] = replace(node, stake=node.stake - a["amount"])
        s.unstaking[node.address] = s.unstaking.get(node.address, 0) + a["amount"]
    elif name == "Unstaked":
        s.unstaking[a["node"]] = 0
        s.credit(a["node"], a["amount"])
    elif name == "PayoutSet":
        s.payouts[a["node"]] = a["node"] if a["payout"] == ZERO_ADDRESS else a["payout"]
    elif name == "RewardPaid":
        node = s.nodes[a["node"]]
        if a["amount"] > s.pool:
            s.problems.append(f"{where}: pays {a['amount']} from a pool of {s.pool}")
        period = min(node.served_at, node.rewarded_until + config.max_reward_period_s) - node.rewarded_until
        due = reward_due(config, node, a["period"])
        if (a["period"], a["amount"]) != (int(period), due):
            s.problems.append(f"{where}: pays {a['amount']} for {a['period']} s, the rules give "
                              f"{due} for {int(period)} s")
        s.pool -= a["amount"]
        s.nodes[node.address] = replace(node, rewarded_until=node.rewarded_until + a["period"],
                                        earned=0, rewards=node.rewards + a["amount"])
        s.credit(s.payouts.get(node.address, node.address), a["amount"])
    elif name == "Slashed":
        accuser, accused = a["accuser"], a["accused"]
        if not a["guilty"]:
            s.debit(accuser, a["bond"], where)
            s.credit(accused, a["bond"])
            return
        if a["receiptHash"] in s.convicted:
            s.problems.append(f"{where}: receipt {a['receiptHash'][:10]}... convicts a second time")
        s.convicted.add(a["receiptHash"])
        node = s.nodes[accused]
        unstaking = s.unstaking.get(accused, 0)
        from_stake = node.stake * config.slash_bps // 10_000
        from_unstaking = unstaking * config.slash_bps // 10_000
        reward = (from_stake + from_unstaking) * config.slash_reward_bps // 10_000
        if (a["slashed"], a["reward"]) != (from_stake + from_unstaking, reward):
            s.problems.append(f"{where}: slashes {a['slashed']} (reward {a['reward']}), the rules "
                              f"give {from_stake + from_unstaking} ({reward})")
        s.nodes[accused] = replace(node, stake=node.stake - from_stake)
        s.unstaking[accused] = unstaking - from_unstaking
        s.credit(accuser, a["reward"])
    else:
        s.problems.append(f"{where}: unknown event {name}")

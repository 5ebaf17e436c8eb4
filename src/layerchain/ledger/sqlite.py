"""The embedded ledger: one SQLite file shared by every process that points at it.

Durability and atomicity come from SQLite: WAL mode, ``synchronous=FULL`` (a returned call
has been fsynced), and every mutation inside one ``BEGIN IMMEDIATE`` transaction that
updates the rows *and* appends the journal entry. So concurrent processes serialize on the
write lock (waiting up to ``busy_timeout_s``), a process killed mid-call leaves either
nothing or the whole mutation, and a value returned to the caller is on disk.

The rules are not here: each mutation loads the rows it touches into a
``journal.State``, runs ``journal.apply`` on it, and writes the rows back. ``verify``
replays the whole journal with the same rules and compares the result with the tables.

Clock: every entry is stamped here, inside its transaction, with the machine's clock
(``wall_clock``) or the last entry's stamp if that is later, so ledger time never goes
backwards and no caller chooses it. Processes sharing the file share the machine's clock.

Tables: ``meta(key, value)`` (``head`` = ``"seq:hash"`` of the last entry, ``clock`` = its
stamp), ``accounts(address, balance)``, ``channels(...)``, ``nodes(...)``,
``nonces(address, nonce)`` (operation nonces used), ``convictions(receipt_hash)``
(receipts that slashed a stake), ``journal(seq, kind, payload, prev_hash, hash)``. ``path=":memory:"`` gives a private in-process ledger for fast tests.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from layerchain.errors import ChannelError, InvalidVoucher, LedgerError
from layerchain.ledger.base import (
    CLOSED,
    AccountInfo,
    Channel,
    EvidenceVerdict,
    JournalEntry,
    LedgerConfig,
    NodeInfo,
    SlashResult,
    VerifyReport,
)
from layerchain.ledger.checkpoints import Checkpoint, check_checkpoints, sign_checkpoint
from layerchain.ledger.journal import (
    GENESIS_PREV_HASH,
    JOURNAL_VERSION,
    VOUCHER_SCHEME,
    State,
    receipt_signer,
    apply,
    canonical_payload,
    compare,
    entry_hash,
    replay,
)
from layerchain.ledger.operations import (
    ZERO_ADDRESS,
    Operation,
    channel_id_of,
    id_bytes,
    new_operation,
    sign_operation,
    verify_operation,
)
from layerchain.ledger.records import Voucher, decode_voucher, ledger_domain, voucher_signer
from layerchain.ledger.signatures import Signer, address_bytes, normalize_address

MAX_CLOCK_SKEW_S = 60.0  # ``verify`` flags entries stamped further ahead of this machine


def wall_clock() -> float:
    """The machine's clock, unix seconds: the embedded ledger's one time source."""
    return time.time()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    address TEXT PRIMARY KEY, balance INTEGER NOT NULL CHECK (balance >= 0));
CREATE TABLE IF NOT EXISTS channels (
    channel_id TEXT PRIMARY KEY, payer TEXT NOT NULL, payee TEXT NOT NULL,
    deposit INTEGER NOT NULL, redeemed INTEGER NOT NULL CHECK (redeemed <= deposit),
    nonce INTEGER NOT NULL, state TEXT NOT NULL, closes_at REAL, refunded INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS channels_payee ON channels (payee);
CREATE TABLE IF NOT EXISTS nodes (
    address TEXT PRIMARY KEY, stake INTEGER NOT NULL, blocks INTEGER NOT NULL,
    registered_at REAL NOT NULL, rewarded_until REAL NOT NULL, served_at REAL NOT NULL,
    earned INTEGER NOT NULL, rewards INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS nonces (
    address TEXT NOT NULL, nonce INTEGER NOT NULL, PRIMARY KEY (address, nonce));
CREATE TABLE IF NOT EXISTS convictions (receipt_hash TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
"""
_CHANNEL_COLUMNS = "channel_id, payer, payee, deposit, redeemed, nonce, state, closes_at, refunded"
_NODE_COLUMNS = (
    "address, stake, blocks, registered_at, rewarded_until, served_at, earned, rewards"
)


def _address(address: str) -> str:
    try:
        return normalize_address(address)
    except ValueError:
        raise LedgerError(f"{address!r} is not an address (0x + 40 hex digits)") from None


class SqliteLedger:
    """A ``Ledger`` in one SQLite file (or ``":memory:"``). Thread-safe; share by path.

    ``config`` applies when the file is created; opening an existing ledger with a
    different config raises LedgerError (the genesis entry holds the rules).
    """

    backend = "sqlite"

    def __init__(
        self,
        path: str | Path,
        config: LedgerConfig | None = None,
        *,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        self._appended = False  # set by _append within the current transaction
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, timeout=busy_timeout_s, check_same_thread=False
            )
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            genesis = self._initialize(config or LedgerConfig())
        except sqlite3.Error as error:
            raise LedgerError(f"cannot open ledger {self.path}: {error}") from None
        if genesis.get("version") != JOURNAL_VERSION:
            self._db.close()
            raise LedgerError(
                f"ledger {self.path} was written by an older layerchain (journal version "
                f"{genesis.get('version', 1)}, unsigned operations)",
                hint="start a new ledger file",
            )
        self.config = LedgerConfig.from_dict(genesis["config"])
        self.ledger_id: str = genesis["ledger_id"]
        self.domain_separator: bytes = ledger_domain(self.ledger_id)  # vouchers' EIP-712 domain
        self.gas_used: dict[str, list[int]] = {}  # no gas off-chain: always empty
        if config is not None and config != self.config:
            self._db.close()
            raise LedgerError(
                f"ledger {self.path} was created with {self.config}, not {config}",
                hint="open it without a config, or use a new file",
            )

    def _initialize(self, config: LedgerConfig) -> dict[str, Any]:
        """Create the tables and the genesis entry if missing; return the genesis payload."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            row = self._db.execute("SELECT payload FROM journal WHERE seq = 1").fetchone()
            if row is None:
                payload = {
                    "config": config.to_dict(), "ledger_id": "0x" + secrets.token_hex(32),
                    "ts": wall_clock(), "version": JOURNAL_VERSION, "vouchers": VOUCHER_SCHEME,
                }
                apply(State(), "genesis", payload)
                self._append("genesis", payload)
                self._db.execute("COMMIT")
                return payload
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        genesis: dict[str, Any] = json.loads(row[0])
        return genesis

    # -- transactions ---------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[State]:
        """One ``BEGIN IMMEDIATE`` transaction; the yielded state's rows are written back
        and committed only if a journal entry was appended, otherwise rolled back."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise LedgerError(f"ledger {self.path} is unavailable: {error}") from None
            state = State(config=self.config, ledger_id=self.ledger_id)
            self._appended = False
            try:
                row = self._db.execute("SELECT value FROM meta WHERE key = 'clock'").fetchone()
                state.clock = float(row[0]) if row else 0.0
                yield state
                if self._appended:
                    self._write(state)
                    self._db.execute("COMMIT")
                else:
                    self._db.execute("ROLLBACK")
            except BaseException as error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    raise LedgerError(f"ledger {self.path}: {error}") from None
                raise

    def _apply(self, state: State, kind: str, payload: dict[str, Any]) -> int:
        payload["ts"] = max(wall_clock(), state.clock)  # the ledger's clock, not the caller's
        result = apply(state, kind, payload)
        self._append(kind, payload)
        return result

    def _append(self, kind: str, payload: dict[str, Any]) -> None:
        row = self._db.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS_PREV_HASH)
        text = canonical_payload(payload)
        digest = entry_hash(prev, seq, kind, text)
        self._db.execute(
            "INSERT INTO journal (seq, kind, payload, prev_hash, hash) VALUES (?, ?, ?, ?, ?)",
            (seq, kind, text, prev, digest),
        )
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("head", f"{seq}:{digest}"), ("clock", repr(float(payload["ts"])))],
        )
        self._appended = True

    def _load_accounts(self, state: State, *addresses: str) -> None:
        for address in addresses:
            row = self._db.execute(
                "SELECT balance FROM accounts WHERE address = ?", (address,)
            ).fetchone()
            if row is not None:
                state.balances[address] = row[0]

    def _load_channel(self, state: State, channel_id: str) -> Channel:
        row = self._db.execute(
            f"SELECT {_CHANNEL_COLUMNS} FROM channels WHERE channel_id = ?", (channel_id,)
        ).fetchone()
        if row is None:
            raise ChannelError(f"unknown channel {channel_id[:10]}... on ledger {self.path}")
        state.channels[channel_id] = Channel(*row)
        return state.channels[channel_id]

    def _load_node(self, state: State, address: str) -> None:
        row = self._db.execute(
            f"SELECT {_NODE_COLUMNS} FROM nodes WHERE address = ?", (address,)
        ).fetchone()
        if row is not None:
            state.nodes[address] = NodeInfo(*row)

    def _load_nonce(self, state: State, address: str, nonce: int) -> None:
        row = self._db.execute(
            "SELECT 1 FROM nonces WHERE address = ? AND nonce = ?", (address, nonce)
        ).fetchone()
        if row is not None:
            state.nonces.add((address, nonce))

    def _write(self, state: State) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO accounts (address, balance) VALUES (?, ?)",
            state.balances.items(),
        )
        self._db.executemany(
            f"INSERT OR REPLACE INTO channels ({_CHANNEL_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
            [
                (c.channel_id, c.payer, c.payee, c.deposit, c.redeemed, c.nonce, c.state,
                 c.closes_at, c.refunded)
                for c in state.channels.values()
            ],
        )
        self._db.executemany(
            f"INSERT OR REPLACE INTO nodes ({_NODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (n.address, n.stake, n.blocks, n.registered_at, n.rewarded_until, n.served_at,
                 n.earned, n.rewards)
                for n in state.nodes.values()
            ],
        )
        self._db.executemany(
            "INSERT OR IGNORE INTO nonces (address, nonce) VALUES (?, ?)", state.nonces
        )
        self._db.executemany(
            "INSERT OR IGNORE INTO convictions (receipt_hash) VALUES (?)",
            [(r,) for r in state.convicted],
        )

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as error:
                raise LedgerError(f"ledger {self.path}: {error}") from None

    def now(self) -> float:
        """The ledger's clock: the machine's, or the last entry's stamp if that is later."""
        rows = self._read("SELECT value FROM meta WHERE key = 'clock'")
        return max(wall_clock(), float(rows[0][0]) if rows else 0.0)

    # -- operations -----------------------------------------------------------------------

    def submit(self, operation: bytes) -> int:
        op = verify_operation(operation)  # outside the lock: ~80 µs of ECDSA
        if op.kind == "slash":
            raise LedgerError("a slash operation is submitted with its verdict: use Ledger.slash")
        with self._transaction() as state:
            self._load_accounts(state, op.actor)
            self._load_nonce(state, op.actor, op.nonce)
            if op.kind in ("top_up", "close_channel"):
                self._load_channel(state, op.channel_id)
            if op.kind in ("register_node", "claim_reward"):
                self._load_node(state, op.actor)
            return self._apply(state, op.kind, {"op": operation.hex()})

    def _sign(self, signer: Signer, kind: str, **fields: Any) -> tuple[Operation, bytes]:
        op = new_operation(signer, self.ledger_id, kind, now=self.now(), **fields)
        return op, sign_operation(signer, op)

    # -- accounts -------------------------------------------------------------------------

    def balance(self, address: str) -> int:
        rows = self._read("SELECT balance FROM accounts WHERE address = ?", (_address(address),))
        return rows[0][0] if rows else 0

    def account(self, address: str) -> AccountInfo:
        address = _address(address)
        stake = self._read("SELECT stake FROM nodes WHERE address = ?", (address,))
        return AccountInfo(address, self.balance(address), stake[0][0] if stake else 0)

    def accounts(self) -> list[AccountInfo]:
        rows = self._read(
            "SELECT a.address, COALESCE(b.balance, 0), COALESCE(n.stake, 0) FROM "
            "(SELECT address FROM accounts UNION SELECT address FROM nodes) AS a "
            "LEFT JOIN accounts AS b ON b.address = a.address "
            "LEFT JOIN nodes AS n ON n.address = a.address ORDER BY a.address"
        )
        return [AccountInfo(*row) for row in rows]

    def deposit(self, owner: Signer, amount: int) -> int:
        return self.submit(self._sign(owner, "deposit", amount=_amount(amount))[1])

    def withdraw(self, owner: Signer, amount: int) -> int:
        return self.submit(self._sign(owner, "withdraw", amount=_amount(amount))[1])

    # -- channels -------------------------------------------------------------------------

    def open_channel(self, payer: Signer, payee: str, deposit: int) -> str:
        op, data = self._sign(payer, "open_channel", counterparty=_address(payee),
                              amount=_amount(deposit))
        self.submit(data)
        return channel_id_of(self.ledger_id, op.actor, op.nonce)

    def top_up(self, payer: Signer, channel_id: str, amount: int) -> int:
        return self.submit(self._sign(payer, "top_up", channel_id=_channel_id(channel_id),
                                      amount=_amount(amount))[1])

    def channel(self, channel_id: str) -> Channel:
        rows = self._read(
            f"SELECT {_CHANNEL_COLUMNS} FROM channels WHERE channel_id = ?", (channel_id,)
        )
        if not rows:
            raise ChannelError(f"unknown channel {channel_id[:10]}... on ledger {self.path}")
        return Channel(*rows[0])

    def channels(self, *, payer: str | None = None, payee: str | None = None) -> list[Channel]:
        sql, args = f"SELECT {_CHANNEL_COLUMNS} FROM channels WHERE 1", list[str]()
        if payer is not None:
            sql, args = sql + " AND payer = ?", [*args, _address(payer)]
        if payee is not None:
            sql, args = sql + " AND payee = ?", [*args, _address(payee)]
        return [Channel(*row) for row in self._read(sql + " ORDER BY rowid", tuple(args))]

    def redeem(self, voucher_bytes: bytes) -> int:
        return self.redeem_many([voucher_bytes])[0]

    def redeem_many(self, vouchers: Sequence[bytes]) -> list[int]:
        """Redeem ``vouchers`` in one SQLite transaction (one journal entry per voucher that
        credits something); a bad one raises and none of them is applied."""
        decoded: list[tuple[Voucher, bytes, bytes]] = []
        for data in vouchers:  # outside the lock: ~80 µs of ECDSA each
            voucher, signature = decode_voucher(data)
            decoded.append((voucher, voucher_signer(voucher, signature, self.domain_separator), data))
        credited: list[int] = []
        with self._transaction() as state:
            for voucher, signer, data in decoded:
                credited.append(self._redeem_one(state, voucher, signer, data))
        return credited

    def _redeem_one(self, state: State, voucher: Voucher, signer: bytes, data: bytes) -> int:
        """One redemption inside the open transaction; rows already in ``state`` (an earlier
        voucher of the batch) are not read again."""
        channel = state.channels.get(voucher.channel_id) or self._load_channel(
            state, voucher.channel_id
        )
        if signer != address_bytes(channel.payer):
            raise InvalidVoucher(
                f"voucher for channel {channel.channel_id[:10]}... is not signed by its "
                f"payer {channel.payer} for this ledger (another signer, or another "
                "ledger's domain)"
            )
        if voucher.nonce <= channel.nonce or voucher.cumulative_amount <= channel.redeemed:
            return 0  # already redeemed (or superseded): idempotent, nothing to journal
        if channel.state == CLOSED:
            raise ChannelError(f"channel {channel.channel_id[:10]}... is closed")
        if channel.payee not in state.balances:
            self._load_accounts(state, channel.payee)
        if channel.payee not in state.nodes:
            self._load_node(state, channel.payee)
        payload = {"channel_id": channel.channel_id, "voucher": data.hex()}
        return self._apply(state, "redeem", payload)

    def close_channel(self, payer: Signer, channel_id: str) -> int:
        return self.submit(self._sign(payer, "close_channel",
                                      channel_id=_channel_id(channel_id))[1])

    # -- nodes ----------------------------------------------------------------------------

    def register_node(self, node: Signer, stake: int, blocks: int) -> NodeInfo:
        if type(stake) is not int or stake < 0:
            raise LedgerError(f"stake must be a non-negative integer, got {stake!r}")
        if type(blocks) is not int or not 0 < blocks < 2**32:
            raise LedgerError(f"blocks must be a positive integer, got {blocks!r}")
        self.submit(self._sign(node, "register_node", amount=stake, blocks=blocks)[1])
        return self.node(node.address)

    def node(self, address: str) -> NodeInfo:
        address = _address(address)
        rows = self._read(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE address = ?", (address,))
        if not rows:
            raise LedgerError(f"{address} is not a registered node")
        return NodeInfo(*rows[0])

    def claim_reward(self, node: Signer) -> int:
        return self.submit(self._sign(node, "claim_reward")[1])

    # -- slashing -------------------------------------------------------------------------

    def slash(self, accuser: Signer, verdict: EvidenceVerdict) -> SlashResult:
        accused = _address(verdict.accused) if verdict.accused else ZERO_ADDRESS
        if verdict.guilty and not verdict.receipt:
            raise LedgerError("a guilty verdict names the accused's receipt")
        op, data = self._sign(accuser, "slash", counterparty=accused,
                              channel_id=_channel_id(verdict.evidence_hash))
        distance: float | str = verdict.distance if math.isfinite(verdict.distance) else "inf"
        payload: dict[str, Any] = {
            "op": data.hex(), "verdict": "guilty" if verdict.guilty else "not_guilty",
            "receipt": verdict.receipt.hex(), "step": verdict.step, "distance": distance,
            "tolerance": verdict.tolerance, "reason": verdict.reason,
        }
        receipt_id = receipt_signer(payload["receipt"])[1] if verdict.receipt else ""
        with self._transaction() as state:
            self._load_accounts(state, op.actor, accused)
            self._load_nonce(state, op.actor, op.nonce)
            self._load_node(state, accused)
            if self._read("SELECT 1 FROM convictions WHERE receipt_hash = ?", (receipt_id,)):
                state.convicted.add(receipt_id)
            self._apply(state, "slash", payload)
            seq = self._db.execute("SELECT MAX(seq) FROM journal").fetchone()[0]
        return SlashResult(
            verdict.evidence_hash, op.actor, accused, verdict.guilty,
            slashed=payload.get("slashed", 0), reward=payload.get("reward", 0),
            burned=payload.get("burned", 0), bond=payload.get("bond", 0), seq=seq,
        )

    # -- journal --------------------------------------------------------------------------

    def journal(self, *, after: int = 0, limit: int | None = None) -> list[JournalEntry]:
        rows = self._read(
            "SELECT seq, kind, payload, prev_hash, hash FROM journal WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (after, -1 if limit is None else limit),
        )
        return [JournalEntry(*row) for row in rows]

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last journal entry."""
        rows = self._read("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1")
        return (rows[0][0], rows[0][1]) if rows else (0, GENESIS_PREV_HASH)

    def checkpoint(self, signer: Signer) -> bytes:
        seq, head = self.head()
        return sign_checkpoint(signer, Checkpoint(self.ledger_id, seq, head))

    def verify(self, checkpoints: Iterable[bytes] = ()) -> VerifyReport:
        with self._lock:
            try:
                self._db.execute("BEGIN")  # one read snapshot of journal and tables
                try:
                    entries = [JournalEntry(*r) for r in self._db.execute(
                        "SELECT seq, kind, payload, prev_hash, hash FROM journal ORDER BY seq")]
                    stored = self._stored_state()
                    head = self._db.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()
                finally:
                    self._db.execute("ROLLBACK")
            except sqlite3.Error as error:
                raise LedgerError(f"ledger {self.path}: {error}") from None
        replayed, problems = replay(entries)
        if replayed.config is not None:
            problems.extend(compare(replayed, stored))
        last = f"{entries[-1].seq}:{entries[-1].hash}" if entries else None
        if head is None or head[0] != last:
            problems.append(
                f"journal head is recorded as {head[0] if head else None}, the journal ends at "
                f"{last} (entries removed or added)"
            )
        if replayed.clock > wall_clock() + MAX_CLOCK_SKEW_S:
            problems.append(
                f"the journal is stamped {replayed.clock - wall_clock():.0f} s ahead of this "
                "machine's clock (an entry written with a forged time)"
            )
        anchoring = check_checkpoints(
            self.ledger_id, {e.seq: e.hash for e in entries}, checkpoints
        )
        problems.extend(anchoring.problems)
        return VerifyReport(
            len(entries), entries[-1].hash if entries else "", tuple(problems),
            anchoring.anchored_seq, anchoring.signers,
        )

    def _stored_state(self) -> State:
        state = State(config=self.config, ledger_id=self.ledger_id)
        state.balances = dict(self._db.execute("SELECT address, balance FROM accounts"))
        state.channels = {
            row[0]: Channel(*row)
            for row in self._db.execute(f"SELECT {_CHANNEL_COLUMNS} FROM channels")
        }
        state.nodes = {
            row[0]: NodeInfo(*row)
            for row in self._db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes")
        }
        state.nonces = {(a, n) for a, n in self._db.execute("SELECT address, nonce FROM nonces")}
        state.convicted = {r for (r,) in self._db.execute("SELECT receipt_hash FROM convictions")}
        return state

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _amount(value: Any) -> int:
    """``value`` if it is an int in ``[1, 2^63)``; LedgerError before anything is signed."""
    if type(value) is not int or not 0 < value < 2**63:
        raise LedgerError(f"amount must be a positive integer below 2^63, got {value!r}")
    return value


def _channel_id(value: str) -> str:
    return "0x" + id_bytes(value, "channel id").hex()


def open_ledger(
    path: str | Path, config: LedgerConfig | None = None, **options: Any
) -> SqliteLedger:
    """Open (creating if needed) the ledger at ``path``; ``":memory:"`` for a private one.

    The one place a backend is chosen; an EVM backend will be picked here by URL scheme.
    """
    return SqliteLedger(path, config, **options)

"""The embedded ledger: one SQLite file shared by every process that points at it.

Durability and atomicity come from SQLite: WAL mode, ``synchronous=FULL`` (a returned call
has been fsynced), and every mutation inside one ``BEGIN IMMEDIATE`` transaction that
updates the rows *and* appends the journal entry. So concurrent processes serialize on the
write lock (waiting up to ``busy_timeout_s``), a process killed mid-call leaves either
nothing or the whole mutation, and a value returned to the caller is on disk.

The rules are not here: each mutation loads the rows it touches into a
``journal.State``, runs ``journal.apply`` on it, and writes the rows back. ``verify``
replays the whole journal with the same rules and compares the result with the tables.

Tables: ``meta(key, value)`` (``head`` = ``"seq:hash"`` of the last entry),
``accounts(address, balance)``, ``channels(...)``, ``nodes(...)``,
``journal(seq, kind, payload, prev_hash, hash)``. ``path=":memory:"`` gives a private
in-process ledger for fast tests.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from layerchain.errors import ChannelError, InvalidVoucher, LedgerError
from layerchain.ledger.base import (
    CLOSED,
    OPEN,
    AccountInfo,
    Channel,
    JournalEntry,
    LedgerConfig,
    NodeInfo,
    VerifyReport,
)
from layerchain.ledger.journal import (
    GENESIS_PREV_HASH,
    State,
    apply,
    canonical_payload,
    compare,
    entry_hash,
    replay,
)
from layerchain.ledger.records import decode_voucher, verify_liveness, voucher_signer
from layerchain.ledger.signatures import address_bytes, normalize_address

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
    address TEXT PRIMARY KEY, stake INTEGER NOT NULL, rewarded_until INTEGER NOT NULL,
    rewards INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
"""
_CHANNEL_COLUMNS = "channel_id, payer, payee, deposit, redeemed, nonce, state, closes_at, refunded"


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

    def __init__(
        self,
        path: str | Path,
        config: LedgerConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = str(path)
        self._clock = clock
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
            self.config = self._initialize(config or LedgerConfig())
        except sqlite3.Error as error:
            raise LedgerError(f"cannot open ledger {self.path}: {error}") from None
        if config is not None and config != self.config:
            self._db.close()
            raise LedgerError(
                f"ledger {self.path} was created with {self.config}, not {config}",
                hint="open it without a config, or use a new file",
            )

    def _initialize(self, config: LedgerConfig) -> LedgerConfig:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            row = self._db.execute("SELECT payload FROM journal WHERE seq = 1").fetchone()
            if row is None:
                payload = {"config": config.to_dict(), "ts": self._clock()}
                self._append(State(), "genesis", payload)
                self._db.execute("COMMIT")
                return config
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return LedgerConfig.from_dict(json.loads(row[0])["config"])

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
            state = State(config=self.config)
            self._appended = False
            try:
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
        payload["ts"] = self._clock()
        result = apply(state, kind, payload)
        self._append(state, kind, payload)
        return result

    def _append(self, state: State, kind: str, payload: dict[str, Any]) -> None:
        row = self._db.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS_PREV_HASH)
        text = canonical_payload(payload)
        digest = entry_hash(prev, seq, kind, text)
        self._db.execute(
            "INSERT INTO journal (seq, kind, payload, prev_hash, hash) VALUES (?, ?, ?, ?, ?)",
            (seq, kind, text, prev, digest),
        )
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('head', ?)", (f"{seq}:{digest}",)
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
            "SELECT address, stake, rewarded_until, rewards FROM nodes WHERE address = ?",
            (address,),
        ).fetchone()
        if row is not None:
            state.nodes[address] = NodeInfo(*row)

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
            "INSERT OR REPLACE INTO nodes (address, stake, rewarded_until, rewards) "
            "VALUES (?, ?, ?, ?)",
            [(n.address, n.stake, n.rewarded_until, n.rewards) for n in state.nodes.values()],
        )

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as error:
                raise LedgerError(f"ledger {self.path}: {error}") from None

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

    def deposit(self, address: str, amount: int) -> int:
        address = _address(address)
        with self._transaction() as state:
            self._load_accounts(state, address)
            return self._apply(state, "deposit", {"address": address, "amount": amount})

    def withdraw(self, address: str, amount: int) -> int:
        address = _address(address)
        with self._transaction() as state:
            self._load_accounts(state, address)
            return self._apply(state, "withdraw", {"address": address, "amount": amount})

    # -- channels -------------------------------------------------------------------------

    def open_channel(self, payer: str, payee: str, deposit: int) -> str:
        payer, payee = _address(payer), _address(payee)
        channel_id = "0x" + secrets.token_hex(32)
        with self._transaction() as state:
            self._load_accounts(state, payer)
            payload = {"channel_id": channel_id, "payer": payer, "payee": payee, "deposit": deposit}
            self._apply(state, "open_channel", payload)
        return channel_id

    def channel(self, channel_id: str) -> Channel:
        rows = self._read(
            f"SELECT {_CHANNEL_COLUMNS} FROM channels WHERE channel_id = ?", (channel_id,)
        )
        if not rows:
            raise ChannelError(f"unknown channel {channel_id[:10]}... on ledger {self.path}")
        return Channel(*rows[0])

    def channels(self, *, payer: str | None = None, payee: str | None = None) -> list[Channel]:
        sql, args = f"SELECT {_CHANNEL_COLUMNS} FROM channels WHERE 1", []
        if payer is not None:
            sql, args = sql + " AND payer = ?", [*args, _address(payer)]
        if payee is not None:
            sql, args = sql + " AND payee = ?", [*args, _address(payee)]
        return [Channel(*row) for row in self._read(sql + " ORDER BY rowid", tuple(args))]

    def redeem(self, voucher_bytes: bytes) -> int:
        voucher, signature = decode_voucher(voucher_bytes)
        signer = voucher_signer(voucher, signature)  # outside the lock: ~80 µs of ECDSA
        with self._transaction() as state:
            channel = self._load_channel(state, voucher.channel_id)
            if signer != address_bytes(channel.payer):
                raise InvalidVoucher(
                    f"voucher for channel {channel.channel_id[:10]}... is not signed by its "
                    f"payer {channel.payer}"
                )
            if voucher.nonce <= channel.nonce or voucher.cumulative_amount <= channel.redeemed:
                return 0  # already redeemed (or superseded): idempotent, nothing to journal
            if channel.state == CLOSED:
                raise ChannelError(f"channel {channel.channel_id[:10]}... is closed")
            self._load_accounts(state, channel.payee)
            payload = {"channel_id": channel.channel_id, "voucher": voucher_bytes.hex()}
            return self._apply(state, "redeem", payload)

    def close_channel(self, channel_id: str) -> int:
        with self._transaction() as state:
            channel = self._load_channel(state, channel_id)
            self._load_accounts(state, channel.payer)
            if channel.state == OPEN:
                self._apply(state, "close_request", {"channel_id": channel_id})
                if self.config.dispute_window_s > 0:
                    return 0
            return self._apply(state, "close", {"channel_id": channel_id})

    # -- nodes ----------------------------------------------------------------------------

    def register_node(self, address: str, stake: int) -> NodeInfo:
        address = _address(address)
        with self._transaction() as state:
            self._load_accounts(state, address)
            self._load_node(state, address)
            self._apply(state, "register_node", {"address": address, "stake": stake})
            return state.nodes[address]

    def node(self, address: str) -> NodeInfo:
        address = _address(address)
        rows = self._read(
            "SELECT address, stake, rewarded_until, rewards FROM nodes WHERE address = ?",
            (address,),
        )
        if not rows:
            raise LedgerError(f"{address} is not a registered node")
        return NodeInfo(*rows[0])

    def reward_uptime(self, record_bytes: bytes) -> int:
        record = verify_liveness(record_bytes)
        with self._transaction() as state:
            self._load_accounts(state, record.node_address)
            self._load_node(state, record.node_address)
            payload = {"address": record.node_address, "record": record_bytes.hex()}
            return self._apply(state, "reward", payload)

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

    def verify(self) -> VerifyReport:
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
        return VerifyReport(len(entries), entries[-1].hash if entries else "", tuple(problems))

    def _stored_state(self) -> State:
        state = State(config=self.config)
        state.balances = dict(self._db.execute("SELECT address, balance FROM accounts"))
        state.channels = {
            row[0]: Channel(*row)
            for row in self._db.execute(f"SELECT {_CHANNEL_COLUMNS} FROM channels")
        }
        state.nodes = {
            row[0]: NodeInfo(*row)
            for row in self._db.execute(
                "SELECT address, stake, rewarded_until, rewards FROM nodes")
        }
        return state

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_ledger(
    path: str | Path, config: LedgerConfig | None = None, **options: Any
) -> SqliteLedger:
    """Open (creating if needed) the ledger at ``path``; ``":memory:"`` for a private one.

    The one place a backend is chosen; an EVM backend will be picked here by URL scheme.
    """
    return SqliteLedger(path, config, **options)

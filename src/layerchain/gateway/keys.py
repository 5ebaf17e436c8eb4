"""API keys of a gateway: who may call it, and how many credits each caller has left.

A reseller runs the gateway, pays the swarm from its own wallet, and sells access by key.
The store is a small SQLite file (WAL mode, so ``layerchain api keys topup`` works while the
gateway serves). A key is ``lc-`` plus 32 random bytes (URL-safe base64): it is shown once,
at creation, and only its sha256 is stored (a key has 256 bits of entropy, so a fast hash
is enough). Each key has a short public ``key_id`` (``key_`` + 8 hex digits) used to list,
revoke and top it up, a balance in credits (integers, like the ledger), and an ``admin``
flag (an admin key also sees every request on the dashboard's ``/api/swarm``).

Gating (decided by the gateway, ``keys_on_at_start``): while the store holds no key at all,
the gateway is open (unless it was started with ``--require-keys``); once any key exists
(revoked ones included, so revoking the last key does not reopen the gateway) every request
needs ``Authorization: Bearer <key>``. A store that exists but cannot be read is an error,
never an open gateway.

Accounting: reserve, then settle. A request first *reserves* the most it can cost
(``reserve``: one ``BEGIN IMMEDIATE`` transaction, so concurrent requests, even from several
processes, cannot reserve the same credits twice); a key whose balance minus what its
running requests hold is below that is refused (InsufficientFunds). When the request ends,
``settle`` releases the hold and debits what the swarm charged, never more than was held:
the balance never goes below zero. A hold left by a gateway that died is void after
``HOLD_TTL_S``.

The store knows nothing of HTTP; the gateway maps its errors to status codes.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from layerchain.errors import ConfigError, InsufficientFunds, InvalidApiKey

KEY_PREFIX = "lc-"
HOLD_TTL_S = 3600.0  # a reservation older than this (its gateway died mid-request) is void

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id     TEXT PRIMARY KEY,        -- public handle: key_ + 8 hex digits
    key_hash   TEXT NOT NULL UNIQUE,    -- sha256 hex of the key; the key itself is never stored
    name       TEXT NOT NULL,           -- the reseller's label for the key's owner
    balance    INTEGER NOT NULL,        -- credits left (never below zero since holds)
    spent      INTEGER NOT NULL DEFAULT 0,   -- credits debited so far
    requests   INTEGER NOT NULL DEFAULT 0,   -- requests debited so far
    created_at REAL NOT NULL,           -- unix time, s
    revoked_at REAL,                    -- unix time, s; NULL while the key is valid
    admin      INTEGER NOT NULL DEFAULT 0    -- 1: may see every request on /api/swarm
);
CREATE TABLE IF NOT EXISTS holds (
    hold_id    TEXT PRIMARY KEY,        -- one running request's reservation
    key_id     TEXT NOT NULL,
    amount     INTEGER NOT NULL,        -- credits reserved: the most the request can cost
    created_at REAL NOT NULL            -- unix time, s; void after HOLD_TTL_S
);
"""


@dataclass(frozen=True)
class ApiKey:
    """One key's public record (never the key itself)."""

    key_id: str
    name: str
    balance: int  # credits
    spent: int  # credits
    requests: int
    created_at: float  # unix time, s
    revoked_at: float | None  # unix time, s
    admin: bool = False  # sees every request on /api/swarm
    held: int = 0  # credits reserved by this key's running requests

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def available(self) -> int:
        """Credits a new request may reserve: the balance less what running requests hold."""
        return self.balance - self.held

    def to_json(self) -> dict:
        return {
            "key_id": self.key_id, "name": self.name, "balance": self.balance,
            "held": self.held, "spent": self.spent, "requests": self.requests,
            "created_at": self.created_at, "revoked": self.revoked, "admin": self.admin,
        }


@dataclass(frozen=True)
class Hold:
    """Credits reserved for one request until ``KeyStore.settle``."""

    hold_id: str
    key_id: str
    amount: int  # credits


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """API keys in one SQLite file; every method opens its own short connection, so one
    store object may be used from any thread and several processes may share the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._keep_open = False
        self._anchor: sqlite3.Connection | None = None  # see keep_open
        self._anchor_lock = threading.Lock()

    def keep_open(self) -> None:
        """For a long-lived user (the gateway): hold one idle connection open from the next
        successful access until ``close()``. While one connection stays open, closing the
        short ones does not checkpoint and fsync the WAL: a request's reserve and settle
        take well under a millisecond each instead of ~20 ms on a busy disk."""
        self._keep_open = True

    def close(self) -> None:
        with self._anchor_lock:
            if self._anchor is not None:
                self._anchor.close()
                self._anchor = None

    def _connect(self, create: bool = False) -> sqlite3.Connection:
        if not create and not self.path.exists():
            raise ConfigError(f"no API keys at {self.path}", hint="`layerchain api keys create` makes one")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        except (sqlite3.Error, OSError) as error:
            raise ConfigError(f"cannot open the key store {self.path}: {error}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit is atomic and survives the process, without an fsync
            # each (30-40 ms on a busy disk, twice per request); only a power cut may lose
            # the last few commits
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(api_keys)")}
            if "admin" not in columns:  # a store made before admin keys
                db.execute("ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0")
        except sqlite3.Error as error:
            db.close()
            raise ConfigError(f"cannot read the key store {self.path}: {error}",
                              hint="restore the file, or point --keys at a good one") from None
        if self._keep_open and self._anchor is None:
            with self._anchor_lock:
                if self._anchor is None:
                    self._anchor = sqlite3.connect(self.path, check_same_thread=False)
                    self._anchor.execute("SELECT COUNT(*) FROM api_keys").fetchone()  # attach
        return db

    # ---------------------------------------------------------------- reseller side

    def create(self, name: str = "", balance: int = 0, *, admin: bool = False) -> tuple[str, ApiKey]:
        """A new key with ``balance`` credits; returns (the key, shown once; its record)."""
        if balance < 0:
            raise ConfigError(f"a key's initial balance must be >= 0, got {balance}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(4)
        with closing(self._connect(create=True)) as db:
            db.execute(
                "INSERT INTO api_keys (key_id, key_hash, name, balance, created_at, admin)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key_id, hash_key(key), name, int(balance), time.time(), int(admin)),
            )
        return key, self.get(key_id)

    def list(self) -> list[ApiKey]:
        if not self.path.exists():
            return []
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [_record(row) for row in rows]

    def get(self, key_id: str) -> ApiKey:
        with closing(self._connect()) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise ConfigError(f"no API key {key_id!r}", hint="`layerchain api keys list` shows them")
        return _record(row)

    def revoke(self, key_id: str) -> ApiKey:
        self.get(key_id)
        with closing(self._connect()) as db:
            db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
        return self.get(key_id)

    def topup(self, key_id: str, amount: int) -> ApiKey:
        if amount <= 0:
            raise ConfigError(f"a top-up must be > 0 credits, got {amount}")
        self.get(key_id)
        with closing(self._connect()) as db:
            db.execute("UPDATE api_keys SET balance = balance + ? WHERE key_id = ?", (int(amount), key_id))
        return self.get(key_id)

    # ---------------------------------------------------------------- gateway side

    def count(self) -> int:
        """How many keys the store holds (revoked ones included); 0 when there is no file.
        ConfigError when the file exists but is not a readable key store."""
        if not self.path.exists():
            return 0
        with closing(self._connect()) as db:
            return int(db.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0])

    def enabled(self) -> bool:
        """Whether any key was ever created (then every request needs one)."""
        return self.count() > 0

    def authenticate(self, key: str | None) -> ApiKey:
        """The valid key's record; InvalidApiKey if missing, unknown or revoked."""
        if not key:
            raise InvalidApiKey("this gateway needs an API key", hint="send Authorization: Bearer <key>")
        if not self.path.exists():
            raise InvalidApiKey("unknown API key")
        with closing(self._connect()) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ?",
                             (hash_key(key),)).fetchone()
        if row is None:
            raise InvalidApiKey("unknown API key")
        record = _record(row)
        if record.revoked:
            raise InvalidApiKey(f"API key {record.key_id} was revoked")
        return record

    def reserve(self, key_id: str, amount: int) -> Hold:
        """Hold ``amount`` credits (>= 0) of a valid key for one request, atomically.

        InsufficientFunds when the key's available credits (balance less its holds) are
        <= 0 or below ``amount``: concurrent requests never reserve the same credits."""
        if amount < 0:
            raise ValueError(f"a reservation must be >= 0 credits, got {amount}")
        hold = Hold("hold_" + secrets.token_hex(8), key_id, int(amount))
        now = time.time()
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")  # the write lock first: check and hold as one step
            try:
                db.execute("DELETE FROM holds WHERE created_at < ?", (now - HOLD_TTL_S,))
                row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?",
                                 (key_id,)).fetchone()
                if row is None or _record(row).revoked:
                    raise InvalidApiKey(f"API key {key_id} is unknown or was revoked")
                record = _record(row)
                if record.available <= 0 or record.available < hold.amount:
                    raise InsufficientFunds(
                        f"API key {key_id} has {record.available} credits available "
                        f"(balance {record.balance}, {record.held} held by running requests); "
                        f"this request may cost up to {hold.amount}",
                        hint="ask for fewer max_tokens, a lower max_price, or a top-up",
                    )
                db.execute("INSERT INTO holds (hold_id, key_id, amount, created_at) VALUES (?, ?, ?, ?)",
                           (hold.hold_id, key_id, hold.amount, now))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return hold

    def settle(self, hold: Hold, cost: int, *, served: bool = True) -> ApiKey:
        """Release ``hold`` and debit what the request cost, at most the held amount (a key
        never pays more than it reserved; anything above is the gateway operator's).
        ``served``: count the request in the key's ``requests`` (False for one that failed
        before the swarm computed anything)."""
        charged = max(0, min(int(cost), hold.amount))
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM holds WHERE hold_id = ?", (hold.hold_id,))
                db.execute(
                    "UPDATE api_keys SET balance = balance - ?, spent = spent + ?,"
                    " requests = requests + ? WHERE key_id = ?",
                    (charged, charged, int(served), hold.key_id),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return self.get(hold.key_id)


_COLUMNS = ("key_id, name, balance, spent, requests, created_at, revoked_at, admin,"
            " (SELECT COALESCE(SUM(amount), 0) FROM holds WHERE holds.key_id = api_keys.key_id)")


def _record(row: tuple) -> ApiKey:
    """The record of one ``SELECT {_COLUMNS}`` row."""
    key_id, name, balance, spent, requests, created_at, revoked_at, admin, held = row
    return ApiKey(key_id, name, balance, spent, requests, created_at, revoked_at,
                  admin=bool(admin), held=int(held))

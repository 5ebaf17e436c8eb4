"""API keys of a gateway: who may call it, and how many credits each caller has left.

A reseller runs the gateway, pays the swarm from its own wallet, and sells access by key.
The store is a small SQLite file (WAL mode, so ``layerchain api keys topup`` works while the
gateway serves). A key is ``lc-`` plus 32 random bytes (URL-safe base64): it is shown once,
at creation, and only its sha256 is stored (a key has 256 bits of entropy, so a fast hash
is enough). Each key has a short public ``key_id`` (``key_`` + 8 hex digits) used to list,
revoke and top it up, and a balance in credits (integers, like the ledger).

Gating: while the store holds no key at all, the gateway is open (unless it was started
with ``--require-keys``); once any key exists (revoked ones included, so revoking the last
key does not reopen the gateway) every request needs ``Authorization: Bearer <key>``.
Accounting: a request is admitted when the key's balance is > 0; afterwards the balance is
debited by what the swarm charged for it, in one ``UPDATE``. A request that costs more than
what is left takes the balance below zero: it is never refused half-way, and the next
request is refused until a top-up.

The store knows nothing of HTTP; the gateway maps its errors to status codes.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from layerchain.errors import ConfigError, InsufficientFunds, InvalidApiKey

KEY_PREFIX = "lc-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id     TEXT PRIMARY KEY,        -- public handle: key_ + 8 hex digits
    key_hash   TEXT NOT NULL UNIQUE,    -- sha256 hex of the key; the key itself is never stored
    name       TEXT NOT NULL,           -- the reseller's label for the key's owner
    balance    INTEGER NOT NULL,        -- credits left; may go below zero after a request
    spent      INTEGER NOT NULL DEFAULT 0,   -- credits debited so far
    requests   INTEGER NOT NULL DEFAULT 0,   -- requests debited so far
    created_at REAL NOT NULL,           -- unix time, s
    revoked_at REAL                     -- unix time, s; NULL while the key is valid
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

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json(self) -> dict:
        return {
            "key_id": self.key_id, "name": self.name, "balance": self.balance,
            "spent": self.spent, "requests": self.requests, "created_at": self.created_at,
            "revoked": self.revoked,
        }


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """API keys in one SQLite file; every method opens its own short connection, so one
    store object may be used from any thread and several processes may share the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    def _connect(self, create: bool = False) -> sqlite3.Connection:
        if not create and not self.path.exists():
            raise ConfigError(f"no API keys at {self.path}", hint="`layerchain api keys create` makes one")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as error:
            raise ConfigError(f"cannot open the key store {self.path}: {error}") from None
        return db

    # ---------------------------------------------------------------- reseller side

    def create(self, name: str = "", balance: int = 0) -> tuple[str, ApiKey]:
        """A new key with ``balance`` credits; returns (the key, shown once; its record)."""
        if balance < 0:
            raise ConfigError(f"a key's initial balance must be >= 0, got {balance}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(4)
        with closing(self._connect(create=True)) as db:
            db.execute(
                "INSERT INTO api_keys (key_id, key_hash, name, balance, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (key_id, hash_key(key), name, int(balance), time.time()),
            )
        return key, self.get(key_id)

    def list(self) -> list[ApiKey]:
        if not self.path.exists():
            return []
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [ApiKey(*row) for row in rows]

    def get(self, key_id: str) -> ApiKey:
        with closing(self._connect()) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise ConfigError(f"no API key {key_id!r}", hint="`layerchain api keys list` shows them")
        return ApiKey(*row)

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

    def enabled(self) -> bool:
        """Whether any key was ever created (then every request needs one)."""
        if not self.path.exists():
            return False
        with closing(self._connect()) as db:
            return db.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def authenticate(self, key: str | None) -> ApiKey:
        """The valid key's record; InvalidApiKey if missing, unknown or revoked."""
        if not key:
            raise InvalidApiKey("this gateway needs an API key", hint="send Authorization: Bearer <key>")
        if not self.path.exists():
            raise InvalidApiKey("unknown API key")
        with closing(self._connect()) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ?", (hash_key(key),)).fetchone()
        if row is None:
            raise InvalidApiKey("unknown API key")
        record = ApiKey(*row)
        if record.revoked:
            raise InvalidApiKey(f"API key {record.key_id} was revoked")
        return record

    def admit(self, key: str | None) -> ApiKey:
        """Authenticate, then check the balance: InsufficientFunds when it is <= 0."""
        record = self.authenticate(key)
        if record.balance <= 0:
            raise InsufficientFunds(
                f"API key {record.key_id} has no credits left (balance {record.balance})",
                hint="ask the gateway's operator for a top-up",
            )
        return record

    def debit(self, key_id: str, amount: int) -> ApiKey:
        """Take ``amount`` credits (>= 0) for one request; the balance may go below zero."""
        with closing(self._connect()) as db:
            db.execute(
                "UPDATE api_keys SET balance = balance - ?, spent = spent + ?,"
                " requests = requests + 1 WHERE key_id = ?",
                (int(amount), int(amount), key_id),
            )
        return self.get(key_id)


_COLUMNS = "key_id, name, balance, spent, requests, created_at, revoked_at"

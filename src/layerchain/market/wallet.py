"""A wallet: one secp256k1 key (an Ethereum address) kept in a data directory.

Every node and every client has one. It lives at ``DATA_DIR/wallet.json`` (file mode 0600,
directory 0700) as ``{"address": "0x...", "private_key": "0x..."}``; a key file readable
by group or others is refused, as ssh refuses such keys. The wallet signs 32-byte digests
(EIP-191 ``sign_digest``, or raw EIP-712 hashes with ``sign_hash``; see
``layerchain.ledger.signatures``); what a digest means is up to the record signed
(receipt, voucher, liveness record). On an EVM ledger it also signs the owner's
transactions (``sign_transaction``), locally: the key never leaves the process. Balances
live on the ledger, not here.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Mapping

from layerchain.errors import ConfigError, LedgerError
from layerchain.ledger.signatures import address_of, sign_digest, sign_hash

# An Ethereum transaction as eth-account takes it: ints (nonce, gas, value, chainId, fees),
# hex strings (to, data) or bytes (data).
TransactionFields = Mapping[str, int | str | bytes]

WALLET_FILE = "wallet.json"
DEFAULT_DATA_DIR = Path("~/.layerchain")


class Wallet:
    """A private key and its checksummed ``address``; ``path`` is None for in-memory ones."""

    __slots__ = ("_key", "address", "path")

    def __init__(self, private_key: bytes, path: Path | None = None) -> None:
        if len(private_key) != 32:
            raise ConfigError("a wallet key must be 32 bytes")
        self._key = private_key
        self.address = address_of(private_key)  # raises for 0 or >= curve order
        self.path = path

    @classmethod
    def generate(cls) -> Wallet:
        """A fresh in-memory wallet (tests, ephemeral clients)."""
        return cls(secrets.token_bytes(32))

    @classmethod
    def create(cls, data_dir: str | Path) -> Wallet:
        """Create ``DATA_DIR/wallet.json``; ConfigError if a wallet is already there."""
        path = cls.file(data_dir)
        if path.exists():
            raise ConfigError(
                f"a wallet already exists at {path}", hint="`layerchain wallet show` prints it"
            )
        wallet = cls(secrets.token_bytes(32), path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        text = json.dumps({"address": wallet.address, "private_key": "0x" + wallet._key.hex()})
        # O_EXCL: two processes creating at once cannot both win; 0600 from the first byte.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load(data_dir)
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return wallet

    @classmethod
    def load(cls, data_dir: str | Path) -> Wallet:
        """Read ``DATA_DIR/wallet.json``; ConfigError if missing, unreadable or too open."""
        path = cls.file(data_dir)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise ConfigError(
                f"no wallet at {path}", hint="create one with `layerchain wallet create`"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"wallet file {path} is readable by others (mode {stat.S_IMODE(mode):o})",
                hint=f"run `chmod 600 {path}`",
            )
        try:
            data = json.loads(path.read_text())
            key = bytes.fromhex(data["private_key"].removeprefix("0x"))
            wallet = cls(key, path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError):
            raise ConfigError(f"wallet file {path} is unreadable or corrupt") from None
        if data.get("address", wallet.address) != wallet.address:
            raise ConfigError(f"wallet file {path}: its address does not match its key")
        return wallet

    @classmethod
    def load_or_create(cls, data_dir: str | Path) -> Wallet:
        """The wallet in ``data_dir``, created on first use."""
        if cls.file(data_dir).exists():
            return cls.load(data_dir)
        return cls.create(data_dir)

    @staticmethod
    def file(data_dir: str | Path) -> Path:
        """Where the wallet of ``data_dir`` lives."""
        return Path(data_dir).expanduser() / WALLET_FILE

    def sign_digest(self, digest: bytes) -> bytes:
        """65-byte EIP-191 signature over a 32-byte digest (what ``personal_sign`` makes)."""
        return sign_digest(self._key, digest)

    def sign_hash(self, digest: bytes) -> bytes:
        """65-byte raw signature over a 32-byte hash, no prefix (an EIP-712 digest)."""
        return sign_hash(self._key, digest)

    def sign_transaction(self, tx: TransactionFields) -> bytes:
        """The raw signed bytes of an EVM transaction (EIP-1559 when it has fee caps, legacy
        with ``gasPrice``), ready for ``eth_sendRawTransaction``; LedgerError if eth-account
        refuses the fields (one line naming the problem)."""
        from eth_account import Account

        try:
            signed = Account.sign_transaction(dict(tx), self._key)
        except Exception as error:  # noqa: BLE001 - eth-account and rlp raise many types
            raise LedgerError(f"cannot sign the transaction: {error}") from None
        return bytes(signed.raw_transaction)

    def export_private_key(self) -> bytes:
        """The raw key, for handing to eth-account or web3; never log it."""
        return self._key

    def __repr__(self) -> str:  # never shows the key
        return f"Wallet({self.address})"

"""A node's Ed25519 identity: the key that signs its records, and the peer id derived from it.

The peer id is ``base58(sha256(raw public key)[:16])`` (about 22 characters): short, stable
for as long as the key file lives, and checkable by anyone holding the public key, so a
record cannot claim another peer's id. This is layerchain's own id; the hivemind DHT node
underneath has its own libp2p peer id, which nothing above ``discovery`` ever sees.

The private key persists under the node's data directory in ``node_key.ed25519`` (PKCS#8 PEM,
unencrypted, mode 0600). A key file readable by group or others is refused, as ssh does.
This module knows nothing of records or networks.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from layerchain.errors import ConfigError

KEY_FILE_NAME = "node_key.ed25519"
PUBLIC_KEY_SIZE = 32  # bytes, raw Ed25519 public key
SIGNATURE_SIZE = 64  # bytes, raw Ed25519 signature
_PEER_ID_DIGEST_BYTES = 16  # 128 bits of sha256: collisions need ~2^64 keys


def peer_id_from_public_key(public_key: bytes) -> str:
    """The peer id of a raw 32-byte Ed25519 public key."""
    return base58.b58encode(hashlib.sha256(public_key).digest()[:_PEER_ID_DIGEST_BYTES]).decode()


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True iff ``signature`` is the Ed25519 signature of ``data`` by ``public_key``.

    Never raises: a malformed key or signature is simply not a valid signature.
    """
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An Ed25519 private key with its public key and peer id. Immutable."""

    __slots__ = ("_private_key", "public_key", "peer_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: str = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh ephemeral identity (clients, tests); nothing is written."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> Identity:
        """Load ``data_dir/node_key.ed25519``, or create it (mode 0600) if it does not exist.

        Raises ConfigError if the file is unreadable, not an Ed25519 key, or readable by
        group or others.
        """
        directory = Path(data_dir)
        path = directory / KEY_FILE_NAME
        if path.exists():
            return cls._load(path)
        directory.mkdir(parents=True, exist_ok=True)
        identity = cls.generate()
        pem = identity._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Write to a private temp file, then link it into place: the key is never visible with
        # looser permissions, and two processes racing here end up sharing one key.
        tmp = directory / f".{KEY_FILE_NAME}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return cls._load(path)
        finally:
            tmp.unlink(missing_ok=True)
        return identity

    @classmethod
    def _load(cls, path: Path) -> Identity:
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(
                    f"node key {path} is accessible by other users",
                    hint=f"run: chmod 600 {path}",
                )
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except OSError as e:
            raise ConfigError(f"cannot read node key {path}: {e.strerror}") from e
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"node key {path} is not a PEM private key",
                hint="move it away to create a new identity",
            ) from e
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"node key {path} is not an Ed25519 key")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._private_key.sign(data)

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The key itself, for a protocol that signs with it on its own: the TLS handshake
        (``wire.tls`` puts it in the node's certificate). Nothing else should need it."""
        return self._private_key

    verify = staticmethod(verify)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r})"

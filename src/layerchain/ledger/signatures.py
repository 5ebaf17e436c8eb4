"""Ethereum-style signatures over 32-byte digests: EIP-191 ``personal_sign``, EIP-712 and ``ecrecover``.

Everything layerchain signs (receipts, vouchers, liveness records) is first reduced to a
32-byte digest ``d = keccak256(abi.encodePacked(...))`` of its canonical bytes. The signer
then signs ``keccak256("\\x19Ethereum Signed Message:\\n32" || d)`` with its secp256k1 key,
which is exactly what ``eth_account``'s ``sign_message(encode_defunct(primitive=d))`` and
Solidity's ``ECDSA.recover(MessageHashUtils.toEthSignedMessageHash(d), sig)`` do, so an
EVM contract can check every signature this module makes.

EIP-712 typed data (vouchers, verdicts) is signed raw instead: the digest is already
``keccak256("\\x19\\x01" || domainSeparator || hashStruct(message))``, bound to one ledger by
its domain (``eip712_domain``), and ``sign_hash`` / ``recover_hash_address`` sign and
recover it without a prefix, as eth_account's ``unsafe_sign_hash`` and Solidity's
``ecrecover(digest, v, r, s)`` do.

Signatures are 65 bytes ``r || s || v`` with ``v`` in {27, 28} and a low ``s`` (EIP-2);
high-``s`` signatures are rejected so a signature has exactly one valid encoding.

This module knows nothing of wallets on disk, receipts or ledgers. It uses libsecp256k1
through ``coincurve`` when installed (sign ~50 µs, recover ~80 µs) and falls back to
``eth_keys`` otherwise (same results, slower).
"""

from __future__ import annotations

import functools
from typing import Protocol

try:  # safe-pysha3 (an eth-hash backend): C, ~3 us a call against eth-hash's ~9 us
    from sha3 import keccak_256 as _keccak_256  # type: ignore[import-untyped, import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - eth-hash's own choice of backend
    _keccak_256 = None


def _keccak(data: bytes) -> bytes:
    if _keccak_256 is None:  # pragma: no cover
        from eth_hash.auto import keccak  # eth-hash picks a backend (~50 ms to import)

        return keccak(data)
    return _keccak_256(data).digest()  # type: ignore[no-any-return]


try:  # libsecp256k1: the fast path
    import coincurve as _coincurve
except ImportError:  # pragma: no cover - exercised only without coincurve
    _coincurve = None  # type: ignore[assignment]  # the module or None: checked before use

SIGNATURE_LENGTH = 65  # r (32) || s (32) || v (1)
_PERSONAL_PREFIX = b"\x19Ethereum Signed Message:\n32"
# Order of the secp256k1 group; a valid low-s signature has s <= N // 2.
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class BadSignature(ValueError):
    """A signature that is malformed or does not recover to a key.

    Internal: callers turn it into the user-facing error of their record
    (InvalidReceipt, InvalidVoucher, LedgerError).
    """


class Signer(Protocol):
    """Anything holding a secp256k1 key that can sign digests (a Wallet)."""

    @property
    def address(self) -> str: ...

    def sign_digest(self, digest: bytes) -> bytes:
        """EIP-191 signature over a 32-byte digest (``personal_sign``)."""
        ...

    def sign_hash(self, digest: bytes) -> bytes:
        """Raw signature over a 32-byte hash, no prefix (an EIP-712 digest)."""
        ...


def keccak256(data: bytes) -> bytes:
    """Keccak-256 (Ethereum's hash, not NIST SHA3-256) of ``data`` (~10 µs a call)."""
    return _keccak(data)


@functools.lru_cache(maxsize=1024)
def keccak256_cached(data: bytes) -> bytes:
    """keccak256 of values that recur on every step (session and model ids)."""
    return _keccak(data)


def personal_digest(digest: bytes) -> bytes:
    """The EIP-191 (version 0x45) hash of a 32-byte digest: what is actually signed."""
    if len(digest) != 32:
        raise BadSignature(f"a digest must be 32 bytes, got {len(digest)}")
    return _keccak(_PERSONAL_PREFIX + digest)


@functools.lru_cache(maxsize=64)
def _coincurve_key(private_key: bytes):  # type: ignore[no-untyped-def]
    """A parsed key, kept: building one costs two EC multiplications (~50 µs)."""
    return _coincurve.PrivateKey(private_key)


def sign_digest(private_key: bytes, digest: bytes) -> bytes:
    """Sign ``digest`` (32 bytes) EIP-191 style; return 65 bytes ``r || s || v``."""
    return sign_hash(private_key, personal_digest(digest))


def sign_hash(private_key: bytes, message_hash: bytes) -> bytes:
    """Sign a 32-byte hash as is (no prefix: an EIP-712 digest); 65 bytes ``r || s || v``,
    low ``s`` (libsecp256k1 and eth_keys both normalize it)."""
    if len(message_hash) != 32:
        raise BadSignature(f"a hash to sign must be 32 bytes, got {len(message_hash)}")
    if _coincurve is not None:
        raw: bytes = _coincurve_key(private_key).sign_recoverable(message_hash, hasher=None)
        return raw[:64] + bytes([raw[64] + 27])
    from eth_keys import keys  # pragma: no cover

    sig = keys.PrivateKey(private_key).sign_msg_hash(message_hash)  # pragma: no cover
    return sig.r.to_bytes(32, "big") + sig.s.to_bytes(32, "big") + bytes([sig.v + 27])


def recover_address_bytes(digest: bytes, signature: bytes) -> bytes:
    """The 20-byte address whose key made the EIP-191 ``signature`` over ``digest``;
    BadSignature if none.

    The hot-path form: compare against an address parsed once with ``address_bytes``.
    """
    return recover_hash_address_bytes(personal_digest(digest), signature)


def recover_hash_address_bytes(message_hash: bytes, signature: bytes) -> bytes:
    """The 20-byte address whose key made the raw ``signature`` over ``message_hash`` (no
    prefix); BadSignature if malformed, high-``s`` or not recovering to a key."""
    if len(message_hash) != 32:
        raise BadSignature(f"a signed hash must be 32 bytes, got {len(message_hash)}")
    if len(signature) != SIGNATURE_LENGTH:
        raise BadSignature(f"a signature must be {SIGNATURE_LENGTH} bytes, got {len(signature)}")
    v = signature[64]
    if v not in (27, 28):
        raise BadSignature(f"signature v must be 27 or 28, got {v}")
    s = int.from_bytes(signature[32:64], "big")
    if s == 0 or s > _SECP256K1_N // 2:
        raise BadSignature("signature s is zero or not in the lower half of the curve order")
    try:
        if _coincurve is not None:
            public = _coincurve.PublicKey.from_signature_and_message(
                signature[:64] + bytes([v - 27]), message_hash, hasher=None
            ).format(compressed=False)[1:]
        else:  # pragma: no cover
            from eth_keys import keys

            sig = keys.Signature(signature[:64] + bytes([v - 27]))
            public = sig.recover_public_key_from_msg_hash(message_hash).to_bytes()
    except Exception as error:  # libsecp256k1 rejects points off the curve, r >= n, ...
        raise BadSignature(f"signature does not recover to a public key: {error}") from None
    return _keccak(public)[-20:]


def recover_address(digest: bytes, signature: bytes) -> str:
    """The checksummed address (``0x...``) that signed ``digest``; BadSignature if none."""
    return checksum_address(recover_address_bytes(digest, signature))


def recover_hash_address(message_hash: bytes, signature: bytes) -> str:
    """The checksummed address whose raw signature (no prefix) is ``signature``."""
    return checksum_address(recover_hash_address_bytes(message_hash, signature))


# -- EIP-712 --------------------------------------------------------------------------------

_DOMAIN_WITH_CONTRACT = keccak256(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
_DOMAIN_WITH_SALT = keccak256(b"EIP712Domain(string name,string version,bytes32 salt)")
EIP712_NAME, EIP712_VERSION = "layerchain", "1"


def eip712_domain(
    *, chain_id: int | None = None, contract: str | None = None, salt: bytes | None = None
) -> bytes:
    """The 32-byte domain separator of a layerchain ledger (name "layerchain", version "1").

    A contract: ``EIP712Domain(string name,string version,uint256 chainId,address
    verifyingContract)``; an off-chain ledger: ``EIP712Domain(string name,string version,
    bytes32 salt)`` with its 32-byte id as salt. ValueError for any other combination."""
    name, version = keccak256(EIP712_NAME.encode()), keccak256(EIP712_VERSION.encode())
    if salt is not None and chain_id is None and contract is None:
        if len(salt) != 32:
            raise ValueError(f"a domain salt is 32 bytes, got {len(salt)}")
        return keccak256(_DOMAIN_WITH_SALT + name + version + salt)
    if salt is None and chain_id is not None and contract is not None:
        return keccak256(
            _DOMAIN_WITH_CONTRACT + name + version + chain_id.to_bytes(32, "big")
            + bytes(12) + address_bytes(contract)
        )
    raise ValueError("an EIP-712 domain has a salt, or a chain id and a contract")


def eip712_digest(domain: bytes, struct_hash: bytes) -> bytes:
    """``keccak256("\\x19\\x01" || domain || struct_hash)``: what EIP-712 signs."""
    if len(domain) != 32 or len(struct_hash) != 32:
        raise ValueError("an EIP-712 domain separator and struct hash are 32 bytes each")
    return keccak256(b"\x19\x01" + domain + struct_hash)


@functools.lru_cache(maxsize=4096)  # the same few addresses recur on every step
def checksum_address(raw: bytes) -> str:
    """EIP-55 mixed-case form of a 20-byte address."""
    text = raw.hex()
    nibbles = _keccak(text.encode()).hex()
    return "0x" + "".join(
        c.upper() if c > "9" and n >= "8" else c for c, n in zip(text, nibbles)
    )


def address_of(private_key: bytes) -> str:
    """The checksummed Ethereum address of a 32-byte secp256k1 private key."""
    if _coincurve is not None:
        public = _coincurve.PrivateKey(private_key).public_key.format(compressed=False)[1:]
    else:  # pragma: no cover
        from eth_keys import keys

        public = keys.PrivateKey(private_key).public_key.to_bytes()
    return checksum_address(_keccak(public)[-20:])


def address_bytes(address: str) -> bytes:
    """The 20 bytes of a ``0x``-prefixed hex address; ValueError if it is not one."""
    text = address[2:] if address[:2] in ("0x", "0X") else ""
    if len(text) != 40:
        raise ValueError(f"not an address: {address!r}")
    return bytes.fromhex(text)


def id32_bytes(value: str) -> bytes:
    """The 32 bytes of a ``0x`` + 64 hex digits id (channel, ledger); ValueError if it is not one."""
    try:
        raw = bytes.fromhex(value[2:]) if value.startswith("0x") else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{value!r} is not 0x + 64 hex digits")
    return raw


def normalize_address(address: str) -> str:
    """``address`` in checksummed form; ValueError if it is not a 20-byte hex address."""
    return checksum_address(address_bytes(address))

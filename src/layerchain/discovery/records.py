"""Signed peer records: what a node announces about itself, and the pure check of one.

A record is a frozen ``PeerRecord``; its *canonical bytes* are msgpack of a map with sorted
keys (plus a format tag, so the signature cannot be replayed as another kind of message);
the stored *blob* is msgpack ``[canonical_bytes, signature]``. Verification is a pure
function of ``(blob, now)`` (hivemind ``dht/validation.py`` style):

* ``open_record(blob)``: structure, limits, Ed25519 signature by the record's own public
  key, ``peer_id == peer_id_from_public_key(public_key)``, canonical encoding;
* ``check_fresh(record, now)``: ``expires_at > now``;
* ``verify_record(blob, now)``: both.

Every failure is a ``ProtocolError`` with a one-line reason. This module knows nothing of
DHTs; which key a record is stored under is ``discovery.base``'s business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from layerchain import __version__
from layerchain.discovery.identity import Identity, peer_id_from_public_key, verify
from layerchain.errors import ProtocolError, SpanError
from layerchain.types import Span

RECORD_FORMAT = "layerchain/peer-record/1"
MAX_RECORD_BYTES = 32 * 1024  # a blob larger than this is rejected before decoding
MAX_RTTS = 256  # RTT entries per record
MAX_BLOCKS = 100_000  # sanity bound on block indices
_MAX_STR = {"peer_id": 64, "endpoint": 256, "model_id": 256, "wallet": 128, "version": 64}


@dataclass(frozen=True)
class PeerRecord:
    """One peer's announcement: it serves blocks ``[start, end)`` of ``model_id`` at ``endpoint``.

    Invariants (checked on construction, so every PeerRecord in memory satisfies them):
    ``peer_id`` is derived from ``public_key``; ``0 <= start < end``; numbers finite, >= 0.
    """

    peer_id: str  # base58 id derived from public_key (identity.peer_id_from_public_key)
    public_key: bytes  # raw 32-byte Ed25519 public key that signs this record
    endpoint: str  # where to connect for inference, e.g. "tcp://127.0.0.1:31337"
    model_id: str  # the model (manifest hash or name) the blocks belong to
    start: int  # first block served
    end: int  # one past the last block served
    ms_per_block: float  # measured compute cost, milliseconds per block per token
    price_per_block: int  # credits per block per token
    free_cache_tokens: int  # KV-cache tokens still admissible for new sessions
    wallet: str  # payment address (0x... Ethereum address), "" if none
    rtts: tuple[tuple[str, float], ...]  # (peer_id, round-trip time in ms) to known peers
    version: str  # layerchain software/protocol version of the announcing node
    expires_at: float  # absolute unix time (seconds) after which the record is void

    def __post_init__(self) -> None:
        # Coerce numbers so that equal records have equal canonical bytes.
        object.__setattr__(self, "ms_per_block", _finite(self.ms_per_block, "ms_per_block"))
        object.__setattr__(self, "expires_at", _finite(self.expires_at, "expires_at", low=None))
        object.__setattr__(self, "rtts", _rtts(self.rtts))
        for name, limit in _MAX_STR.items():
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > limit:
                raise ProtocolError(f"malformed peer record: {name} must be a string of <= {limit}")
        if not self.model_id:
            raise ProtocolError("malformed peer record: empty model_id")
        for name in ("start", "end", "price_per_block", "free_cache_tokens"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ProtocolError(f"malformed peer record: {name} must be an int >= 0")
        if self.end > MAX_BLOCKS:
            raise ProtocolError(f"malformed peer record: end {self.end} > {MAX_BLOCKS}")
        try:
            Span(self.start, self.end)
        except SpanError as e:
            raise ProtocolError(f"malformed peer record: {e.message}") from None
        if not isinstance(self.public_key, bytes) or len(self.public_key) != 32:
            raise ProtocolError("malformed peer record: public_key must be 32 bytes")
        if self.peer_id != peer_id_from_public_key(self.public_key):
            raise ProtocolError(
                f"peer record of {self.peer_id!r} does not match its public key"
            )

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        model_id: str,
        span: Span,
        endpoint: str,
        ms_per_block: float = 0.0,
        price_per_block: int = 0,
        free_cache_tokens: int = 0,
        wallet: str = "",
        rtts: tuple[tuple[str, float], ...] = (),
        version: str = __version__,
        expires_at: float = 0.0,  # the Announcer stamps now + ttl_s
    ) -> PeerRecord:
        """A record of ``identity`` (peer id and public key filled in from it)."""
        return cls(
            peer_id=identity.peer_id,
            public_key=identity.public_key,
            endpoint=endpoint,
            model_id=model_id,
            start=span.start,
            end=span.end,
            ms_per_block=ms_per_block,
            price_per_block=price_per_block,
            free_cache_tokens=free_cache_tokens,
            wallet=wallet,
            rtts=rtts,
            version=version,
            expires_at=expires_at,
        )

    @property
    def span(self) -> Span:
        return Span(self.start, self.end)

    @property
    def blocks(self) -> range:
        return range(self.start, self.end)

    def canonical_bytes(self) -> bytes:
        """Deterministic msgpack encoding: the bytes that are signed."""
        return _encode_fields({f.name: getattr(self, f.name) for f in fields(self)})


def _finite(value: Any, name: str, low: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"malformed peer record: {name} must be a number")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low):
        raise ProtocolError(f"malformed peer record: {name} must be finite and >= {low}")
    return value


def _rtts(value: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_RTTS:
        raise ProtocolError(f"malformed peer record: rtts must be a list of <= {MAX_RTTS} pairs")
    out = []
    for item in value:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ProtocolError("malformed peer record: each rtt must be (peer_id, ms)")
        peer, ms = item
        if not isinstance(peer, str) or len(peer) > _MAX_STR["peer_id"]:
            raise ProtocolError("malformed peer record: rtt peer id must be a short string")
        out.append((peer, _finite(ms, "rtt")))
    return tuple(out)


def _encode_fields(values: dict[str, Any]) -> bytes:
    body = {"format": RECORD_FORMAT, **values}
    body["rtts"] = [list(pair) for pair in body.get("rtts", ())]
    return msgpack.packb({k: body[k] for k in sorted(body)}, use_bin_type=True)


def sign_record(identity: Identity, record: PeerRecord) -> bytes:
    """The storable blob of ``record``, signed by ``identity`` (which must be the record's peer)."""
    if record.public_key != identity.public_key:
        raise ProtocolError(
            f"cannot sign a record of peer {record.peer_id!r} with the key of {identity.peer_id!r}"
        )
    payload = record.canonical_bytes()
    return msgpack.packb([payload, identity.sign(payload)], use_bin_type=True)


_FIELD_NAMES = frozenset(f.name for f in fields(PeerRecord))


def open_record(blob: bytes) -> PeerRecord:
    """Decode ``blob`` and check its signature and encoding, ignoring time.

    Raises ProtocolError if the blob is malformed, oversized, not canonical, or not signed
    by the key whose peer id it claims.
    """
    if not isinstance(blob, bytes) or len(blob) > MAX_RECORD_BYTES:
        raise ProtocolError(f"peer record blob must be bytes of <= {MAX_RECORD_BYTES}")
    try:
        outer = msgpack.unpackb(blob, raw=False)
        payload, signature = outer
        body = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.UnpackException) as e:
        raise ProtocolError(f"malformed peer record: {type(e).__name__}") from None
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise ProtocolError("malformed peer record: expected [payload, signature] bytes")
    if not isinstance(body, dict) or body.get("format") != RECORD_FORMAT:
        raise ProtocolError("malformed peer record: unknown format")
    values = {k: v for k, v in body.items() if k != "format"}
    if set(values) != _FIELD_NAMES:
        raise ProtocolError("malformed peer record: wrong set of fields")
    public_key = values["public_key"]
    if not isinstance(public_key, bytes) or not verify(public_key, signature, payload):
        raise ProtocolError("peer record has a bad signature")
    record = PeerRecord(**values)  # re-checks invariants, incl. peer_id <-> public_key
    if record.canonical_bytes() != payload:
        raise ProtocolError("malformed peer record: not canonically encoded")
    return record


def check_fresh(record: PeerRecord, now: float) -> PeerRecord:
    """Return ``record``, or raise ProtocolError if it expired at or before ``now`` (unix s)."""
    if record.expires_at <= now:
        raise ProtocolError(
            f"peer record of {record.peer_id!r} expired {now - record.expires_at:.1f} s ago"
        )
    return record


def verify_record(blob: bytes, now: float) -> PeerRecord:
    """The record in ``blob`` if it is well-formed, correctly signed and unexpired at ``now``."""
    return check_fresh(open_record(blob), now)

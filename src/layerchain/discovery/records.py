"""Signed peer records: what a node announces about itself, and the pure check of one.

A record is a frozen ``PeerRecord``; its *canonical bytes* are msgpack of a map with sorted
keys (plus a format tag, so the signature cannot be replayed as another kind of message);
the stored *blob* is msgpack ``[canonical_bytes, signature]``. Verification is a pure
function of ``(blob, now)`` (hivemind ``dht/validation.py`` style):

* ``open_record(blob)``: structure, limits, Ed25519 signature by the record's own public
  key, ``peer_id == peer_id_from_public_key(public_key)``, canonical encoding;
* ``check_fresh(record, now)``: ``now < expires_at <= now + MAX_RECORD_TTL_S``;
* ``verify_record(blob, now)``: both.

Every field is range-checked on construction (``PeerRecord.__post_init__``), so a record
that decodes is one a client may plan with: a well-formed endpoint (``tcp://HOST:PORT``
with a non-empty host and a port in 1..65535, or ``mem://NAME`` of the in-memory
transport), ``ms_per_block`` in ``[MIN_MS_PER_BLOCK, MAX_MS_PER_BLOCK]``, price, free
cache, RTTs and block indices below hard caps, a wallet that is "" or a checksummed
20-byte address, printable short strings. A *tombstone* (empty endpoint, see
``discovery.base``) says "serves nothing": its numbers must be zero, with no wallet and
no RTTs.

Every failure is a ``ProtocolError`` with a one-line reason. This module knows nothing of
DHTs; which key a record is stored under is ``discovery.base``'s business.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any

import msgpack
from eth_utils import is_checksum_address

from layerchain import __version__
from layerchain.discovery.identity import Identity, peer_id_from_public_key, verify
from layerchain.errors import ProtocolError, SpanError
from layerchain.types import Span

RECORD_FORMAT = "layerchain/peer-record/1"
MAX_RECORD_BYTES = 32 * 1024  # a blob larger than this is rejected before decoding
MAX_RTTS = 256  # RTT entries per record
MAX_BLOCKS = 100_000  # sanity bound on block indices
MAX_RECORD_TTL_S = 600.0  # a record may expire at most this many seconds after "now"
MIN_MS_PER_BLOCK = 1e-3  # ms per block per token: 1 us, faster than any real block
MAX_MS_PER_BLOCK = 60_000.0  # ms per block per token: a minute, slower than any useful one
MAX_PRICE_PER_BLOCK = 10**9  # credits per block per token
MAX_FREE_CACHE_TOKENS = 1 << 24  # KV-cache tokens (16 Mi)
MAX_RTT_MS = 60_000.0  # an announced round trip, ms
_MAX_STR = {"peer_id": 64, "endpoint": 256, "model_id": 256, "wallet": 128, "version": 64}
_PRINTABLE = re.compile(r"[\x20-\x7e]*")  # strings a terminal shows as they are
# tcp://HOST:PORT: a DNS name or IPv4 address, or [IPv6]; mem://NAME (in-memory transport)
_TCP_ENDPOINT = re.compile(r"tcp://(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")
_MEM_ENDPOINT = re.compile(r"mem://[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class PeerRecord:
    """One peer's announcement: it serves blocks ``[start, end)`` of ``model_id`` at ``endpoint``.

    Invariants (checked on construction, so every PeerRecord in memory satisfies them):
    ``peer_id`` is derived from ``public_key``; ``0 <= start < end <= MAX_BLOCKS``; every
    field within the caps of the module docstring (``check_limits``).
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
        check_limits(self)

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        model_id: str,
        span: Span,
        endpoint: str,
        ms_per_block: float,
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


def check_limits(record: PeerRecord) -> None:
    """Pure: raise ProtocolError naming the first field of ``record`` outside its caps.

    Types are checked before (``__post_init__``); this is the range check of the module
    docstring, the same for the DHT validator, the store and the client reading."""
    for name in ("model_id", "version"):
        if not _PRINTABLE.fullmatch(getattr(record, name)):
            raise ProtocolError(f"malformed peer record: {name} must be printable ASCII")
    if record.endpoint == "":  # a tombstone: it announces nothing
        if (record.ms_per_block, record.price_per_block, record.free_cache_tokens) != (0, 0, 0) \
                or record.wallet or record.rtts:
            raise ProtocolError("malformed peer record: a tombstone must carry no values")
        return
    check_endpoint(record.endpoint)
    if not MIN_MS_PER_BLOCK <= record.ms_per_block <= MAX_MS_PER_BLOCK:
        raise ProtocolError(
            f"malformed peer record: ms_per_block {record.ms_per_block:g} outside "
            f"[{MIN_MS_PER_BLOCK:g}, {MAX_MS_PER_BLOCK:g}]"
        )
    if record.price_per_block > MAX_PRICE_PER_BLOCK:
        raise ProtocolError(f"malformed peer record: price_per_block > {MAX_PRICE_PER_BLOCK}")
    if record.free_cache_tokens > MAX_FREE_CACHE_TOKENS:
        raise ProtocolError(
            f"malformed peer record: free_cache_tokens > {MAX_FREE_CACHE_TOKENS}"
        )
    if any(ms > MAX_RTT_MS for _, ms in record.rtts):
        raise ProtocolError(f"malformed peer record: an rtt above {MAX_RTT_MS:g} ms")
    if record.wallet and not is_checksum_address(record.wallet):
        raise ProtocolError(
            "malformed peer record: wallet must be a checksummed 0x address of 20 bytes"
        )


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if it is ``tcp://HOST:PORT`` (port 1..65535) or ``mem://NAME``, else
    ProtocolError."""
    tcp = _TCP_ENDPOINT.fullmatch(endpoint)
    if tcp is not None and 1 <= int(tcp.group(1)) <= 65535:
        return endpoint
    if _MEM_ENDPOINT.fullmatch(endpoint):
        return endpoint
    raise ProtocolError(
        f"malformed peer record: endpoint {endpoint[:64]!r} is not tcp://HOST:PORT"
    )


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
    """Return ``record``, or raise ProtocolError if it expired at or before ``now`` (unix s)
    or expires more than ``MAX_RECORD_TTL_S`` after it (a record nobody could withdraw)."""
    if record.expires_at <= now:
        raise ProtocolError(
            f"peer record of {record.peer_id!r} expired {now - record.expires_at:.1f} s ago"
        )
    check_expiry(record.expires_at, now)
    return record


def check_expiry(expires_at: float, now: float) -> None:
    """ProtocolError if ``expires_at`` lies more than ``MAX_RECORD_TTL_S`` after ``now``."""
    if expires_at > now + MAX_RECORD_TTL_S:
        raise ProtocolError(
            f"peer record expires {expires_at - now:.0f} s from now; at most "
            f"{MAX_RECORD_TTL_S:.0f} s are allowed"
        )


def verify_record(blob: bytes, now: float) -> PeerRecord:
    """The record in ``blob`` if it is well-formed, correctly signed and unexpired at ``now``."""
    return check_fresh(open_record(blob), now)

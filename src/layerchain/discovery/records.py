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
that decodes is one a client may plan with: 1..``MAX_ENDPOINTS`` distinct well-formed
endpoints in order of preference (``check_endpoint``: ``tls://HOST:PORT``,
``tcp://HOST:PORT``, ``relay://HOST:PORT/PEER_ID`` or ``mem://NAME``; a host that is a
name or an IP address other than the unspecified ``0.0.0.0`` / ``::``, a port in
1..65535), ``ms_per_block`` in ``[MIN_MS_PER_BLOCK, MAX_MS_PER_BLOCK]``, price, free
cache, RTTs and block indices below hard caps, a wallet that is "" or a checksummed
20-byte address, printable short strings. A *tombstone* (no endpoints, see
``discovery.base``) says "serves nothing": its numbers must be zero, with no wallet, no
RTTs and no relay offer.

Format 2 (``RECORD_FORMAT``) replaced format 1's single ``endpoint`` string by the
``endpoints`` list and added ``relay``; a format-1 blob is refused as an unknown format
(nodes re-announce every few seconds, so a mixed swarm heals as it upgrades).

``load`` (issue 16.2) is optional within format 2: a record without it encodes exactly
as before (the key is left out), so records of older nodes still verify; a record with it
carries ``[sessions, queued_steps, step_ms]`` (``PeerLoad``, each bounded). Clients plan
with it (``routing.load``); it is a claim like ``ms_per_block``, and a node that hides its
load only attracts the queueing it then makes its clients wait out.

Every failure is a ``ProtocolError`` with a one-line reason. This module knows nothing of
DHTs; which key a record is stored under is ``discovery.base``'s business.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from layerchain import __version__
from layerchain.discovery.identity import Identity, peer_id_from_public_key, verify
from layerchain.errors import ProtocolError, SpanError
from layerchain.types import Span

_HEX_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")

RECORD_FORMAT = "layerchain/peer-record/2"
MAX_RECORD_BYTES = 32 * 1024  # a blob larger than this is rejected before decoding
MAX_RTTS = 256  # RTT entries per record
MAX_BLOCKS = 100_000  # sanity bound on block indices
MAX_RECORD_TTL_S = 600.0  # a record may expire at most this many seconds after "now"
MIN_MS_PER_BLOCK = 1e-3  # ms per block per token: 1 us, faster than any real block
MAX_MS_PER_BLOCK = 60_000.0  # ms per block per token: a minute, slower than any useful one
MAX_PRICE_PER_BLOCK = 10**9  # credits per block per token
MAX_FREE_CACHE_TOKENS = 1 << 24  # KV-cache tokens (16 Mi)
MAX_RTT_MS = 60_000.0  # an announced round trip, ms
MAX_ENDPOINTS = 4  # endpoints per record
MAX_ENDPOINT_CHARS = 256  # characters per endpoint
_MAX_STR = {"peer_id": 64, "model_id": 256, "wallet": 128, "version": 64}
_PRINTABLE = re.compile(r"[\x20-\x7e]*")  # strings a terminal shows as they are
# SCHEME://HOST:PORT: HOST a DNS name or IPv4 address, or [IPv6]; relay:// adds /PEER_ID
# (the peer reached through the relay at HOST:PORT); mem://NAME (in-memory transport)
_HOST_PORT = r"([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})"
_NET_ENDPOINT = re.compile(rf"(tls|tcp)://{_HOST_PORT}")
_RELAY_ENDPOINT = re.compile(rf"relay://{_HOST_PORT}/([1-9A-HJ-NP-Za-km-z]{{16,24}})")
_MEM_ENDPOINT = re.compile(r"mem://[A-Za-z0-9._-]+")
_NUMERIC_LABEL = re.compile(r"[0-9]*|0[xX][0-9A-Fa-f]*")  # what inet_aton reads as a number


MAX_LOAD_SESSIONS = 1 << 20  # open sessions a load may announce
MAX_QUEUED_STEPS = 1 << 16  # mean steps in flight a load may announce


@dataclass(frozen=True)
class PeerLoad:
    """What a node is doing now (issue 16.2), announced in its record.

    ``queued_steps`` is the time-averaged number of steps in flight on the node (waiting
    or computing) over its last few seconds, so ``queued_steps * step_ms`` estimates how
    long a new step waits before it computes (``routing.load.expected_queue_ms``)."""

    sessions: int  # inference sessions open now
    queued_steps: float  # mean steps in flight (queued or computing), recent seconds
    step_ms: float  # recent mean wall time of a one-token step over the whole span, ms;
    # 0.0: none measured yet

    def __post_init__(self) -> None:
        if type(self.sessions) is not int or not 0 <= self.sessions <= MAX_LOAD_SESSIONS:
            raise ProtocolError(
                f"malformed peer record: load sessions must be an int in 0..{MAX_LOAD_SESSIONS}")
        object.__setattr__(self, "queued_steps", _finite(self.queued_steps, "load queued_steps"))
        object.__setattr__(self, "step_ms", _finite(self.step_ms, "load step_ms"))
        if self.queued_steps > MAX_QUEUED_STEPS:
            raise ProtocolError(
                f"malformed peer record: load queued_steps above {MAX_QUEUED_STEPS}")
        if self.step_ms > MAX_MS_PER_BLOCK * MAX_BLOCKS:
            raise ProtocolError("malformed peer record: load step_ms above any span's")

    def encoded(self) -> list[int | float]:
        return [self.sessions, self.queued_steps, self.step_ms]

    @classmethod
    def decode(cls, value: Any) -> PeerLoad:
        """A PeerLoad from its encoded ``[sessions, queued_steps, step_ms]``."""
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise ProtocolError(
                "malformed peer record: load must be [sessions, queued_steps, step_ms]")
        return cls(*value)


@dataclass(frozen=True)
class PeerRecord:
    """One peer's announcement: it serves blocks ``[start, end)`` of ``model_id`` at ``endpoints``.

    Invariants (checked on construction, so every PeerRecord in memory satisfies them):
    ``peer_id`` is derived from ``public_key``; ``0 <= start < end <= MAX_BLOCKS``; every
    field within the caps of the module docstring (``check_limits``).
    """

    peer_id: str  # base58 id derived from public_key (identity.peer_id_from_public_key)
    public_key: bytes  # raw 32-byte Ed25519 public key that signs this record
    endpoints: tuple[str, ...]  # where to connect for inference, best first, e.g.
    # ("tls://192.168.1.7:31337", "tls://10.0.0.7:31337"); () for a tombstone
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
    relay: bool = False  # this node relays connections to peers that cannot accept any
    load: PeerLoad | None = None  # the node's load now (None: not announced; older nodes)

    def __post_init__(self) -> None:
        # Coerce numbers so that equal records have equal canonical bytes.
        object.__setattr__(self, "ms_per_block", _finite(self.ms_per_block, "ms_per_block"))
        object.__setattr__(self, "expires_at", _finite(self.expires_at, "expires_at", low=None))
        object.__setattr__(self, "rtts", _rtts(self.rtts))
        object.__setattr__(self, "endpoints", _endpoints(self.endpoints))
        if type(self.relay) is not bool:
            raise ProtocolError("malformed peer record: relay must be true or false")
        if self.load is not None and not isinstance(self.load, PeerLoad):
            raise ProtocolError("malformed peer record: load must be a PeerLoad")
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
        endpoint: str = "",
        endpoints: tuple[str, ...] = (),
        ms_per_block: float,
        price_per_block: int = 0,
        free_cache_tokens: int = 0,
        wallet: str = "",
        rtts: tuple[tuple[str, float], ...] = (),
        version: str = __version__,
        expires_at: float = 0.0,  # the Announcer stamps now + ttl_s
        relay: bool = False,
        load: PeerLoad | None = None,
    ) -> PeerRecord:
        """A record of ``identity`` (peer id and public key filled in from it), reachable
        at ``endpoints`` (best first) or at the one ``endpoint``: give one of the two."""
        if bool(endpoint) == bool(endpoints):
            raise ProtocolError("a peer record needs endpoint or endpoints, not both or none")
        return cls(
            peer_id=identity.peer_id,
            public_key=identity.public_key,
            endpoints=endpoints or (endpoint,),
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
            relay=relay,
            load=load,
        )

    @property
    def endpoint(self) -> str:
        """The preferred endpoint (``endpoints[0]``); "" for a tombstone."""
        return self.endpoints[0] if self.endpoints else ""

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
    if not record.endpoints:  # a tombstone: it announces nothing
        if (record.ms_per_block, record.price_per_block, record.free_cache_tokens) != (0, 0, 0) \
                or record.wallet or record.rtts or record.relay or record.load is not None:
            raise ProtocolError("malformed peer record: a tombstone must carry no values")
        return
    for endpoint in record.endpoints:
        check_endpoint(endpoint)
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
    if record.wallet and not _is_checksum_address(record.wallet):
        raise ProtocolError(
            "malformed peer record: wallet must be a checksummed 0x address of 20 bytes"
        )


def check_endpoint(endpoint: str) -> str:
    """Pure: ``endpoint`` if a client could dial it, else ProtocolError saying why.

    Accepted: ``tls://HOST:PORT``, ``tcp://HOST:PORT``, ``relay://HOST:PORT/PEER_ID`` (a
    base58 peer id) and ``mem://NAME``; HOST a DNS name, an IPv4 address in dotted-quad
    form or ``[IPv6]``, never the unspecified address (``0.0.0.0``, ``[::]``: a listener's
    wildcard, which no other machine can dial; nor its legacy spellings such as ``0``,
    which resolvers accept); PORT in 1..65535; at most ``MAX_ENDPOINT_CHARS`` chars.
    """
    if not isinstance(endpoint, str) or len(endpoint) > MAX_ENDPOINT_CHARS:
        raise ProtocolError(
            f"malformed peer record: an endpoint must be a string of <= {MAX_ENDPOINT_CHARS}"
        )
    if _MEM_ENDPOINT.fullmatch(endpoint):
        return endpoint
    match = _NET_ENDPOINT.fullmatch(endpoint) or _RELAY_ENDPOINT.fullmatch(endpoint)
    if match is None:
        raise ProtocolError(
            f"malformed peer record: endpoint {endpoint[:64]!r} is not tls://HOST:PORT, "
            "tcp://HOST:PORT, relay://HOST:PORT/PEER_ID or mem://NAME"
        )
    host, port = (match.group(2), int(match.group(3))) if match.re is _NET_ENDPOINT \
        else (match.group(1), int(match.group(2)))
    if not 1 <= port <= 65535:
        raise ProtocolError(f"malformed peer record: port {port} of {endpoint[:64]!r} "
                            "is outside 1..65535")
    try:
        unspecified = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:  # a DNS name, unless its last label is a number: no top-level
        # domain is, but the resolver reads "0", "127.1" or "0x7f.1" as IPv4 addresses
        if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
            raise ProtocolError(
                f"malformed peer record: {host[:64]!r} in {endpoint[:64]!r} is neither a "
                "DNS name nor an IP address in standard form"
            ) from None
        unspecified = False
    if unspecified:
        raise ProtocolError(
            f"malformed peer record: {endpoint[:64]!r} names the wildcard address, which "
            "no peer can dial"
        )
    return endpoint


def _endpoints(value: Any) -> tuple[str, ...]:
    """``value`` as a tuple of distinct strings (each checked by ``check_limits``)."""
    if not isinstance(value, (tuple, list)) or len(value) > MAX_ENDPOINTS:
        raise ProtocolError(
            f"malformed peer record: endpoints must be a list of <= {MAX_ENDPOINTS} strings"
        )
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_ENDPOINT_CHARS:
            raise ProtocolError(
                f"malformed peer record: an endpoint must be a string of <= {MAX_ENDPOINT_CHARS}"
            )
    if len(set(value)) != len(value):
        raise ProtocolError("malformed peer record: an endpoint is listed twice")
    return tuple(value)


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
    if body.get("load") is None:  # optional: left out, so older records' bytes are unchanged
        body.pop("load", None)
    else:
        body["load"] = body["load"].encoded()
    body["rtts"] = [list(pair) for pair in body.get("rtts", ())]
    if "endpoints" in body:
        body["endpoints"] = list(body["endpoints"])
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
_OPTIONAL_FIELDS = frozenset({"load"})  # may be absent from a blob (records of older nodes)


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
    if not _FIELD_NAMES - _OPTIONAL_FIELDS <= set(values) <= _FIELD_NAMES:
        raise ProtocolError("malformed peer record: wrong set of fields")
    if values.get("load") is not None:  # an explicit nil is not canonical: refused below
        values["load"] = PeerLoad.decode(values["load"])
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


def _is_checksum_address(text: object) -> bool:
    """EIP-55: ``0x`` and 40 hex digits whose letters' case is the checksum (eth_utils'
    ``is_checksum_address``, the same answers: tested). Not eth_utils itself: importing it
    (pydantic with it) on a client's first record check cost ~0.3 s of a one-shot
    generate's start-up (docs/BENCHMARKS.md, "Start-up")."""
    if not isinstance(text, str) or _HEX_ADDRESS.fullmatch(text) is None:
        return False
    from layerchain.ledger.signatures import checksum_address  # keccak: loaded on first use

    return checksum_address(bytes.fromhex(text[2:])) == text

"""The model catalog: which models the swarm serves, announced by the nodes that serve them.

Layout (issue 20.2): one well-known DHT key, ``CATALOG_KEY``, sub-keyed by peer id like a
block key (``discovery.base``). Each node stores there one signed ``CatalogEntry``: the id
its peer records use (``model_id``), the form it computes in (``dtype``) and the model's
whole *manifest* (``model.shards`` format: name, family, num_blocks, config, the sha256 of
every block file, of the head and of the tokenizer files, the chat template among them),
as canonical JSON. A node serves one model, so one entry per peer; it is refreshed with
the node's peer record (``CatalogAnnouncer``) and withdrawn by a tombstone (an entry with
no model) when the node stops.

Why the whole manifest: an entry is checked against its own id, by every DHT node on store
and by every reader (``open_entry``): ``model_id == form_model_id(manifest_id(manifest),
dtype)``, where ``manifest_id`` is the sha256 of the manifest's canonical JSON without its
``model_id`` and (version 2) ``name`` (``model.shards.manifest_id``). So nobody can announce
another model's id with other block hashes, config or block count: such an entry is refused,
and entries that share an id share every byte of their manifest but the name, a label (the
listing shows the name most of its peers announce). Readers group by id, never by name (two
models called "smollm2" are two rows). The cost: a read returns every serving peer's manifest
(a few KiB each: ~6 KiB for 30 blocks), fine for a listing command; a swarm of thousands
would move manifests to per-model keys.

What a listing shows (``list_models``, ``model_entries``): the verified catalog joined with
the peer records of each model (``Discovery.find``): ``servers`` (peers with a live
record), ``replicas`` (servers per block), ``blocks_served`` (blocks with at least one) and
``throughput_tokens_per_s``, the swarm's *capacity* for the model (``coverage``): a server
announcing ``c`` ms per block per token over ``n`` blocks adds ``1000 / (c * n)`` tokens/s
to each block of its span (it computes one token of its whole span at a time); a block's
capacity is the sum over its servers, and the model's the capacity of its least-served
block (every token passes every block), 0 while a block has no server. Network time and
batching are left out: an upper bound on sequential decoding, comparable across models.

Entry rule (``check_catalog_entry``): as for peer records, the sub-key is the signer's peer
id, the entry expires when its record does and at most ``MAX_RECORD_TTL_S`` from now, the
blob is at most ``MAX_CATALOG_BYTES``, the strings are printable and bounded, the manifest
well-formed (``summarize``). ``check_stored_entry`` accepts a peer record or a catalog
entry: hivemind hashes keys before a validator sees them, so the DHT's validator
(``validator.py``) and ``MemoryDHT`` cannot tell a block key from the catalog key; readers
keep only the kind their key holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import msgpack

from layerchain.discovery.announcer import AnnounceConfig
from layerchain.discovery.base import (
    TOMBSTONE_MARGIN_S,
    Discovery,
    DiscoveryStats,
    check_entry,
    is_tombstone,
    looks_like_peer_id,
)
from layerchain.discovery.identity import Identity, peer_id_from_public_key, verify
from layerchain.discovery.records import MAX_BLOCKS, PeerRecord, check_expiry
from layerchain.errors import ConfigError, ProtocolError
from layerchain.model.digest import digest_of

logger = logging.getLogger(__name__)

CATALOG_KEY = "layerchain.catalog"  # the one DHT key of the catalog (sub-key: peer id)
CATALOG_FORMAT = "layerchain/catalog-entry/1"
MAX_CATALOG_BYTES = 64 * 1024  # a blob larger than this is refused before decoding
MAX_MANIFEST_BYTES = 60 * 1024  # canonical JSON of a manifest: ~110 B per block, so
# about 500 blocks with a large config; no model we know has more than 200
MAX_NAME_CHARS = 128  # a model's name or family
MAX_HIDDEN_SIZE = 1 << 20  # features per token: far above any model's (a sanity bound)
MAX_LISTED_MODELS = 64  # a listing reads the records of at most this many models (those
# announced by the most peers): fake models announced by many identities cost a reader
# one DHT read each, so their number is capped
_MAX_STR = {"peer_id": 64, "model_id": 64, "dtype": 16}
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelSummary:
    """What a manifest says about its model, as a listing shows it (``summarize``)."""

    weights_id: str  # manifest_id(manifest): the fp32 model id of these weights
    name: str  # display name, printable, <= MAX_NAME_CHARS (not unique: ids are)
    family: str  # the family registry's name ("llama", "qwen2", ...)
    num_blocks: int  # transformer blocks, 1..MAX_BLOCKS
    hidden_size: int  # width of the hidden states a hop passes on
    block_sha256: tuple[str, ...]  # hex sha256 of each block file, num_blocks of them
    tokenizer_sha256: str  # digest of the tokenizer files' sha256 (chat template included)


def canonical_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The canonical JSON of ``manifest`` (sorted keys, no spaces; ``digest.digest_of``'s
    form), as a catalog entry carries it."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str).encode()


def summarize(manifest: Mapping[str, Any]) -> ModelSummary:
    """Pure: the summary of a shard manifest, or ProtocolError naming what is malformed.

    Reads ``name``, ``family``, ``num_blocks``, ``config.hidden_size`` (or the text config's),
    ``blocks`` (a ``{"0": {"sha256": ...}, ...}`` map or a list, one per block) and
    ``files``; ``weights_id`` is the manifest's id (``model.shards.manifest_id``)."""
    # model.shards imports torch: loaded on the first check, not with the discovery package
    # (whoever checks entries runs a DHT node, which loads hivemind and torch anyway)
    from layerchain.model.shards import manifest_id

    num_blocks = manifest.get("num_blocks")
    if type(num_blocks) is not int or not 0 < num_blocks <= MAX_BLOCKS:
        raise ProtocolError(f"malformed catalog entry: num_blocks must be an int in 1..{MAX_BLOCKS}")
    return ModelSummary(
        weights_id=manifest_id(dict(manifest)),
        name=_label(manifest, "name"), family=_label(manifest, "family"), num_blocks=num_blocks,
        hidden_size=_hidden_size(manifest.get("config")),
        block_sha256=_block_hashes(manifest.get("blocks"), num_blocks),
        tokenizer_sha256=digest_of({"files": manifest.get("files", {})}),
    )


def _label(manifest: Mapping[str, Any], key: str) -> str:
    value = manifest.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS \
            or not _PRINTABLE.fullmatch(value):
        raise ProtocolError(f"malformed catalog entry: manifest {key} must be printable "
                            f"ASCII of 1..{MAX_NAME_CHARS} characters")
    return value


def _block_hashes(blocks: object, num_blocks: int) -> tuple[str, ...]:
    """The sha256 of each block file of a manifest's ``blocks`` (a map "0".."L-1" or a list)."""
    if isinstance(blocks, Mapping) and len(blocks) == num_blocks:
        listed = [blocks.get(str(i)) for i in range(num_blocks)]
    elif isinstance(blocks, list) and len(blocks) == num_blocks:
        listed = blocks
    else:
        raise ProtocolError(f"malformed catalog entry: the manifest must list {num_blocks} blocks")
    hashes = []
    for block in listed:
        sha = block.get("sha256") if isinstance(block, Mapping) else None
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ProtocolError("malformed catalog entry: every block needs a hex sha256")
        hashes.append(sha)
    return tuple(hashes)


def _hidden_size(config: object) -> int:
    if isinstance(config, Mapping) and "hidden_size" not in config:
        config = config.get("text_config")  # multimodal configs (Gemma 3) nest the text one
    size = config.get("hidden_size") if isinstance(config, Mapping) else None
    if type(size) is not int or not 0 < size <= MAX_HIDDEN_SIZE:
        raise ProtocolError("malformed catalog entry: the manifest's config has no hidden_size")
    return size


@dataclass(frozen=True)
class CatalogEntry:
    """A peer's signed word that it serves the model of ``manifest`` as ``model_id``.

    Invariants (checked on construction): ``peer_id`` is derived from ``public_key``; for a
    live entry ``model_id == form_model_id(summary.weights_id, dtype)`` (see the module
    docstring), for a tombstone (``manifest == b""``) ``model_id`` and ``dtype`` are empty.
    """

    peer_id: str  # base58 id derived from public_key
    public_key: bytes  # raw 32-byte Ed25519 key that signs the entry
    model_id: str  # the id the peer's records use: its manifest's hash in its form; "" tombstone
    dtype: str  # the form the peer computes in ("fp32", "int8", ...); "" tombstone
    manifest: bytes  # canonical JSON of the model's manifest (canonical_manifest); b"" tombstone
    expires_at: float  # absolute unix time (s) after which the entry is void
    summary: ModelSummary | None = field(default=None, init=False, compare=False, repr=False)
    # what the manifest says (None for a tombstone); derived, not encoded

    def __post_init__(self) -> None:
        for name, limit in _MAX_STR.items():
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > limit or not _PRINTABLE.fullmatch(value):
                raise ProtocolError(
                    f"malformed catalog entry: {name} must be printable ASCII of <= {limit}")
        if not isinstance(self.public_key, bytes) or len(self.public_key) != 32:
            raise ProtocolError("malformed catalog entry: public_key must be 32 bytes")
        if self.peer_id != peer_id_from_public_key(self.public_key):
            raise ProtocolError(f"catalog entry of {self.peer_id!r} does not match its public key")
        if isinstance(self.expires_at, bool) or not isinstance(self.expires_at, (int, float)) \
                or not math.isfinite(self.expires_at):
            raise ProtocolError("malformed catalog entry: expires_at must be a finite number")
        object.__setattr__(self, "expires_at", float(self.expires_at))
        if not isinstance(self.manifest, bytes) or len(self.manifest) > MAX_MANIFEST_BYTES:
            raise ProtocolError(f"malformed catalog entry: manifest must be <= {MAX_MANIFEST_BYTES} bytes")
        if not self.manifest:
            if self.model_id or self.dtype:
                raise ProtocolError("malformed catalog entry: a tombstone names no model")
            return
        object.__setattr__(self, "summary", _check_manifest(self.manifest, self.model_id, self.dtype))

    @classmethod
    def create(cls, identity: Identity, *, model_id: str, dtype: str,
               manifest: Mapping[str, Any], expires_at: float = 0.0) -> CatalogEntry:
        """The entry of ``identity`` for the model of ``manifest`` in form ``dtype``.
        ProtocolError if ``model_id`` is not that manifest's id in that form."""
        return cls(peer_id=identity.peer_id, public_key=identity.public_key, model_id=model_id,
                   dtype=dtype, manifest=canonical_manifest(manifest), expires_at=expires_at)

    @classmethod
    def tombstone(cls, identity: Identity, expires_at: float) -> CatalogEntry:
        """An entry of ``identity`` saying it serves no model any more."""
        return cls(peer_id=identity.peer_id, public_key=identity.public_key, model_id="",
                   dtype="", manifest=b"", expires_at=expires_at)

    def canonical_bytes(self) -> bytes:
        """Deterministic msgpack of the encoded fields and the format tag: what is signed."""
        body = {"format": CATALOG_FORMAT, **{f: getattr(self, f) for f in _FIELD_NAMES}}
        return msgpack.packb({k: body[k] for k in sorted(body)}, use_bin_type=True)


_FIELD_NAMES = tuple(f.name for f in fields(CatalogEntry) if f.init)


def _check_manifest(payload: bytes, model_id: str, dtype: str) -> ModelSummary:
    try:
        manifest = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        raise ProtocolError("malformed catalog entry: the manifest is not JSON") from None
    if not isinstance(manifest, dict):
        raise ProtocolError("malformed catalog entry: the manifest is not a JSON object")
    summary = summarize(manifest)
    from layerchain.model.spec import form_model_id  # with summarize's import (torch)

    try:
        expected = form_model_id(summary.weights_id, dtype)
    except ConfigError:
        raise ProtocolError(f"malformed catalog entry: {dtype!r} is not a form") from None
    if model_id != expected:
        raise ProtocolError(
            f"catalog entry for {model_id[:16]!r}: its manifest is the model {expected[:16]!r}"
            " (an id must be its manifest's hash)")
    return summary


def sign_entry(identity: Identity, entry: CatalogEntry) -> bytes:
    """The storable blob of ``entry``: msgpack ``[canonical_bytes, signature]``."""
    if entry.public_key != identity.public_key:
        raise ProtocolError(f"cannot sign a catalog entry of {entry.peer_id!r} with the key of "
                            f"{identity.peer_id!r}")
    payload = entry.canonical_bytes()
    return msgpack.packb([payload, identity.sign(payload)], use_bin_type=True)


def open_entry(blob: object) -> CatalogEntry:
    """Decode ``blob`` and check its size, signature, encoding and manifest, ignoring time.
    ProtocolError with a one-line reason otherwise."""
    if not isinstance(blob, bytes) or len(blob) > MAX_CATALOG_BYTES:
        raise ProtocolError(f"catalog entry blob must be bytes of <= {MAX_CATALOG_BYTES}")
    try:
        payload, signature = msgpack.unpackb(blob, raw=False)
        body = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.UnpackException) as e:
        raise ProtocolError(f"malformed catalog entry: {type(e).__name__}") from None
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise ProtocolError("malformed catalog entry: expected [payload, signature] bytes")
    if not isinstance(body, dict) or body.get("format") != CATALOG_FORMAT:
        raise ProtocolError("malformed catalog entry: unknown format")
    values = {k: v for k, v in body.items() if k != "format"}
    if set(values) != set(_FIELD_NAMES):
        raise ProtocolError("malformed catalog entry: wrong set of fields")
    key = values["public_key"]
    if not isinstance(key, bytes) or not verify(key, signature, payload):
        raise ProtocolError("catalog entry has a bad signature")
    entry = CatalogEntry(**values)  # checks peer id, limits, and the id against the manifest
    if entry.canonical_bytes() != payload:
        raise ProtocolError("malformed catalog entry: not canonically encoded")
    return entry


def check_catalog_entry(sub_key: object, blob: object, expiration: float, now: float) -> CatalogEntry:
    """Pure: the entry of a catalog DHT entry, or ProtocolError if it breaks the entry rule
    (``base.check_entry``'s rule, for catalog entries: see the module docstring)."""
    if not looks_like_peer_id(sub_key):
        raise ProtocolError(f"DHT sub-key {str(sub_key)[:32]!r} is not a peer id")
    check_expiry(expiration, now)
    entry = open_entry(blob)
    if entry.peer_id != sub_key:
        raise ProtocolError(f"catalog entry of {entry.peer_id!r} stored under sub-key {sub_key!r}")
    if entry.expires_at != expiration:
        raise ProtocolError(f"entry expires at {expiration}, but its catalog entry at {entry.expires_at}")
    return entry


def check_stored_entry(sub_key: object, blob: object, expiration: float, now: float
                       ) -> PeerRecord | CatalogEntry:
    """Pure: what a layerchain DHT node may store: a peer record (``base.check_entry``) or
    a catalog entry (``check_catalog_entry``); if neither, ProtocolError with the reason of
    the kind the blob claims to be."""
    try:
        return check_entry(sub_key, blob, expiration, now)
    except ProtocolError as as_record:
        try:
            return check_catalog_entry(sub_key, blob, expiration, now)
        except ProtocolError as as_entry:
            raise (as_entry if "unknown format" in as_record.message else as_record) from None


def select_entries(entries: Iterable[tuple[object, object, float]], now: float,
                   stats: DiscoveryStats) -> list[CatalogEntry]:
    """Pure: the live catalog entries among ``(sub_key, blob, expiration)`` of the catalog
    key: valid (``check_catalog_entry``), unexpired, not tombstones; per peer the one
    expiring last. Sorted by ``(model_id, peer_id)``; drops are counted in ``stats``."""
    best: dict[str, CatalogEntry] = {}
    for sub_key, blob, expiration in entries:
        try:
            entry = check_catalog_entry(sub_key, blob, expiration, now)
        except ProtocolError:
            stats.invalid += 1
            continue
        current = best.get(entry.peer_id)
        if current is not None and current.expires_at >= entry.expires_at:
            continue
        best[entry.peer_id] = entry
    live = []
    for entry in best.values():
        if entry.expires_at <= now:
            stats.expired += 1
        elif entry.summary is None:
            stats.tombstones += 1
        else:
            stats.found += 1
            live.append(entry)
    return sorted(live, key=lambda e: (e.model_id, e.peer_id))


# ---- coverage: the catalog joined with the peer records ----


@dataclass(frozen=True)
class Coverage:
    """How the live peer records of one model cover its blocks (``coverage``)."""

    servers: int  # peers with a live record of the model
    replicas: tuple[int, ...]  # servers per block, one int per block
    throughput_tokens_per_s: float  # the least-served block's capacity (module docstring)

    @property
    def blocks_served(self) -> int:
        """Blocks with at least one server."""
        return sum(1 for n in self.replicas if n)


def coverage(num_blocks: int, records: Iterable[PeerRecord]) -> Coverage:
    """Pure: servers, replicas per block and capacity of ``records`` over ``num_blocks``
    blocks. Tombstones and blocks past ``num_blocks`` are ignored; one record per peer (the
    one expiring last) counts, as ``Discovery.find`` returns them."""
    latest: dict[str, PeerRecord] = {}
    for record in records:
        if is_tombstone(record):
            continue
        held = latest.get(record.peer_id)
        if held is None or record.expires_at > held.expires_at:
            latest[record.peer_id] = record
    replicas = [0] * num_blocks
    capacity = [0.0] * num_blocks  # tokens/s per block
    for record in latest.values():
        end = min(record.end, num_blocks)
        if record.start >= end:
            continue
        adds = 1000.0 / (record.ms_per_block * (record.end - record.start))
        for block in range(record.start, end):
            replicas[block] += 1
            capacity[block] += adds
    return Coverage(servers=len(latest), replicas=tuple(replicas),
                    throughput_tokens_per_s=min(capacity) if capacity else 0.0)


@dataclass(frozen=True)
class ModelEntry:
    """One model the swarm serves, as ``layerchain models`` lists it."""

    model_id: str  # what peer records, routes and receipts name it by
    name: str
    family: str
    num_blocks: int
    hidden_size: int
    dtype: str  # the form its servers compute in
    weights_id: str  # the fp32 id of its weights (== model_id in fp32)
    tokenizer_sha256: str  # equal for models a client may share a tokenizer between
    announced_by: int  # peers announcing it in the catalog
    coverage: Coverage

    def to_json(self) -> dict[str, Any]:
        """The ``models --json`` fields (CONTRACTS C)."""
        return {
            "model_id": self.model_id, "name": self.name, "family": self.family,
            "num_blocks": self.num_blocks, "hidden_size": self.hidden_size, "dtype": self.dtype,
            "servers": self.coverage.servers, "blocks_served": self.coverage.blocks_served,
            "replicas": list(self.coverage.replicas),
            "throughput_tokens_per_s": round(self.coverage.throughput_tokens_per_s, 3),
        }


def catalog_models(entries: Sequence[CatalogEntry], limit: int = MAX_LISTED_MODELS
                   ) -> list[CatalogEntry]:
    """Pure: one entry per model id (they agree on every byte of the manifest but the
    name), for the ``limit`` models announced by the most peers (ties by id); of each, an
    entry with the name most of its peers announce (ties: the first in sort order)."""
    by_id: dict[str, list[CatalogEntry]] = {}
    for entry in entries:
        by_id.setdefault(entry.model_id, []).append(entry)
    ranked = sorted(by_id.values(), key=lambda group: (-len(group), group[0].model_id))
    return [_most_named(group) for group in ranked[:limit]]


def _most_named(group: list[CatalogEntry]) -> CatalogEntry:
    names = Counter(e.summary.name if e.summary else "" for e in group)
    top = max(names.values())
    name = min(n for n, count in names.items() if count == top)
    return next(e for e in group if e.summary and e.summary.name == name)


def model_entries(entries: Sequence[CatalogEntry],
                  records: Mapping[str, Sequence[PeerRecord]]) -> list[ModelEntry]:
    """Pure: the listing of ``entries`` (live catalog entries) joined with ``records``
    (model id -> its live peer records), one ``ModelEntry`` per model id in
    ``catalog_models`` order."""
    announced: dict[str, int] = {}
    for entry in entries:
        announced[entry.model_id] = announced.get(entry.model_id, 0) + 1
    listed = []
    for entry in catalog_models(entries, len(announced)):
        summary = entry.summary
        assert summary is not None  # live entries only (select_entries)
        listed.append(ModelEntry(
            model_id=entry.model_id, name=summary.name, family=summary.family,
            num_blocks=summary.num_blocks, hidden_size=summary.hidden_size, dtype=entry.dtype,
            weights_id=summary.weights_id, tokenizer_sha256=summary.tokenizer_sha256,
            announced_by=announced[entry.model_id],
            coverage=coverage(summary.num_blocks,
                              (r for r in records.get(entry.model_id, ()) if r.model_id == entry.model_id)),
        ))
    return listed


# ---- I/O: the DHT seam ----


@runtime_checkable
class CatalogDiscovery(Discovery, Protocol):
    """A ``Discovery`` that also stores and reads raw entries under a key of its own
    (``HivemindDiscovery`` and ``MemoryDiscovery`` do)."""

    async def put_entry(self, key: str, blob: bytes, expires_at: float) -> bool:
        """Store ``blob`` under ``key`` with this node's peer id as sub-key until
        ``expires_at``; whether some DHT node took it."""
        ...

    async def get_entries(self, key: str) -> dict[str, tuple[bytes, float]]:
        """``{sub_key: (blob, expiration)}`` under ``key`` (unverified)."""
        ...


async def read_catalog(discovery: CatalogDiscovery, now: float | None = None) -> list[CatalogEntry]:
    """The live, verified catalog entries of the swarm (``select_entries``)."""
    held = await discovery.get_entries(CATALOG_KEY)
    return select_entries(((s, b, e) for s, (b, e) in held.items()),
                          time.time() if now is None else now, discovery.stats)


async def list_models(discovery: CatalogDiscovery, limit: int = MAX_LISTED_MODELS,
                      now: float | None = None) -> list[ModelEntry]:
    """The models the swarm serves, with coverage: the catalog, then the peer records of
    (at most ``limit``) models read concurrently. Raises the DHT's PeerError if it fails."""
    entries = await read_catalog(discovery, now)
    models = catalog_models(entries, limit)
    found = await asyncio.gather(*(
        discovery.find(e.model_id, e.summary.num_blocks) for e in models if e.summary))
    records = {e.model_id: rs for e, rs in zip(models, found)}
    return model_entries([e for e in entries if e.model_id in records], records)


class CatalogAnnouncer:
    """Keeps a node's catalog entry in the DHT: computes the manifest (``manifest()``, in a
    thread: the first computation of a large model's reads every block), announces it,
    re-announces every ``config.refresh_s`` with the node's ttl, and withdraws it on
    ``stop()``. Failures are logged and retried at the next refresh: the catalog is never
    a reason for a node to stop serving."""

    def __init__(self, discovery: CatalogDiscovery, identity: Identity, model_id: str,
                 dtype: str, manifest: Callable[[], Mapping[str, Any]],
                 config: AnnounceConfig = AnnounceConfig(),
                 clock: Callable[[], float] = time.time) -> None:
        self.discovery = discovery
        self.identity = identity
        self.model_id = model_id
        self.dtype = dtype
        self.manifest = manifest
        self.config = config
        self.clock = clock
        self.entry: CatalogEntry | None = None  # the entry with its manifest, once built
        self.last_expiry = 0.0  # expiration of the last entry stored
        self.announced = asyncio.Event()  # set after the first successful announcement
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="layerchain-catalog")

    async def _run(self) -> None:
        try:
            manifest = await asyncio.to_thread(self.manifest)
            self.entry = CatalogEntry.create(self.identity, model_id=self.model_id,
                                             dtype=self.dtype, manifest=manifest)
        except Exception as error:  # a model whose id is not its manifest's hash (yet)
            logger.warning("not listed in the swarm's catalog: %s", error)
            return
        while True:
            try:
                await self.announce_now()
                self.announced.set()
            except Exception as error:
                logger.warning("announcing the catalog entry failed (%s); retrying in %s s",
                               error, self.config.refresh_s)
            await asyncio.sleep(self.config.refresh_s)

    async def announce_now(self) -> None:
        assert self.entry is not None
        expires_at = max(self.clock() + self.config.ttl_s, self.last_expiry + TOMBSTONE_MARGIN_S)
        await self._put(CatalogEntry(**{**{f: getattr(self.entry, f) for f in _FIELD_NAMES},
                                        "expires_at": expires_at}))

    async def _put(self, entry: CatalogEntry) -> None:
        if not await self.discovery.put_entry(CATALOG_KEY, sign_entry(self.identity, entry),
                                              entry.expires_at):
            raise ProtocolError("no DHT node stored the catalog entry")
        self.last_expiry = entry.expires_at

    async def stop(self, withdraw: bool = True) -> None:
        """Stop refreshing and, if it was announced and ``withdraw``, store a tombstone
        outliving it. Idempotent; a failing withdrawal is logged (the entry expires)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if withdraw and self.last_expiry:
            expiry, self.last_expiry = self.last_expiry, 0.0
            try:
                await asyncio.wait_for(self._put(CatalogEntry.tombstone(
                    self.identity, max(expiry, self.clock()) + TOMBSTONE_MARGIN_S)),
                    self.config.withdraw_timeout_s)
            except Exception as error:
                logger.warning("withdrawing the catalog entry failed: %s", error)

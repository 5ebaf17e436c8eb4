"""Fetching a model's files from the peers that seed them (issue 20.3), over the swarm's
own authenticated links (the ``Transport`` given: TLS checking each peer's id, by default).

``fetch_model(discovery, transport, model_id, out, blocks=..., client=...)``:

1. *Peers*: the DHT records of the model id (``find_seeders``). Records are stored per
   block and a reader must say how many blocks the model has, which a fetcher learns only
   from the manifest: it reads the first ``n`` blocks' keys, ``n`` doubling from the span's
   end until some peer is found, then all of them once the manifest says how many.
2. *The manifest*: asked of every peer found (``ManifestQuery``); one that hashes to the
   model id is kept (``pieces.check_manifest``), written as ``out/manifest.json``; each
   peer's reply says which files it seeds.
3. *The files*: each wanted file goes to a worker of a peer that seeds it
   (``workers_per_peer`` per peer, all peers at once), fetched piece by piece
   (``pipeline`` pieces in flight) into ``NAME.part``, verified whole against the manifest's
   sha256 and only then renamed to ``NAME``. A file refused from a peer (a bad piece, a
   wrong sha256) is logged by name and fetched from another peer never refused for it; a
   peer that fails (unreachable, too slow) leaves its partial file for the next worker to
   continue, as does an interrupted fetch (resumable). Files already present are verified
   and kept.

``out`` is then a shard directory a node or a client loads (``model.resolve_model``):
``ShardSource`` verifies each file it reads once more. Where models fetched by id live:
``model_dir(model_id)`` (``$LAYERCHAIN_HOME/models/MODEL_ID``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerchain.discovery import Discovery, PeerRecord
from layerchain.errors import (
    ConfigError,
    InvalidOutput,
    LayerchainError,
    ModelFileError,
    PeerError,
    PeerUnreachable,
    ProtocolError,
    ShardHashMismatch,
    UnknownModel,
)
from layerchain.fetch.pieces import (
    FetchReport,
    Refusal,
    check_file_name,
    check_manifest,
    check_piece,
    part_path,
    piece_queries,
    sha256_of,
)
from layerchain.model.manifest import FileEntry, client_files, manifest_files, span_files
from layerchain.model.shards import MANIFEST, block_file
from layerchain.types import Span
from layerchain.wire.messages import (
    MAX_PIECE_BYTES,
    ManifestQuery,
    ManifestReply,
    PieceQuery,
    PieceReply,
)
from layerchain.wire.rpc import RpcClient
from layerchain.wire.transport import Dialer, Transport

log = logging.getLogger(__name__)

DEFAULT_HOME = "~/.layerchain"  # LAYERCHAIN_HOME when unset (as ledger.open)
FIRST_PROBE_BLOCKS = 32  # DHT block keys read first when looking for a model's peers
MAX_PROBE_BLOCKS = 4096  # ... doubling up to this many
_MODEL_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FetchConfig:
    """How a fetcher works."""

    timeout_s: float = 30.0  # seconds a piece or a manifest may take (rate-limited seeders)
    pipeline: int = 4  # pieces of one file in flight from one peer
    workers_per_peer: int = 2  # files fetched from one peer at once
    max_peers: int = 0  # fetch from at most this many of the peers found (0: all of them)


@dataclass(frozen=True)
class Seed:
    """A peer that seeds files of the model, as its ManifestReply says."""

    peer_id: str
    endpoints: tuple[str, ...]
    files: frozenset[str]


def models_dir() -> Path:
    """Where models fetched by id live: ``$LAYERCHAIN_HOME/models``."""
    return Path(os.environ.get("LAYERCHAIN_HOME") or DEFAULT_HOME).expanduser() / "models"


def model_dir(model_id: str) -> Path:
    """The shard directory of a model fetched by id."""
    return models_dir() / model_id


def is_model_id(ref: str) -> bool:
    """Whether a model reference names a model by id (64 hex digits) rather than a file,
    a directory or a known name."""
    return _MODEL_ID.fullmatch(ref) is not None and not Path(ref).exists()


def local_copy(model_id: str, blocks: Span | None, client: bool) -> Path | None:
    """``model_dir(model_id)`` if it holds the manifest and every file the span's blocks
    (and, with ``client``, the head and tokenizer) need, else None. (Their sha256 is checked
    when they load.)"""
    directory = model_dir(model_id)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        names = _wanted(manifest, blocks, client)
    except (OSError, ValueError, KeyError, TypeError, LayerchainError):
        return None
    return directory if all((directory / name).is_file() for name in names) else None


async def find_seeders(discovery: Discovery, model_id: str, num_blocks: int = 0,
                       at_least: int = 1) -> list[PeerRecord]:
    """The live records of ``model_id``'s peers. With ``num_blocks`` known, one read of its
    keys; else the first ``at_least`` (at least ``FIRST_PROBE_BLOCKS``) blocks' keys,
    doubling until some peer is found (see the module docstring)."""
    if num_blocks:
        return await discovery.find(model_id, num_blocks)
    n = min(max(at_least, FIRST_PROBE_BLOCKS), MAX_PROBE_BLOCKS)
    while True:
        records = await discovery.find(model_id, n)
        if records or n >= MAX_PROBE_BLOCKS:
            return records
        n = min(2 * n, MAX_PROBE_BLOCKS)


async def fetch_model(
    discovery: Discovery,
    transport: Transport,
    model_id: str,
    out: Path,
    *,
    blocks: Span | None = None,
    client: bool = False,
    config: FetchConfig = FetchConfig(),
) -> FetchReport:
    """Fetch the manifest of ``model_id`` and the files of ``blocks`` (and, with ``client``,
    the head and the tokenizer) from the peers seeding them into the directory ``out``.

    UnknownModel if no peer serves or sends the model; SpanError for blocks outside it;
    ModelFileError if some file could not be fetched from any peer (each refusal named).
    """
    started = time.monotonic()
    records = await find_seeders(discovery, model_id, at_least=blocks.end if blocks else 1)
    if not records:
        raise UnknownModel(f"no peer in the swarm serves model {model_id[:12]}",
                           hint="check the model id and --initial-peers")
    fetcher = Fetcher(transport, config)
    try:
        manifest, seeds = await fetcher.manifest(model_id, records)
        num_blocks = int(manifest["num_blocks"])
        known = {r.peer_id for r in records}
        more = [r for r in await find_seeders(discovery, model_id, num_blocks)
                if r.peer_id not in known]  # those whose span ends past the probe
        if more:
            seeds += (await fetcher.manifest(model_id, more))[1]
        if blocks is not None:
            blocks.check_within(num_blocks)
        names = _wanted(manifest, blocks, client)
        out.mkdir(parents=True, exist_ok=True)
        _write_manifest(out, manifest)
        if config.max_peers:
            seeds = seeds[: config.max_peers]
        run = _Run(fetcher, model_id, out, manifest_files(manifest), seeds)
        await run.fetch(names)
    finally:
        await fetcher.close()
    return FetchReport(model_id, tuple(run.fetched), tuple(run.present), run.received,
                       time.monotonic() - started, tuple(sorted(run.delivered)),
                       tuple(run.refused))


async def client_copy(discovery: Discovery, transport: Transport, model_id: str) -> Path:
    """The shard directory with what a client needs of a model it names by id (manifest,
    head, tokenizer): ``model_dir(model_id)``, fetched from the peers seeding it if missing."""
    local = local_copy(model_id, None, client=True)
    if local is not None:
        return local
    await fetch_model(discovery, transport, model_id, model_dir(model_id), client=True)
    return model_dir(model_id)


async def fetch_from_swarm(
    initial_peers: Sequence[str],
    model_id: str,
    out: Path,
    *,
    blocks: Span | None = None,
    client: bool = False,
    insecure: bool = False,
    config: FetchConfig = FetchConfig(),
) -> FetchReport:
    """``fetch_model`` through a DHT client joined at ``initial_peers`` (closed after), over
    TLS links checking each peer's id (plaintext tcp:// only with ``insecure``)."""
    from layerchain.discovery import HivemindDiscovery  # hivemind: only when fetching

    discovery = await HivemindDiscovery.create(initial_peers=list(initial_peers),
                                               client_mode=True)
    try:
        return await fetch_model(discovery, Dialer(insecure=insecure), model_id, out,
                                 blocks=blocks, client=client, config=config)
    finally:
        await discovery.close()


def _wanted(manifest: dict[str, Any], blocks: Span | None, client: bool) -> list[str]:
    names = span_files(manifest, blocks) if blocks is not None else []
    names += client_files(manifest) if client else []
    return [check_file_name(name) for name in names]


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True)
    path = out / MANIFEST
    if not path.is_file() or path.read_text() != text:
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


class Fetcher:
    """Connections to seeding peers (one RPC connection each, reused) and the two asks."""

    def __init__(self, transport: Transport, config: FetchConfig = FetchConfig()) -> None:
        self.transport, self.config = transport, config
        self.clients: dict[str, RpcClient] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def client(self, peer_id: str, endpoints: Sequence[str]) -> RpcClient:
        """The connection to ``peer_id`` (the first of its endpoints that answers, proving
        its id over TLS); PeerUnreachable naming each endpoint's failure."""
        async with self.locks.setdefault(peer_id, asyncio.Lock()):
            rpc = self.clients.get(peer_id)
            if rpc is not None and not rpc.closed:
                return rpc
            why = []
            for endpoint in endpoints:
                try:
                    conn = await self.transport.connect(endpoint, peer_id=peer_id)
                except (PeerError, ConfigError) as error:
                    why.append(f"{endpoint}: {error}")
                    continue
                self.clients[peer_id] = rpc = RpcClient(conn)
                return rpc
            raise PeerUnreachable(f"peer {peer_id}: " + ("; ".join(why) or "no endpoint"))

    async def manifest(self, model_id: str, records: Sequence[PeerRecord]
                       ) -> tuple[dict[str, Any], list[Seed]]:
        """The verified manifest, from any of ``records``' peers, and what each one that
        answered seeds. UnknownModel if none sends a manifest that hashes to the id."""

        async def ask(record: PeerRecord) -> tuple[dict[str, Any], Seed]:
            rpc = await self.client(record.peer_id, record.endpoints)
            reply = await rpc.call(ManifestQuery(0, model_id), self.config.timeout_s)
            if not isinstance(reply, ManifestReply):  # (the RPC client checks it already)
                raise InvalidOutput(f"{record.peer_id} answered a ManifestQuery with "
                                    f"{type(reply).__name__}")
            manifest = check_manifest(model_id, reply.manifest)
            num_blocks = int(manifest["num_blocks"])
            files = {block_file(i) for i in range(max(0, reply.start), min(reply.end, num_blocks))}
            if reply.client_files:
                files |= set(client_files(manifest))
            return manifest, Seed(record.peer_id, record.endpoints, frozenset(files))

        answers = await asyncio.gather(*(ask(r) for r in records), return_exceptions=True)
        manifest: dict[str, Any] | None = None
        seeds: list[Seed] = []
        why = []
        for record, answer in zip(records, answers, strict=True):
            if isinstance(answer, LayerchainError):
                why.append(f"{record.peer_id}: {answer}")
                log.info("no manifest from %s: %s", record.peer_id, answer)
                continue
            if isinstance(answer, BaseException):
                raise answer
            manifest = manifest or answer[0]
            seeds.append(answer[1])
        if manifest is None:
            raise UnknownModel(f"no peer sent the manifest of model {model_id[:12]}",
                               hint="; ".join(why)[:300] or None)
        return manifest, seeds

    async def piece(self, seed: Seed, query: PieceQuery, size: int | None) -> PieceReply:
        """One piece from ``seed``, checked (``pieces.check_piece``: InvalidOutput)."""
        rpc = await self.client(seed.peer_id, seed.endpoints)
        reply = await rpc.call(query, self.config.timeout_s)
        if not isinstance(reply, PieceReply):  # (the RPC client checks the type already)
            raise InvalidOutput(f"{seed.peer_id} answered a PieceQuery with {type(reply).__name__}")
        check_piece(query, reply, size)
        return reply

    async def close(self) -> None:
        for rpc in self.clients.values():
            await rpc.close()
        self.clients.clear()


class _Run:
    """One fetch of files into ``out``: workers per seed, refusals, what was received."""

    def __init__(self, fetcher: Fetcher, model_id: str, out: Path,
                 entries: dict[str, FileEntry], seeds: Sequence[Seed]) -> None:
        self.fetcher, self.model_id, self.out, self.entries = fetcher, model_id, out, entries
        self.seeds = list(seeds)
        self.pending: list[str] = []  # files not yet fetched, in order
        self.taken: set[str] = set()  # files a worker is fetching now
        self.refused_by: dict[str, set[str]] = {}  # file -> peers refused for it
        self.changed = asyncio.Event()  # a file went back to pending, or one finished
        self.fetched: list[str] = []
        self.present: list[str] = []
        self.delivered: set[str] = set()  # peers that delivered a verified file
        self.refused: list[Refusal] = []
        self.failed: dict[str, str] = {}  # peer -> why its workers stopped
        self.received = 0  # bytes of accepted pieces

    async def fetch(self, names: Sequence[str]) -> None:
        for name in names:
            path = self.out / name
            if path.is_file() and sha256_of(path) == self.entries[name].sha256:
                self.present.append(name)
            else:
                self.pending.append(name)
        if not self.pending:
            return
        workers = [self._worker(seed) for seed in self.seeds if seed.files & set(self.pending)
                   for _ in range(self.fetcher.config.workers_per_peer)]
        await asyncio.gather(*workers)
        if self.pending:
            why = [f"{r.file} from {r.peer_id}: {r.reason}" for r in self.refused]
            why += [f"{peer}: {reason}" for peer, reason in self.failed.items()]
            raise ModelFileError(
                f"could not fetch {', '.join(self.pending[:4])}"
                f"{' and more' if len(self.pending) > 4 else ''} of model "
                f"{self.model_id[:12]} from any peer",
                hint="; ".join(why)[:400] or "no peer seeds them",
            )

    def _next_for(self, seed: Seed) -> str | None:
        for name in self.pending:
            if (name not in self.taken and name in seed.files
                    and seed.peer_id not in self.refused_by.get(name, set())):
                return name
        return None

    async def _worker(self, seed: Seed) -> None:
        while self.pending and seed.peer_id not in self.failed:
            name = self._next_for(seed)
            if name is None:
                if not self.taken:  # nothing in flight could come back to this seed
                    return
                self.changed.clear()
                await self.changed.wait()
                continue
            self.taken.add(name)
            try:
                await self._fetch_file(seed, name)
                self.pending.remove(name)
                self.fetched.append(name)
                self.delivered.add(seed.peer_id)
            except (ShardHashMismatch, InvalidOutput, ProtocolError) as error:
                self.refused_by.setdefault(name, set()).add(seed.peer_id)
                self.refused.append(Refusal(name, seed.peer_id, str(error)))
                log.warning("refused %s from %s: %s; fetching it elsewhere", name,
                            seed.peer_id, error)
            except PeerError as error:  # gone or too slow: its partial file stays (resume)
                self.failed[seed.peer_id] = str(error)
                log.info("fetching %s from %s failed: %s", name, seed.peer_id, error)
            finally:
                self.taken.discard(name)
                self.changed.set()

    async def _fetch_file(self, seed: Seed, name: str) -> None:
        """``name`` from ``seed`` into ``out/NAME.part`` (continuing what is there), then
        verified and renamed. ShardHashMismatch / InvalidOutput: refused (its bytes from
        this peer are dropped)."""
        entry, part = self.entries[name], part_path(self.out, name)
        start = part.stat().st_size if part.is_file() else 0
        size = entry.size
        if size is None or start > size:  # a tokenizer file's size is not known: whole
            start = 0
        begun = start  # bytes of this file that were there before this peer's
        try:
            with open(part, "r+b" if part.is_file() else "wb") as f:
                f.truncate(start)
                f.seek(start)
                if size is None:  # its first piece tells the file's size
                    query = PieceQuery(0, self.model_id, name, 0, MAX_PIECE_BYTES)
                    first = await self.fetcher.piece(seed, query, None)
                    f.write(first.data)
                    self.received += len(first.data)
                    start, size = len(first.data), first.size
                await self._pieces(seed, f, piece_queries(self.model_id, name, start, size), size)
        except (ShardHashMismatch, InvalidOutput, ProtocolError):
            with open(part, "r+b") as f:  # what this peer sent is not trusted
                f.truncate(begun)
            raise
        if sha256_of(part) != entry.sha256:
            part.unlink()
            if begun:  # the bytes before this peer's may be the bad ones: all from it, once
                log.info("%s resumed from byte %d does not verify: fetching it whole", name,
                         begun)
                return await self._fetch_file(seed, name)
            raise ShardHashMismatch(f"{name} from {seed.peer_id} does not match the sha256 in "
                                    "its manifest")
        part.replace(self.out / name)

    async def _pieces(self, seed: Seed, f: Any, queries: list[PieceQuery], size: int) -> None:
        """Write ``queries``' pieces in order, ``pipeline`` of them in flight."""
        inflight: list[asyncio.Task[PieceReply]] = []
        todo = iter(queries)
        try:
            while True:
                while len(inflight) < self.fetcher.config.pipeline:
                    query = next(todo, None)
                    if query is None:
                        break
                    inflight.append(asyncio.ensure_future(self.fetcher.piece(seed, query, size)))
                if not inflight:
                    return
                reply = await inflight.pop(0)
                f.write(reply.data)
                f.flush()
                self.received += len(reply.data)
        finally:
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

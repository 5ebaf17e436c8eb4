"""A node seeds the files of the model it serves to peers that fetch them (issue 20.3).

Over the node's own authenticated links (the inference listener: TLS unless ``--insecure``)
it answers ``ManifestQuery`` with its weights' manifest and ``PieceQuery`` with a byte range
of one file, so a node or a client with nothing local can fetch a model from the swarm
(``layerchain.fetch``). ``layerchain node start`` seeds by default; ``--no-seed`` opts out.

What it serves, and nothing else (``limit_exceeded`` otherwise):

* the manifest of the weights it holds, asked by their id (the manifest hash: the fp32
  form's id, whatever form the node computes in);
* the block files of its span: a node holds and vouches for those;
* the head and the tokenizer files, when it has them (a GGUF file or a model directory
  always does; a shard directory when it holds them): a client needs them to start, and a
  node that fetched only its span has none to give.

Bounds: a request asks for at most ``MAX_PIECE_BYTES``; bytes sent are metered by two token
buckets (``TokenBucket``: bytes per second, per connection and for the whole node), a reply
waiting its turn for at most ``MAX_WAIT_S`` (else ``busy``); files are built (a GGUF block is
dequantized and serialized: about 0.1 s for SmolLM2's, on the node's event loop like all its
torch work) or read and verified against the manifest once, and kept in a small LRU
(``FileCache``), so a piece costs a slice of bytes.

Testing defences only: ``SeedConfig.misbehave == "corrupt"`` flips one byte of every piece
it sends (what a lying seeder does); fetchers refuse the file by name and fetch it elsewhere.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from layerchain.errors import ConfigError, LimitExceeded, PeerBusy
from layerchain.model.manifest import client_files, file_bytes, manifest_files, manifest_of
from layerchain.model.shards import block_file
from layerchain.model.spec import ModelSpec
from layerchain.node.config import NodeConfig
from layerchain.types import Span
from layerchain.wire import messages as m

MAX_WAIT_S = 10.0  # a piece may wait this long for the rate limits; longer: ``busy``
SEED_MISBEHAVE_MODES = ("corrupt",)  # testing defences only (SeedConfig.misbehave)
MEGABIT = 125_000  # bytes


@dataclass(frozen=True)
class SeedConfig:
    """How a node seeds (``NodeConfig`` fields ``seed``, ``seed_max_mbps``, ...)."""

    max_mbps: float = 800.0  # megabits per second the node sends to all fetchers together
    connection_mbps: float = 400.0  # megabits per second one connection receives at most
    cache_bytes: int = 512 << 20  # bytes of built files kept (the most recent; at least one)
    misbehave: str = ""  # testing defences only: "corrupt" flips a byte of every piece sent

    def __post_init__(self) -> None:
        for name in ("max_mbps", "connection_mbps"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not value > 0:
                raise ConfigError(f"seeding setting {name} must be positive, got {value!r}")
        if self.misbehave and self.misbehave not in SEED_MISBEHAVE_MODES:
            raise ConfigError(f"seeding misbehave mode {self.misbehave!r} is unknown",
                              hint=f"use one of {', '.join(SEED_MISBEHAVE_MODES)}")


class TokenBucket:
    """Bytes a sender may send: ``rate`` per second, up to ``burst`` at once. Pure over the
    times it is given (seconds, monotonic); a tally, so mutable."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, now

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes``; the seconds to wait before sending them (tokens may go below
        zero: later callers queue behind this one)."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= nbytes
        return max(0.0, -self.tokens / self.rate)

    def refund(self, nbytes: int) -> None:
        """Give back what a refused request reserved."""
        self.tokens += nbytes


class FileCache:
    """The bytes of recently built files, up to ``max_bytes`` (the newest always kept)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.files: OrderedDict[str, bytes] = OrderedDict()

    def get(self, name: str, build: Callable[[], bytes]) -> bytes:
        """The bytes of ``name``, from the cache or ``build()``. On the caller's thread: a
        node builds on its event loop, where all its torch work runs (``node.server``: a
        second thread running torch ops would slow every step on a small CPU)."""
        if name in self.files:
            self.files.move_to_end(name)
            return self.files[name]
        data = build()
        self.files[name] = data
        while len(self.files) > 1 and sum(map(len, self.files.values())) > self.max_bytes:
            self.files.popitem(last=False)
        return data


@dataclass(frozen=True)
class SeedPlan:
    """What a node seeds, from its manifest and span."""

    manifest_json: bytes  # the manifest as sent (its hash is the model id)
    sizes: dict[str, int | None]  # file seeded -> its bytes (None: a tokenizer file)
    client_files: bool  # the head and the tokenizer files are among them


def seed_plan(spec: ModelSpec, span: Span) -> SeedPlan:
    """The files a node serving ``span`` of ``spec`` seeds (see the module docstring)."""
    manifest = manifest_of(spec)
    files = manifest_files(manifest)
    seeded = [block_file(i) for i in range(span.start, span.end)]
    with_client = _holds_client_files(spec, manifest)
    if with_client:
        seeded += client_files(manifest)
    return SeedPlan(json.dumps(manifest, sort_keys=True).encode(),
                    {name: files[name].size for name in seeded}, with_client)


class Seeder:
    """Answers ``ManifestQuery`` and ``PieceQuery`` for the model ``spec`` on ``span``."""

    def __init__(self, spec: ModelSpec, span: Span, config: SeedConfig) -> None:
        self.spec, self.span, self.config = spec, span, config
        self.cache = FileCache(config.cache_bytes)
        self.total: TokenBucket | None = None  # all connections' bytes; made on first use
        self.connections: dict[int, TokenBucket] = {}  # connection -> its bytes
        self.sent_bytes = 0  # piece bytes sent, all connections
        self.pieces = 0  # pieces sent
        self._plan: SeedPlan | None = None  # read on the first request (the manifest)

    @property
    def model_id(self) -> str:
        """The id fetchers ask for: the manifest's hash (the fp32 form's model id)."""
        return self.spec.weights_id

    @property
    def plan(self) -> SeedPlan:
        if self._plan is None:
            self._plan = seed_plan(self.spec, self.span)
        return self._plan

    def follow(self, span: Span) -> None:
        """Seed ``span`` from now on (the node moved, ``Node.swap_span``): the files of the
        blocks left are no longer offered, nor kept built."""
        self.span, self._plan = span, None
        kept = {block_file(i) for i in range(span.start, span.end)}
        for name in [n for n in self.cache.files if n.startswith("block_") and n not in kept]:
            del self.cache.files[name]

    def forget(self, owner: int) -> None:
        """The connection ``owner`` is gone: drop its bucket."""
        self.connections.pop(owner, None)

    async def answer(self, msg: m.ManifestQuery | m.PieceQuery, owner: int, now: float
                     ) -> m.ManifestReply | m.PieceReply:
        """The reply to one request of connection ``owner`` at ``now`` (monotonic s);
        LimitExceeded for what this node does not seed, PeerBusy past the rate limits."""
        if msg.model_id != self.model_id:  # (before the manifest is read: no work for junk)
            raise LimitExceeded(f"this node seeds model {self.model_id[:12]}, "
                                f"not {msg.model_id[:12]}")
        plan = self.plan
        if isinstance(msg, m.ManifestQuery):
            return m.ManifestReply(msg.rid, self.model_id, plan.manifest_json, self.span.start,
                                   self.span.end, int(plan.client_files))
        return await self._piece(msg, plan, owner, now)

    async def _piece(self, msg: m.PieceQuery, plan: SeedPlan, owner: int, now: float
                     ) -> m.PieceReply:
        if msg.file not in plan.sizes:
            raise LimitExceeded(f"this node does not seed {msg.file[:64]!r} (it seeds blocks "
                                f"{self.span} and {'the' if plan.client_files else 'no'} "
                                "head and tokenizer files)")
        if not 0 < msg.length <= m.MAX_PIECE_BYTES:
            raise LimitExceeded(f"a piece is 1..{m.MAX_PIECE_BYTES} bytes, not {msg.length}")
        size = plan.sizes[msg.file]
        if msg.offset < 0 or (size is not None and msg.offset >= size):
            raise LimitExceeded(f"offset {msg.offset} is outside {msg.file} ({size} bytes)")
        name = msg.file
        data = self.cache.get(name, lambda: file_bytes(self.spec, name))
        if msg.offset >= len(data):
            raise LimitExceeded(f"offset {msg.offset} is outside {name} ({len(data)} bytes)")
        piece = data[msg.offset: msg.offset + msg.length]
        await self._meter(len(piece), owner, now)
        if self.config.misbehave == "corrupt":
            piece = bytes([piece[0] ^ 0xFF]) + piece[1:]
        self.sent_bytes += len(piece)
        self.pieces += 1
        return m.PieceReply(msg.rid, self.model_id, name, msg.offset, len(data), piece)

    async def _meter(self, nbytes: int, owner: int, now: float) -> None:
        """Wait until both buckets let ``nbytes`` go; PeerBusy if that is over MAX_WAIT_S."""
        rate, total_rate = self.config.connection_mbps * MEGABIT, self.config.max_mbps * MEGABIT
        if self.total is None:
            self.total = TokenBucket(total_rate, total_rate, now)
        bucket = self.connections.setdefault(owner, TokenBucket(rate, rate, now))
        wait = max(bucket.reserve(nbytes, now), self.total.reserve(nbytes, now))
        if wait > MAX_WAIT_S:
            bucket.refund(nbytes)
            self.total.refund(nbytes)
            raise PeerBusy(f"seeding at its rate limit: a piece would wait {wait:.0f} s")
        if wait > 0:
            await asyncio.sleep(wait)


def seeder_for(config: NodeConfig, spec: ModelSpec, span: Span) -> Seeder | None:
    """The seeder of a node with ``config`` (a ``NodeConfig``), or None with ``seed`` off."""
    if not config.seed:
        return None
    return Seeder(spec, span, SeedConfig(config.seed_max_mbps, config.seed_connection_mbps,
                                         misbehave=config.seed_misbehave))


def _holds_client_files(spec: ModelSpec, manifest: dict[str, Any]) -> bool:
    """Whether ``spec``'s source has the head and tokenizer files (a shard directory may
    hold only its span's blocks)."""
    if spec.kind != "shards":
        return True
    return all((spec.path / name).is_file() for name in client_files(manifest))

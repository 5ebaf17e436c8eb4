"""What an attacker of the swarm holds: a DHT peer that checks nothing, forged records, and
wire peers that lie.

Nothing here trusts or uses layerchain's own checks on the attacker's side: records are
signed from raw field maps (``forge_blob``), so a field the validator would refuse can
still be *sent*; the DHT peer (``AttackerDHT``) runs hivemind without layerchain's record
validator and in client mode, so it stores nothing itself and what a reader finds later was
accepted by the honest DHT nodes. ``FakePeer`` answers the wire protocol from a ``Policy``
(no model behind it); ``RelayPeer`` forwards to a real node and delays its step results.

Every server here counts what it saw (``Seen``), so an attack can tell "blocked" from
"never reached its target".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import msgpack

from layerchain.discovery import Identity, PeerRecord
from layerchain.discovery.base import block_key
from layerchain.discovery.records import open_record
from layerchain.errors import ProtocolError
from layerchain.types import Span
from layerchain.wire import (
    CloseSession,
    ErrorReply,
    Message,
    OpenSession,
    Ping,
    Pong,
    SessionClosed,
    SessionOpened,
    decode,
    encode_bytes,
)
from layerchain.wire.messages import MESSAGE_TYPES, StepResult
from layerchain.wire.tcp import format_tcp_endpoint, parse_tcp_endpoint

T = TypeVar("T")
PREFIX = 4  # bytes of a frame's u32 length prefix (wire/codec.py)
STEP_RESULT = StepResult.TYPE_ID


# ------------------------------------------------------------------------------ records


def forge_blob(identity: Identity, template: PeerRecord, **fields: object) -> bytes:
    """A record blob signed by ``identity``: ``template``'s canonical field map with
    ``fields`` replaced as given, unchecked (a value ``PeerRecord`` would refuse is kept)."""
    body = msgpack.unpackb(template.canonical_bytes(), raw=False)
    unknown = set(fields) - set(body)
    if unknown:
        raise ValueError(f"not peer-record fields: {sorted(unknown)}")
    body.update(fields)
    payload = msgpack.packb({k: body[k] for k in sorted(body)}, use_bin_type=True)
    return msgpack.packb([payload, identity.sign(payload)], use_bin_type=True)


def accepted_claim(identity: Identity, template: PeerRecord, name: str,
                   candidates: Sequence[object]) -> object:
    """The first of ``candidates`` for field ``name`` that layerchain's own record check accepts
    (the attacker runs the open-source validator locally), else the last candidate."""
    for value in candidates:
        try:
            open_record(forge_blob(identity, template, **{name: value}))
            return value
        except ProtocolError:
            continue
    return candidates[-1]


@dataclass(frozen=True)
class Published:
    """A forged record the attacker stored: under whose sub-key, over which blocks, until when."""

    label: str  # what the attack calls it
    identity: Identity
    template: PeerRecord  # the fields that were not forged
    blocks: range
    expires_at: float  # unix s: the DHT entry's expiration (= the blob's expires_at, or not)
    stored: int  # block keys on which at least one DHT node accepted it

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


async def _store_many(_dht: object, node: object, keys: list[str], blob: bytes,
                      expiration: float, sub_key: str) -> int:
    ok = await node.store_many(  # type: ignore[attr-defined]
        keys, [blob] * len(keys), [expiration] * len(keys), subkeys=[sub_key] * len(keys)
    )
    return sum(bool(ok.get((key, sub_key))) for key in keys)


TOMBSTONE: dict[str, object] = {  # a withdrawal: serves nothing, carries no values
    "endpoint": "", "ms_per_block": 0.0, "price_per_block": 0, "free_cache_tokens": 0,
    "wallet": "", "rtts": [], "version": "",
}
REGULAR_VALUE = "<regular value>"  # what ``held`` reports for a key holding no dictionary


async def _store_regular(_dht: object, node: object, key: str, value: bytes, expiration: float) -> bool:
    ok = await node.store_many([key], [value], [expiration])  # type: ignore[attr-defined]
    return bool(ok.get(key))


async def _sub_keys(_dht: object, node: object, keys: list[str]) -> list[str]:
    """The sub-keys stored under any of ``keys`` on the DHT (``REGULAR_VALUE`` for a key
    whose value is not a dictionary)."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))  # type: ignore[attr-defined]
    out: set[str] = set()
    for item in found.values():
        if item is not None and isinstance(item.value, dict):
            out.update(str(k) for k in item.value)
        elif item is not None:
            out.add(REGULAR_VALUE)
    return sorted(out)


class AttackerDHT:
    """A hivemind DHT peer in client mode, without layerchain's validator: it stores and reads
    through the honest DHT nodes only. Make it with ``await AttackerDHT.start(peers)``."""

    def __init__(self, dht: object, model_id: str) -> None:
        self._dht = dht
        self.model_id = model_id
        self.published: list[Published] = []

    @classmethod
    async def start(cls, initial_peers: Sequence[str], model_id: str) -> AttackerDHT:
        import hivemind

        def make() -> object:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                # no local copies: what it reads back is what the honest nodes hold
                return hivemind.DHT(initial_peers=list(initial_peers), start=True,
                                    client_mode=True, num_workers=4, wait_timeout=3.0,
                                    cache_locally=False, cache_on_store=False, cache_nearest=0)

        return cls(await asyncio.to_thread(make), model_id)

    async def _call(self, coro: Callable[..., Awaitable[T]], timeout_s: float = 20.0,
                    **kwargs: object) -> T:
        future = self._dht.run_coroutine(partial(coro, **kwargs), return_future=True)  # type: ignore[attr-defined]
        result: T = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        return result

    async def publish(
        self, label: str, identity: Identity, template: PeerRecord,
        forged: Mapping[str, object] | None = None, blocks: range | None = None,
    ) -> Published:
        """Sign ``template`` with its ``forged`` fields replaced and store it under
        ``blocks`` (by default the template's span), as an entry expiring when the blob
        says it does."""
        forged = dict(forged or {})
        blob = forge_blob(identity, template, **forged)
        expires_at = forged.get("expires_at", template.expires_at)
        expiration = float(expires_at) if isinstance(expires_at, (int, float)) else template.expires_at
        blocks = blocks if blocks is not None else template.blocks
        keys = [block_key(self.model_id, b) for b in blocks]
        stored = await self._call(_store_many, keys=keys, blob=blob, expiration=expiration,
                                  sub_key=identity.peer_id)
        published = Published(label, identity, template, blocks, expiration, stored)
        self.published.append(published)
        return published

    async def store_junk(self, block: int, value: bytes, expires_at: float,
                         sub_key: str | None = None) -> bool:
        """Store ``value`` under ``block``'s key: a regular value (no sub-key), or under
        ``sub_key``. Whether any DHT node accepted it."""
        key = block_key(self.model_id, block)
        if sub_key is None:
            return bool(await self._call(_store_regular, key=key, value=value, expiration=expires_at))
        return bool(await self._call(_store_many, keys=[key], blob=value, expiration=expires_at,
                                     sub_key=sub_key))

    async def held(self, blocks: range) -> set[str]:
        """Sub-keys found under ``blocks``. The peer that stored them keeps its own copies
        whatever it is told, so ask a fresh one (``held_by_honest_nodes``)."""
        keys = [block_key(self.model_id, b) for b in blocks]
        return set(await self._call(_sub_keys, keys=keys))

    async def withdraw_all(self, timeout_s: float = 30.0) -> None:
        """Tombstone every record published (empty endpoint, no values, expiring just
        later), all at once, so the attack does not outlive its window; gives up after
        ``timeout_s`` (the records expire on their own)."""
        published, self.published = self.published, []  # (tombstones are not withdrawn)

        async def withdraw(p: Published) -> None:
            later = max(p.expires_at, time.time()) + 1.0
            await self.publish(p.label, p.identity, p.template, TOMBSTONE | {"expires_at": later},
                               p.blocks)

        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(withdraw(p) for p in published), return_exceptions=True),
                timeout_s)
        self.published.clear()

    async def close(self) -> None:
        dht, self._dht = self._dht, None
        if dht is not None:
            await asyncio.to_thread(_shutdown, dht)


async def held_by_honest_nodes(initial_peers: Sequence[str], model_id: str, blocks: range) -> set[str]:
    """Sub-keys the honest DHT nodes hold under ``blocks``, read by a DHT peer of the
    attacker's that stored nothing."""
    reader = await AttackerDHT.start(initial_peers, model_id)
    try:
        return await reader.held(blocks)
    finally:
        await reader.close()


def _shutdown(dht: object) -> None:
    with contextlib.suppress(Exception):
        dht.shutdown()  # type: ignore[attr-defined]
    if dht.is_alive():  # type: ignore[attr-defined]
        dht.kill()  # type: ignore[attr-defined]


def record_template(identity: Identity, model_id: str, span: Span, endpoint: str,
                    ms_per_block: float, wallet: str, ttl_s: float) -> PeerRecord:
    """A well-formed record of ``identity`` expiring ``ttl_s`` from now: what forging starts from."""
    return PeerRecord.create(identity, model_id=model_id, span=span, endpoint=endpoint,
                             ms_per_block=ms_per_block, wallet=wallet,
                             free_cache_tokens=4096, expires_at=time.time() + ttl_s)


# ------------------------------------------------------------------------------ wire peers


@dataclass
class Seen:
    """What one server saw (mutable counters, read by the attack)."""

    accepted: int = 0  # connections accepted
    open: int = 0  # connections open now
    peak_open: int = 0  # most connections open at once
    requests: Counter[str] = field(default_factory=Counter)  # message class name -> count

    def opened(self) -> None:
        self.accepted += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)


Policy = Callable[[Message], "Message | None"]  # the reply to a request; None: hang up


def pong_only(msg: Message) -> Message | None:
    """A peer that answers pings and is always full: it looks alive and serves nothing."""
    if isinstance(msg, Ping):
        return Pong(msg.rid, msg.nonce)
    return ErrorReply(msg.rid, "busy", "no cache room")


def error_codes(on_open: str = "", on_step: str = "") -> Policy:
    """A peer that answers pings, then ``on_open`` to OpenSession (or opens it) and
    ``on_step`` to every Step: error codes of its choosing, not its own failures."""

    def policy(msg: Message) -> Message | None:
        if isinstance(msg, Ping):
            return Pong(msg.rid, msg.nonce)
        if isinstance(msg, OpenSession):
            if on_open:
                return ErrorReply(msg.rid, on_open, f"{on_open} (says the peer)")
            return SessionOpened(msg.rid, msg.session_id, 4096)
        if isinstance(msg, CloseSession):
            return SessionClosed(msg.rid, msg.session_id)
        return ErrorReply(msg.rid, on_step or "busy", f"{on_step} (says the peer)")

    return policy


def hang_up_on_step(msg: Message) -> Message | None:
    """A peer that opens sessions and drops the connection at the first step."""
    if isinstance(msg, Ping):
        return Pong(msg.rid, msg.nonce)
    if isinstance(msg, OpenSession):
        return SessionOpened(msg.rid, msg.session_id, 4096)
    if isinstance(msg, CloseSession):
        return SessionClosed(msg.rid, msg.session_id)
    return None


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    prefix = await reader.readexactly(PREFIX)
    return prefix + await reader.readexactly(int.from_bytes(prefix, "big"))


class FakePeer:
    """Wire servers on as many loopback ports as asked, all answering from one ``policy``."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.seen: dict[str, Seen] = {}  # endpoint -> what it saw
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._writers: dict[str, set[asyncio.StreamWriter]] = {}

    async def listen(self) -> str:
        """Open one more port; return its endpoint."""
        endpoint = ""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen, writers = self.seen[endpoint], self._writers[endpoint]
            seen.opened()
            writers.add(writer)
            try:
                while True:
                    msg = decode(await _read_frame(reader))
                    seen.requests[type(msg).__name__] += 1
                    reply = self.policy(msg)
                    if reply is None:
                        break
                    writer.write(encode_bytes(reply))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, ProtocolError):
                pass
            finally:
                seen.open -= 1
                writers.discard(writer)
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        endpoint = format_tcp_endpoint("127.0.0.1", port)
        self.seen[endpoint], self._writers[endpoint] = Seen(), set()
        self._servers[endpoint] = server
        return endpoint

    def total(self) -> Seen:
        """All ports' counters added up (peak: the sum of the ports' peaks)."""
        out = Seen()
        for s in self.seen.values():
            out.accepted += s.accepted
            out.open += s.open
            out.peak_open += s.peak_open
            out.requests.update(s.requests)
        return out

    async def close_port(self, endpoint: str) -> None:
        server = self._servers.pop(endpoint)
        server.close()
        for writer in list(self._writers[endpoint]):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2.0)

    async def close(self) -> None:
        for endpoint in list(self._servers):
            await self.close_port(endpoint)


class RelayPeer:
    """Forwards every connection to ``backend`` (a real node) and holds each StepResult for
    ``delay_s`` before passing it on: correct answers, delivered slowly; pings pass at once."""

    def __init__(self, backend: str, delay_s: float) -> None:
        self.backend = backend
        self.delay_s = delay_s
        self.seen = Seen()
        self.endpoint = ""
        self._server: asyncio.AbstractServer | None = None

    async def listen(self) -> str:
        host, port = parse_tcp_endpoint(self.backend)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       delay_steps: bool) -> None:
            try:
                while True:
                    frame = await _read_frame(reader)
                    type_id = _type_id(frame)
                    if delay_steps and type_id == STEP_RESULT:
                        await asyncio.sleep(self.delay_s)
                    if not delay_steps and type_id is not None:
                        self.seen.requests[MESSAGE_TYPES[type_id].__name__] += 1
                    writer.write(frame)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.seen.opened()
            try:
                b_reader, b_writer = await asyncio.open_connection(host, port)
            except OSError:
                writer.close()
                self.seen.open -= 1
                return
            try:
                await asyncio.gather(pump(reader, b_writer, False), pump(b_reader, writer, True))
            finally:
                self.seen.open -= 1

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.endpoint = format_tcp_endpoint("127.0.0.1", self._server.sockets[0].getsockname()[1])
        return self.endpoint

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)


def _type_id(frame: bytes) -> int | None:
    """The TYPE_ID in a frame's header (``[version, TYPE_ID, rid, ...]``), or None."""
    try:
        header_len = int.from_bytes(frame[PREFIX:PREFIX + 4], "big")
        header = msgpack.unpackb(frame[PREFIX + 4:PREFIX + 4 + header_len], raw=False)
        type_id = header[1]
    except Exception:  # noqa: BLE001 - not our business to judge the frame
        return None
    return type_id if type_id in MESSAGE_TYPES else None


__all__ = [
    "AttackerDHT",
    "accepted_claim",
    "FakePeer",
    "Published",
    "REGULAR_VALUE",
    "RelayPeer",
    "Seen",
    "error_codes",
    "forge_blob",
    "held_by_honest_nodes",
    "hang_up_on_step",
    "pong_only",
    "record_template",
]

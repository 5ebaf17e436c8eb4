"""Peers that lie on the wire: ``FakePeer`` answers the protocol from a ``Policy`` (no
model behind it); ``RelayPeer`` forwards to a real node and holds its step results back.

Every server here counts what it saw (``Seen``), so an attack can tell "blocked" from
"never reached its target".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from layerchain.errors import ProtocolError
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

PREFIX = 4  # bytes of a frame's u32 length prefix (wire/codec.py)
STEP_RESULT = StepResult.TYPE_ID


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

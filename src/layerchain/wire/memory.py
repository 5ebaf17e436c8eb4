"""In-process transport: endpoints ``mem://NAME``, for fast tests of whole swarms.

Same semantics as TCP where it matters: every message is encoded to a frame on ``send``
and decoded on ``recv`` (so sender and receiver never share a tensor, and ``Limits``
apply), order is kept per direction, a closed side makes the other's ``recv`` raise
``PeerUnreachable`` once the frames already sent are read, and ``latency_ms`` delays every
frame by that many milliseconds one way (a round trip costs twice).

Listeners register in a ``MemoryNetwork``: one per ``MemoryTransport(hub=...)``, or the
module-level ``DEFAULT_HUB`` shared by all transports built without one.

A transport built with ``peer_id=`` stands for a node holding that identity: its listeners
"prove" it, and ``connect(endpoint, peer_id=X)`` to a listener that proves another id
raises ``PeerAuthFailed``, as TLS would (a listener without one proves nothing, like tcp://).
This lets in-process swarms test impostors and failover without certificates.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from layerchain.errors import ConfigError, PeerAuthFailed, PeerUnreachable, ProtocolError
from layerchain.wire.codec import DEFAULT_LIMITS, Limits, decode, encode
from layerchain.wire.messages import Message

if TYPE_CHECKING:
    from layerchain.wire.transport import Receiver

log = logging.getLogger(__name__)

SCHEME = "mem://"


class _Pipe:
    """One direction of a connection: frames with the loop time they become readable."""

    def __init__(self) -> None:
        self.frames: deque[tuple[float, bytearray]] = deque()
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class MemoryConnection:
    """One end of an in-process connection."""

    def __init__(
        self,
        outgoing: _Pipe,
        incoming: _Pipe,
        peer: str,
        limits: Limits,
        latency_s: float,
        remote_peer_id: str | None = None,
    ) -> None:
        self.peer = peer  # the other end: the listener's endpoint, or mem://NAME#client-N
        self.remote_peer_id = remote_peer_id  # the id the listener "proved" (client side)
        self.pinned = False  # set by the server while the peer holds sessions here (unused)
        self._out = outgoing
        self._in = incoming
        self._limits = limits
        self._latency_s = latency_s
        self._pump: asyncio.Task[None] | None = None  # push mode, see set_receiver

    @property
    def closed(self) -> bool:
        return self._out.closed

    async def send(self, msg: Message) -> None:
        frame = bytearray()
        for buf in encode(msg, self._limits):
            frame += buf  # the one copy: the receiver gets its own tensor memory
        self._put(frame)

    async def send_frame(self, frame: bytes) -> None:
        """Deliver an already-encoded frame as is (tests, relays); the receiver validates it."""
        self._put(bytearray(frame))

    def _put(self, frame: bytearray) -> None:
        if self._out.closed:
            raise PeerUnreachable(f"{self.peer}: connection closed")
        due = asyncio.get_running_loop().time() + self._latency_s
        self._out.frames.append((due, frame))
        self._out.wake()

    async def recv(self) -> Message:
        pipe = self._in
        while True:
            if pipe.frames:
                due, frame = pipe.frames[0]
                delay = due - asyncio.get_running_loop().time()
                if delay <= 0:
                    pipe.frames.popleft()
                    return decode(frame, self._limits)
                await asyncio.sleep(delay)  # peek, then pop: a cancelled recv loses nothing
                continue
            if pipe.closed:
                raise PeerUnreachable(f"{self.peer}: connection closed")
            pipe.waiter = asyncio.get_running_loop().create_future()
            try:
                await pipe.waiter
            finally:
                pipe.waiter = None

    def set_receiver(self, receiver: Receiver) -> None:
        """Push mode: a task hands ``receiver`` each message, a ProtocolError per bad frame,
        then one PeerUnreachable (the ``Connection`` contract)."""

        async def pump() -> None:
            while True:
                try:
                    receiver(await self.recv())
                except ProtocolError as error:
                    receiver(error)
                except PeerUnreachable as error:
                    receiver(error)
                    return
                except asyncio.CancelledError:
                    receiver(PeerUnreachable(f"{self.peer}: connection closed"))
                    raise

        self._pump = asyncio.get_running_loop().create_task(pump())

    async def close(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None and pump is not asyncio.current_task() and not pump.done():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        for pipe in (self._out, self._in):
            pipe.closed = True
            pipe.wake()
        self._in.frames.clear()


class MemoryListener:
    """A registered ``mem://NAME``; ``close`` unregisters it and ends its connections."""

    def __init__(
        self,
        hub: MemoryNetwork,
        endpoint: str,
        handler: Callable[[MemoryConnection], Awaitable[None]],
        limits: Limits,
        peer_id: str | None,
    ) -> None:
        self.endpoint = endpoint
        self.limits = limits  # what the accepting side enforces
        self.peer_id = peer_id  # the identity it proves to clients, None: none
        self._hub = hub
        self._handler = handler
        self._tasks: dict[MemoryConnection, asyncio.Task[None]] = {}
        self._closed = False

    def _accept(self, conn: MemoryConnection) -> None:
        self._tasks[conn] = asyncio.get_running_loop().create_task(self._run(conn))

    async def _run(self, conn: MemoryConnection) -> None:
        try:
            await self._handler(conn)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("connection handler for %s failed", conn.peer)
        finally:
            self._tasks.pop(conn, None)
            await conn.close()

    async def close(self) -> None:
        self._closed = True
        self._hub._listeners.pop(self.endpoint, None)
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class MemoryNetwork:
    """The registry of ``mem://`` listeners that can reach each other."""

    def __init__(self) -> None:
        self._listeners: dict[str, MemoryListener] = {}
        self._ids = itertools.count(1)

    def endpoints(self) -> list[str]:
        return sorted(self._listeners)


DEFAULT_HUB = MemoryNetwork()


def _name(endpoint: str) -> str:
    if not endpoint.startswith(SCHEME) or "/" in endpoint[len(SCHEME) :]:
        raise ConfigError(f"bad memory endpoint {endpoint!r}", hint="write it as mem://NAME")
    return endpoint[len(SCHEME) :]


class MemoryTransport:
    """``Transport`` inside one process and one event loop."""

    def __init__(
        self,
        hub: MemoryNetwork | None = None,
        *,
        latency_ms: float = 0.0,
        limits: Limits = DEFAULT_LIMITS,
        peer_id: str | None = None,
    ) -> None:
        self.hub = hub if hub is not None else DEFAULT_HUB
        self.latency_ms = latency_ms  # one-way delay added to every frame, milliseconds
        self.limits = limits
        self.peer_id = peer_id  # the identity this transport's listeners prove (see above)

    async def listen(
        self, endpoint: str, handler: Callable[[MemoryConnection], Awaitable[None]]
    ) -> MemoryListener:
        """Register ``mem://NAME`` (``mem://`` alone picks a fresh name)."""
        name = _name(endpoint) or f"auto-{next(self.hub._ids)}"
        endpoint = SCHEME + name
        if endpoint in self.hub._listeners:
            raise ConfigError(f"memory endpoint {endpoint} is already in use")
        listener = MemoryListener(self.hub, endpoint, handler, self.limits, self.peer_id)
        self.hub._listeners[endpoint] = listener
        return listener

    async def connect(self, endpoint: str, *, peer_id: str | None = None) -> MemoryConnection:
        """Connect to ``endpoint``; ``PeerAuthFailed`` if ``peer_id`` is given and the listener
        proves another id (one that proves none is accepted, like tcp://)."""
        _name(endpoint)
        listener = self.hub._listeners.get(endpoint)
        if listener is None or listener._closed:
            raise PeerUnreachable(f"nothing listens on {endpoint}")
        if peer_id is not None and listener.peer_id not in (None, peer_id):
            raise PeerAuthFailed(
                f"{endpoint} proves peer {listener.peer_id}, not {peer_id}", peer_id=peer_id
            )
        if len(listener._tasks) >= listener.limits.max_connections:
            raise PeerUnreachable(f"{endpoint} refuses connections: too many open")
        latency_s = self.latency_ms / 1000.0
        to_server, to_client = _Pipe(), _Pipe()
        client_name = f"{endpoint}#client-{next(self.hub._ids)}"
        client = MemoryConnection(
            to_server, to_client, endpoint, self.limits, latency_s, listener.peer_id
        )
        server = MemoryConnection(to_client, to_server, client_name, listener.limits, latency_s)
        listener._accept(server)
        return client


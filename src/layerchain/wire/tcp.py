"""Direct TCP transport: frames over asyncio sockets, endpoints ``tcp://HOST:PORT``.

One ``TcpConnection`` is both the asyncio protocol and the ``Connection`` the rest of
layerchain sees: bytes go straight from ``data_received`` into a frame queue, with no
StreamReader in between (the per-hop overhead budget is 0.3 ms for a whole step).

Defences against hostile peers (``Limits``):
* a length prefix over ``max_frame_bytes`` is refused before any buffer is allocated; the
  stream has then lost frame sync, so ``recv`` raises the error once and the connection
  can only send (an error reply) and close;
* memory grows only with bytes actually received, and reading pauses while decoded-but-
  unread frames exceed ``max_frame_bytes`` (or 256 frames);
* a frame not complete ``read_timeout_s`` after its first byte closes the connection,
  whatever length it declares: the deadline is the receiver's, and no pace of trickling
  extends it (slowloris). A reply the peer does not read within ``read_timeout_s`` closes
  it too;
* a listener holds at most ``max_connections`` connections, and a new connection is always
  admitted: at the cap it takes the place of the least recently active one, the connection
  whose last *complete* frame is oldest (bytes of a partial frame are not activity), among
  those not ``pinned`` by their server (holding sessions) if there are any, else among all.
  So idle, trickling or stalled sockets cannot lock honest clients out, and a client in the
  middle of a generation is closed only if every slot holds sessions and it is the least
  recently active of them. A TLS listener (``wire.tls``) counts a connection from its accept,
  not from its handshake: a socket that never finishes the handshake holds a slot like an
  idle one (and gives it up first), and is closed after ``read_timeout_s`` anyway.

``recv`` and ``send`` raise ``PeerUnreachable`` once the connection is gone.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from layerchain.errors import (
    ConfigError,
    FrameError,
    PeerUnreachable,
    ProtocolError,
)
from layerchain.wire.codec import DEFAULT_LIMITS, PREFIX_BYTES, Limits, decode, encode, read_length
from layerchain.wire.messages import Message

if TYPE_CHECKING:
    from layerchain.wire.transport import Incoming, Receiver

log = logging.getLogger(__name__)

_MAX_QUEUED_FRAMES = 256  # frames read ahead of recv() before reading pauses


def parse_tcp_endpoint(endpoint: str, scheme: str = "tcp") -> tuple[str, int]:
    """("host", port) from ``tcp://host:port`` (``tcp://[::1]:port`` for IPv6), or from
    ``SCHEME://host:port`` for another scheme over TCP (``tls``)."""
    prefix = f"{scheme}://"
    rest = endpoint[len(prefix) :] if endpoint.startswith(prefix) else None
    host, _, port = (rest or "").rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"bad {scheme.upper()} endpoint {endpoint!r}", hint=f"write it as {prefix}HOST:PORT"
        )
    return host, int(port)


def format_tcp_endpoint(host: str, port: int, scheme: str = "tcp") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class TcpConnection(asyncio.Protocol):
    """A framed TCP connection. One task may ``recv`` at a time; any number may ``send``."""

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        peer: str = "",
        on_made: Callable[[TcpConnection], None] | None = None,
        scheme: str = "tcp",
    ) -> None:
        self.peer = peer  # the remote endpoint, tcp://host:port (tls://host:port over TLS)
        self._scheme = scheme
        self._limits = limits
        self._on_made = on_made
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()  # bytes of the frame(s) being received
        self._need = 0  # bytes of the current frame incl. prefix; 0 while the prefix is unread
        self._frames: deque[bytearray] = deque()  # whole frames waiting for recv()
        self._queued = 0  # bytes in _frames
        self._read_end: ProtocolError | PeerUnreachable | None = None  # why reading stopped
        self._waiter: asyncio.Future[None] | None = None  # recv() waiting for a frame
        self._reading_paused = False
        self._writing_paused = False
        self._drainers: list[asyncio.Future[None]] = []
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._frame_started = 0.0  # loop time of the pending partial frame's first byte
        self._timer: asyncio.TimerHandle | None = None
        self._receiver: Receiver | None = None  # push mode, see set_receiver
        self.last_frame = self._loop.time()  # loop time of the last complete frame (or accept)
        self.pinned = False  # set by the server while the peer holds sessions here
        self.remote_peer_id: str | None = None  # plaintext proves nothing (wire.tls sets it)
        self._tls_pending = False  # accepted by a TLS listener, handshake not done yet

    # ------------------------------------------------------------- asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (asyncio's, or uvloop's, which does not subclass it)
        self._transport = cast(asyncio.Transport, transport)
        transport = self._transport
        if self._tls_pending:  # not one byte of the ClientHello for the frame parser
            transport.pause_reading()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.peer:
            peername = transport.get_extra_info("peername")
            self.peer = (
                format_tcp_endpoint(peername[0], peername[1], self._scheme)
                if peername
                else f"{self._scheme}://?"
            )
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self._read_end is not None:
            return
        buf = self._buf
        buf += data
        completed = False
        while True:
            if not self._need:
                if len(buf) < PREFIX_BYTES:
                    break
                try:
                    self._need = PREFIX_BYTES + read_length(buf[:PREFIX_BYTES], self._limits)
                except ProtocolError as error:  # refused before allocating; sync is lost
                    self._buf = bytearray()
                    self._end_reading(error)
                    if self._transport is not None:
                        self._transport.pause_reading()
                    return
            if len(buf) < self._need:
                break
            if len(buf) == self._need:  # the common case: hand the buffer over, no copy
                frame, self._buf = buf, bytearray()
                buf = self._buf
            else:
                frame = buf[: self._need]
                del buf[: self._need]
            self._need = 0
            completed = True
            self._frames.append(frame)
            self._queued += len(frame)
        if completed:
            self.last_frame = self._loop.time()
            if self._receiver is not None:
                self._push()
            self._wake()
            if (
                self._queued >= self._limits.max_frame_bytes
                or len(self._frames) >= _MAX_QUEUED_FRAMES
            ) and self._transport is not None:
                self._reading_paused = True
                self._transport.pause_reading()
        if buf:  # a partial frame is pending: it has read_timeout_s from its first byte
            if completed or not self._frame_started:
                self._frame_started = self._loop.time()
            if self._timer is None:
                self._timer = self._loop.call_at(self._deadline(), self._check_timeout)
        else:
            self._frame_started = 0.0

    def eof_received(self) -> bool:
        self._lose_partial_frame("connection closed by peer")
        # Keep the write side open for an error reply; the owner closes. (TLS has no half
        # close: asyncio's TLS transport closes on EOF whatever this returns, and warns.)
        return self._scheme != "tls"

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose_partial_frame(f"connection lost: {exc}" if exc else "connection closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()

    # ------------------------------------------------------------- reading internals

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _end_reading(self, error: ProtocolError | PeerUnreachable) -> None:
        if self._read_end is None:
            self._read_end = error
            if self._receiver is not None:
                self._push()
            self._wake()

    def _push(self) -> None:
        """Push mode: hand every queued frame, then the end of reading, to the receiver."""
        receiver = self._receiver
        assert receiver is not None
        while self._frames:
            frame = self._frames.popleft()
            self._queued -= len(frame)
            try:
                item: Incoming = decode(frame, self._limits)
            except ProtocolError as error:
                item = error
            receiver(item)
        if self._read_end is not None and not isinstance(self._read_end, PeerUnreachable):
            receiver(self._read_end)  # a framing error: sync is lost, reading is over
            self._read_end = PeerUnreachable(f"{self.peer}: stream lost frame sync")
        if self._read_end is not None:
            self._receiver = None
            receiver(self._read_end)
        elif self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def set_receiver(self, receiver: Receiver) -> None:
        """Push mode instead of ``recv``: ``receiver`` is called, from the event loop, with
        each incoming message, a ProtocolError for each bad frame, and finally one
        PeerUnreachable when reading ends. Saves a task wake-up per message (RpcClient)."""
        self._receiver = receiver
        self._push()

    def _lose_partial_frame(self, why: str) -> None:
        if self._buf and self._read_end is None:
            need = f" of {self._need}" if self._need else ""
            got = len(self._buf)
            self._end_reading(FrameError(f"truncated frame: got {got}{need} bytes, {why}"))
        self._buf = bytearray()
        self._end_reading(PeerUnreachable(f"{self.peer}: {why}"))

    def _deadline(self) -> float:
        return self._frame_started + self._limits.read_timeout_s

    def _check_timeout(self) -> None:
        self._timer = None
        if not self._buf or self._read_end is not None:
            return
        now = self._loop.time()
        if self._reading_paused:  # we stopped reading, not the peer's fault: restart the clock
            self._frame_started = now
        elif now >= self._deadline():
            log.info("closing %s: a partial frame timed out (%d bytes)", self.peer, len(self._buf))
            self._buf = bytearray()
            self._end_reading(PeerUnreachable(f"{self.peer}: read timeout on a partial frame"))
            if self._transport is not None:
                self._transport.abort()
            return
        self._timer = self._loop.call_at(self._deadline(), self._check_timeout)

    # ------------------------------------------------------------- Connection

    @property
    def closed(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    async def start_tls_server(self, context: ssl.SSLContext) -> None:
        """Server side of a TLS listener: upgrade this accepted connection to TLS, within
        ``read_timeout_s``; PeerUnreachable (the socket closed) if the handshake fails."""
        transport = self._transport
        assert transport is not None and self._tls_pending
        try:
            tls = await self._loop.start_tls(
                transport, self, context, server_side=True,
                ssl_handshake_timeout=self._limits.read_timeout_s,
            )
        except (OSError, asyncio.TimeoutError) as error:  # ssl.SSLError is an OSError
            transport.abort()
            raise PeerUnreachable(f"{self.peer}: TLS handshake failed: {error!r}") from None
        if tls is None:  # the peer closed during the handshake
            transport.abort()
            raise PeerUnreachable(f"{self.peer}: closed during the TLS handshake")
        self._tls_pending = False
        self._transport = tls

    def extra(self, name: str) -> object:
        """The asyncio transport's extra info ``name`` (``"ssl_object"`` over TLS), or None."""
        return None if self._transport is None else self._transport.get_extra_info(name)

    async def recv(self) -> Message:
        """The next message; ProtocolError for a bad frame, PeerUnreachable once gone."""
        while not self._frames:
            if self._read_end is not None:
                error = self._read_end
                if isinstance(error, ProtocolError):  # raise it once; then the stream is dead
                    self._read_end = PeerUnreachable(f"{self.peer}: stream lost frame sync")
                raise error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = self._frames.popleft()
        self._queued -= len(frame)
        if self._reading_paused and self._read_end is None and self._transport is not None:
            limit = self._limits.max_frame_bytes
            if self._queued < limit and len(self._frames) < _MAX_QUEUED_FRAMES:
                self._reading_paused = False
                self._transport.resume_reading()
        return decode(frame, self._limits)

    async def send(self, msg: Message) -> None:
        """Encode and write one frame (ProtocolError if ``msg`` breaks the limits)."""
        bufs = encode(msg, self._limits)
        # One write per frame: concurrent senders never interleave bytes, and the joined
        # bytes free the caller to reuse its tensor at once (one copy of the payload).
        await self.send_frame(bufs[0] if len(bufs) == 1 else b"".join(bufs))

    async def send_frame(self, frame: bytes | bytearray | memoryview) -> None:
        """Write an already-encoded frame as is (relays, tests); the receiver validates it."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise PeerUnreachable(f"{self.peer}: connection closed")
        transport.write(frame)
        if self._writing_paused:  # the peer reads slower than we write: wait, bounded buffer
            fut = self._loop.create_future()
            self._drainers.append(fut)
            try:  # a peer that stops reading holds nothing here for longer than this
                await asyncio.wait_for(fut, self._limits.read_timeout_s)
            except asyncio.TimeoutError:
                log.info("closing %s: it read no reply for %.0f s", self.peer,
                         self._limits.read_timeout_s)
                transport.abort()
                raise PeerUnreachable(f"{self.peer}: the peer stopped reading") from None
            if transport.is_closing():
                raise PeerUnreachable(f"{self.peer}: connection closed while sending")

    async def close(self) -> None:
        """Close (idempotent); waits briefly for the socket to be released."""
        self._end_reading(PeerUnreachable(f"{self.peer}: connection closed"))
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        if self._transport is not None and not self._lost.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), 1.0)
            except asyncio.TimeoutError:
                self._transport.abort()


class TcpListener:
    """A bound TCP server; ``endpoint`` is the real address (port 0 resolved)."""

    def __init__(
        self,
        limits: Limits,
        handler: Callable[[TcpConnection], Awaitable[None]],
        scheme: str = "tcp",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.endpoint = ""
        self.scheme = scheme  # of the endpoints it accepts on: tcp, or tls (wire.tls)
        self._tls = tls  # server context: each accepted connection is upgraded (wire.tls)
        self.evicted = 0  # connections closed to admit new ones
        self.refused = 0  # new connections closed because none could be evicted
        self._limits = limits
        self._handler = handler
        self._warned_at = float("-inf")  # loop time of the last warning about refusals
        self._server: asyncio.AbstractServer | None = None
        self._tasks: dict[TcpConnection, asyncio.Task[None]] = {}

    def _make_connection(self) -> TcpConnection:
        conn = TcpConnection(self._limits, on_made=self._start, scheme=self.scheme)
        conn._tls_pending = self._tls is not None
        return conn

    def _start(self, conn: TcpConnection) -> None:
        cap = self._limits.max_connections
        live = [c for c in self._tasks if not c.closed] if len(self._tasks) >= cap else []
        if len(live) >= cap:  # (evicted connections may not be gone from _tasks yet)
            victim = self._quietest(live)
            if victim is None or victim._transport is None:
                self.refused += 1
                now = conn._loop.time()
                if now - self._warned_at >= 10.0:  # a flood must not flood the log too
                    self._warned_at = now
                    log.warning("refusing %s: %d connections open (%d refused so far)",
                                conn.peer, len(live), self.refused)
                if conn._transport is not None:
                    conn._transport.abort()
                return
            self.evicted += 1
            log.info("closing %s (pinned: %s), no frame for %.1f s, to admit %s", victim.peer,
                     victim.pinned, victim._loop.time() - victim.last_frame, conn.peer)
            victim._transport.abort()
        self._tasks[conn] = asyncio.get_running_loop().create_task(self._run(conn))

    @staticmethod
    def _quietest(live: list[TcpConnection]) -> TcpConnection | None:
        """The connection to close for a newcomer: the least recently active (oldest complete
        frame) among those not pinned, else among all; None only if ``live`` is empty."""
        return min(live, key=lambda c: (c.pinned, c.last_frame), default=None)

    async def _run(self, conn: TcpConnection) -> None:
        try:
            if self._tls is not None:
                await conn.start_tls_server(self._tls)
            await self._handler(conn)
        except asyncio.CancelledError:
            pass
        except PeerUnreachable as error:  # a failed handshake: a scanner, or plaintext
            log.debug("dropped %s: %s", conn.peer, error)
        except Exception:  # a handler bug must not take the listener down
            log.exception("connection handler for %s failed", conn.peer)
        finally:
            self._tasks.pop(conn, None)
            await conn.close()

    @property
    def connections(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Stop accepting, close every connection and wait for their handlers."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


class TcpTransport:
    """``Transport`` over direct TCP."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, *, connect_timeout_s: float = 5.0) -> None:
        self.limits = limits
        self.connect_timeout_s = connect_timeout_s  # seconds to establish a connection

    async def connect(self, endpoint: str, *, peer_id: str | None = None) -> TcpConnection:
        """Dial ``endpoint``. Plaintext proves no identity: ``peer_id`` is not checked (the
        ``Dialer`` dials tcp:// only when told the network is trusted)."""
        host, port = parse_tcp_endpoint(endpoint)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: TcpConnection(self.limits, endpoint), host, port),
                self.connect_timeout_s,
            )
        except (OSError, asyncio.TimeoutError) as error:
            raise PeerUnreachable(f"cannot connect to {endpoint}: {error or 'timeout'}") from error
        return conn

    async def listen(
        self, endpoint: str, handler: Callable[[TcpConnection], Awaitable[None]]
    ) -> TcpListener:
        return await start_listener(endpoint, TcpListener(self.limits, handler))


async def start_listener(endpoint: str, listener: TcpListener) -> TcpListener:
    """Bind ``listener`` to ``endpoint`` (``SCHEME://HOST:PORT`` of its scheme; port 0: a
    free one) and set its ``endpoint`` to the bound address; ConfigError if it can't."""
    host, port = parse_tcp_endpoint(endpoint, listener.scheme)
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(listener._make_connection, host, port)
    except OSError as error:
        raise ConfigError(f"cannot listen on {endpoint}: {error}") from error
    listener._server = server
    bound = server.sockets[0].getsockname()
    listener.endpoint = format_tcp_endpoint(bound[0], bound[1], listener.scheme)
    return listener

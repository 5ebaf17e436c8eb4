"""A reverse-connection relay: peers that cannot accept connections serve through a reachable one.

Endpoint: ``relay://RELAYHOST:PORT/PEERID`` — reach ``PEERID`` through the relay service
listening at ``RELAYHOST:PORT`` (a node started with ``--relay``). Three roles:

* the **relay** (``RelayService``) listens on its own TCP port;
* the **served peer** behind NAT (``RelayTransport.listen``) keeps one outbound *control*
  connection to the relay, registered under its peer id, which it proves by signing the
  relay's fresh nonce with its Ed25519 identity;
* a **client** (``RelayTransport.connect``) asks the relay for ``PEERID``; the relay sends
  the peer a one-time token over the control connection, the peer opens a fresh outbound
  *data* connection presenting the token, and the relay splices the two sockets byte for
  byte. The client then runs TLS over the pipe (``wire.tls.tls_client_over``, checking
  PEERID's key), the peer the server side (``tls_server_over``): the relay forwards only
  ciphertext it can neither read nor alter undetected.

Handshake (every frame a ``wire.messages`` message through the codec, small limits)::

    relay  -> any      RelayChallenge(nonce)        first frame on every accepted socket
    peer   -> relay    RelayRegister(peer_id, public_key, signature)   control connection
    relay  -> peer     RelayOk | ErrorReply          then: RelayDial(token) per client,
                                                     Ping/Pong keepalive from the peer
    client -> relay    RelayConnect(peer_id)     -> RelayOk | ErrorReply, then raw bytes
    peer   -> relay    RelayAccept(token)        -> RelayOk | ErrorReply, then raw bytes

Handshake frames are read with exact-length ``sock_recv`` calls, so no byte after the last
handshake frame is ever buffered by us: the socket is handed to TLS clean.

Caps of a relay (``RelayConfig``): spliced pairs at once (``max_pairs``, counting clients
waiting for their peer's data connection; at the cap the least recently active spliced
pair gives way to a newcomer, as a node's listener does), bytes per second in each
direction of a pair (``max_mbps``, a token bucket), registered peers
(``max_registrations``), sockets still in their handshake (``max_pending``, each with
``handshake_timeout_s``). Registering a peer id needs its private key; a new proven
registration of the same id replaces the old one. A served peer opens at most
``max_connections`` data connections at once, whatever its relay asks.

The relay learns who talks to whom and how much; it learns nothing of what (see README,
"Behind NAT"). Extra latency: one more leg (client -> relay -> peer) and a copy per 64 KiB
chunk; on loopback a decode step's round trip (1 x 576 floats) took 35-47 us more through
the relay than direct TLS (p50 180 vs 145 us), a 128-token step 0.45-0.77 ms more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace

from typing import TYPE_CHECKING

from layerchain.discovery.identity import Identity, peer_id_from_public_key, verify
from layerchain.errors import (
    ConfigError,
    LayerchainError,
    PeerAuthFailed,
    PeerBusy,
    PeerUnreachable,
    ProtocolError,
)
from layerchain.wire import messages as m
from layerchain.wire.codec import DEFAULT_LIMITS, PREFIX_BYTES, Limits, decode, encode_bytes, read_length
from layerchain.wire.tcp import TcpConnection, format_tcp_endpoint
from layerchain.wire.tls import tls_client_over, tls_server_over

if TYPE_CHECKING:
    from layerchain.wire.transport import Connection, Handler

log = logging.getLogger(__name__)

# Handshake frames are a few hundred bytes: a peer cannot make a relay buffer more.
HANDSHAKE_LIMITS = replace(DEFAULT_LIMITS, max_frame_bytes=4096, max_header_bytes=4096)
REGISTER_DOMAIN = b"layerchain relay register v1\0"  # signed with the relay's nonce
NONCE_BYTES = 32
TOKEN_BYTES = 16

_RELAY = re.compile(r"relay://([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})/([1-9A-HJ-NP-Za-km-z]{16,24})")



@dataclass(frozen=True)
class RelayAddress:
    """The parts of ``relay://HOST:PORT/PEERID``."""

    host: str  # the relay's host (brackets removed for IPv6)
    port: int  # the relay service's TCP port
    peer_id: str  # the peer reached through it

    @property
    def relay(self) -> str:
        """``HOST:PORT`` of the relay service."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"relay://{self.relay}/{self.peer_id}"


def parse_relay_endpoint(endpoint: str) -> RelayAddress:
    """Pure: the parts of ``relay://HOST:PORT/PEERID``, or ConfigError saying what is wrong."""
    match = _RELAY.fullmatch(endpoint)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ConfigError(
            f"bad relay endpoint {endpoint[:80]!r}", hint="write it as relay://HOST:PORT/PEERID"
        )
    host = match.group(1)
    host = host[1:-1] if host.startswith("[") else host
    return RelayAddress(host, int(match.group(2)), match.group(3))


def register_payload(nonce: bytes) -> bytes:
    """What a peer signs to register with a relay that sent ``nonce``."""
    return REGISTER_DOMAIN + nonce


@dataclass(frozen=True)
class RelayConfig:
    """Caps and timeouts of a relay service."""

    max_pairs: int = 64  # spliced client<->peer pairs at once (incl. clients waiting for one)
    max_mbps: float = 100.0  # megabits per second in each direction of one pair
    max_registrations: int = 64  # peers registered at once
    max_pending: int = 128  # accepted sockets still in their handshake
    handshake_timeout_s: float = 5.0  # a socket's first frame must arrive within this
    dial_timeout_s: float = 5.0  # a peer must open its data connection within this
    control_idle_s: float = 60.0  # a control connection silent this long is dropped

    def __post_init__(self) -> None:
        for name in ("max_pairs", "max_registrations", "max_pending"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ConfigError(f"relay setting {name} must be an int >= 1, got "
                                  f"{getattr(self, name)!r}")
        for name in ("max_mbps", "handshake_timeout_s", "dial_timeout_s", "control_idle_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"relay setting {name} must be positive, got "
                                  f"{getattr(self, name)!r}")

    @property
    def bytes_per_s(self) -> float:
        return self.max_mbps * 1e6 / 8


# ---------------------------------------------------------------------------- pure parts


@dataclass
class TokenBucket:
    """Bytes per second with a burst of ``capacity`` bytes; a sender may go into debt, and
    then waits until the debt is repaid (``take`` says how long)."""

    rate: float  # bytes per second
    capacity: float  # bytes
    tokens: float = field(default=-1.0)  # starts full
    at: float = 0.0  # loop time of the last refill

    def take(self, nbytes: int, now: float) -> float:
        """Spend ``nbytes``; seconds the sender must now wait (0.0: none)."""
        if self.tokens < 0 and self.at == 0.0:
            self.tokens, self.at = self.capacity, now
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= nbytes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def bucket_for(config: RelayConfig) -> TokenBucket:
    """One direction's bucket: the rate, and a burst of a quarter second of it (>= 64 KiB)."""
    rate = config.bytes_per_s
    return TokenBucket(rate, max(64 * 1024, rate / 4))


# ---------------------------------------------------------------------------- socket frames


async def send_frame(sock: socket.socket, msg: m.Message) -> None:
    """Write one handshake frame on a raw non-blocking socket."""
    try:
        await asyncio.get_running_loop().sock_sendall(sock, encode_bytes(msg, HANDSHAKE_LIMITS))
    except OSError as error:
        raise PeerUnreachable(f"relay handshake: {error}") from error


async def _read_exactly(sock: socket.socket, nbytes: int) -> bytearray:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < nbytes:
        try:
            chunk = await loop.sock_recv(sock, nbytes - len(buf))  # never past the frame
        except OSError as error:
            raise PeerUnreachable(f"relay handshake: {error}") from error
        if not chunk:
            raise PeerUnreachable("relay handshake: connection closed")
        buf += chunk
    return buf


async def recv_frame(sock: socket.socket) -> m.Message:
    """Read exactly one handshake frame (ProtocolError if bad, PeerUnreachable if closed)."""
    prefix = await _read_exactly(sock, PREFIX_BYTES)
    body = await _read_exactly(sock, read_length(prefix, HANDSHAKE_LIMITS))
    return decode(prefix + body, HANDSHAKE_LIMITS)


async def _expect_ok(sock: socket.socket, what: str) -> None:
    reply = await recv_frame(sock)
    if isinstance(reply, m.ErrorReply):
        error = PeerBusy if reply.code == "busy" else PeerUnreachable
        raise error(f"{what}: the relay refused: {reply.message}")
    if not isinstance(reply, m.RelayOk):
        raise ProtocolError(f"{what}: the relay answered {type(reply).__name__}")


async def open_socket(host: str, port: int, timeout_s: float) -> socket.socket:
    """A connected non-blocking TCP socket with TCP_NODELAY (PeerUnreachable if none)."""
    loop = asyncio.get_running_loop()

    async def connect() -> socket.socket:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
            except OSError as error:
                sock.close()
                last = error
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise last or OSError(f"no address for {host}")

    try:
        return await asyncio.wait_for(connect(), timeout_s)
    except (OSError, asyncio.TimeoutError) as error:
        raise PeerUnreachable(f"cannot connect to relay {host}:{port}: {error or 'timeout'}") \
            from error


async def relay_dial(address: RelayAddress, timeout_s: float = 5.0) -> socket.socket:
    """A raw socket spliced through the relay to ``address.peer_id`` (the client's side).

    Nothing is authenticated yet: the caller runs TLS over it and checks the peer id.
    PeerUnreachable if the relay is down or does not know the peer, PeerBusy at its cap."""
    sock = await open_socket(address.host, address.port, timeout_s)

    async def ask() -> None:
        challenge = await recv_frame(sock)
        if not isinstance(challenge, m.RelayChallenge):
            raise ProtocolError(f"relay {address.relay} opened with "
                                f"{type(challenge).__name__}, not a challenge")
        await send_frame(sock, m.RelayConnect(1, address.peer_id))
        await _expect_ok(sock, f"relay {address.relay} to {address.peer_id}")

    try:  # our ask, and the peer's dial-back to the relay
        await asyncio.wait_for(ask(), timeout_s * 2)
    except asyncio.TimeoutError:
        sock.close()
        raise PeerUnreachable(f"relay {address.relay}: no pipe to {address.peer_id} "
                              f"within {2 * timeout_s:g} s") from None
    except BaseException:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------------- the splice


PIPE_CHUNK = 64 * 1024  # bytes read at once on a side of a pair: what one read may
# overdraw the bandwidth cap by, and few enough reads for a prefill (1.2 MB: 19)


class _Pipe(asyncio.BufferedProtocol):
    """One side of a spliced pair: what it reads, the other side writes.

    Reading pauses while the other side's write buffer is full (backpressure) or this
    direction's token bucket is in debt (the bandwidth cap); EOF or loss on one side closes
    both (after the other flushes what it holds)."""

    def __init__(self, bucket: TokenBucket, done: asyncio.Future[None]) -> None:
        self._buffer = memoryview(bytearray(PIPE_CHUNK))
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self.bytes = 0  # bytes read on this side (forwarded to the other)
        self.active_at = asyncio.get_running_loop().time()  # loop time of its last bytes
        self._bucket = bucket
        self._done = done
        self._throttled = False  # the bucket is in debt
        self._blocked = False  # the other side's write buffer is full
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()  # until both sides exist (``_splice`` resumes)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        other = self.other
        if other is None or other.transport is None or other.transport.is_closing():
            return
        other.transport.write(bytes(self._buffer[:nbytes]))  # (the buffer is reused)
        self.bytes += nbytes
        self.active_at = self._loop.time()
        wait = self._bucket.take(nbytes, self._loop.time())
        if wait > 0.0:
            self._throttled = True
            self._update()
            self._loop.call_later(wait, self._unthrottle)

    def _unthrottle(self) -> None:
        self._throttled = False
        self._update()

    def _update(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._throttled or self._blocked:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def pause_writing(self) -> None:  # our buffer is full: the other side stops reading
        if self.other is not None:
            self.other._blocked = True
            self.other._update()

    def resume_writing(self) -> None:
        if self.other is not None:
            self.other._blocked = False
            self.other._update()

    def eof_received(self) -> bool:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()  # flushes what it holds first
        return False  # and close this side

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()
        if not self._done.done():
            self._done.set_result(None)


_Pair = tuple[_Pipe, _Pipe]


async def splice(a: socket.socket, b: socket.socket, config: RelayConfig,
                 live: set[_Pair] | None = None) -> tuple[int, int]:
    """Forward bytes both ways between two connected sockets until either side ends;
    (bytes a -> b, bytes b -> a). Each direction is capped at ``config.max_mbps``. The
    pair is in ``live`` while it runs (the relay evicts from there)."""
    loop = asyncio.get_running_loop()
    done_a: asyncio.Future[None] = loop.create_future()
    done_b: asyncio.Future[None] = loop.create_future()
    pa, pb = _Pipe(bucket_for(config), done_a), _Pipe(bucket_for(config), done_b)
    pa.other, pb.other = pb, pa
    try:
        await loop.connect_accepted_socket(lambda: pa, a)
    except BaseException:
        a.close()
        b.close()
        raise
    try:
        await loop.connect_accepted_socket(lambda: pb, b)
    except BaseException:
        assert pa.transport is not None
        pa.transport.close()
        raise
    pa._update()
    pb._update()
    pair = (pa, pb)
    if live is not None:
        live.add(pair)
    try:
        await asyncio.gather(done_a, done_b)
    finally:  # cancelled (the relay closes): drop both at once
        if live is not None:
            live.discard(pair)
        for pipe in (pa, pb):
            if pipe.transport is not None and not pipe.transport.is_closing():
                pipe.transport.abort()
    return pa.bytes, pb.bytes


# ---------------------------------------------------------------------------- the relay


@dataclass
class _Registration:
    peer_id: str
    control: TcpConnection


class RelayService:
    """The relay a ``--relay`` node runs beside its inference listener (module docstring)."""

    def __init__(self, config: RelayConfig = RelayConfig()) -> None:
        self.config = config
        self.port = 0  # bound TCP port, once started
        self.host = ""
        self.registrations: dict[str, _Registration] = {}
        self.pairs = 0  # spliced or waiting pairs now
        self.refused = 0  # sockets refused at a cap or for a bad handshake
        self.spliced = 0  # pairs spliced so far
        self.evicted = 0  # spliced pairs closed to admit a new client at the cap
        self._live: set[_Pair] = set()  # spliced pairs now
        self._waiting: dict[bytes, tuple[str, asyncio.Future[socket.socket]]] = {}
        self._pending = 0
        self._server: socket.socket | None = None
        self._accepter: asyncio.Task[None] | None = None
        self._tasks: dict[asyncio.Task[None], socket.socket] = {}  # per accepted socket

    @property
    def address(self) -> str:
        """``HOST:PORT`` it listens on."""
        return format_tcp_endpoint(self.host, self.port).removeprefix("tcp://")

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and accept (ConfigError if the address cannot be bound)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        server = socket.socket(family, kind, proto)
        try:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(address)
            server.listen(256)
        except OSError as error:
            server.close()
            raise ConfigError(f"cannot listen for relaying on {host}:{port}: {error}") from error
        server.setblocking(False)
        self._server = server
        self.host, self.port = server.getsockname()[:2]
        self._accepter = loop.create_task(self._accept_loop())

    async def close(self) -> None:
        """Stop accepting; drop every registration and pair."""
        if self._accepter is not None:
            self._accepter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepter
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in self._tasks.values():  # (a task cancelled before it ran closed nothing)
            sock.close()
        self._tasks.clear()
        for reg in list(self.registrations.values()):
            await reg.control.close()
        self.registrations.clear()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._server is not None
        while True:
            try:
                sock, _ = await loop.sock_accept(self._server)
            except OSError as error:  # out of descriptors: back off, keep serving
                log.warning("relay accept failed: %s", error)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._pending >= self.config.max_pending:
                self.refused += 1
                sock.close()
                continue
            self._track(loop.create_task(self._handle(sock)), sock)

    def _track(self, task: asyncio.Task[None], sock: socket.socket) -> None:
        self._tasks[task] = sock
        task.add_done_callback(lambda done: self._tasks.pop(done, None))

    async def _handle(self, sock: socket.socket) -> None:
        """One accepted socket: challenge, read its first request, then play its role."""
        kept = False  # ownership passed on (a registration's control, a spliced pair)
        self._pending += 1
        pending = True
        try:
            nonce = secrets.token_bytes(NONCE_BYTES)
            await send_frame(sock, m.RelayChallenge(0, nonce))
            request = await asyncio.wait_for(recv_frame(sock), self.config.handshake_timeout_s)
            self._pending -= 1
            pending = False
            if isinstance(request, m.RelayRegister):
                kept = await self._register(sock, request, nonce)
            elif isinstance(request, m.RelayConnect):
                kept = True
                await self._connect(sock, request)
            elif isinstance(request, m.RelayAccept):
                kept = await self._accept(sock, request)
            else:
                raise ProtocolError(f"a relay does not accept {type(request).__name__}")
        except asyncio.TimeoutError:
            self.refused += 1
        except LayerchainError as error:
            self.refused += 1
            log.info("relay refused a connection: %s", error)
            rid = error.rid if isinstance(error, ProtocolError) else 0
            with contextlib.suppress(LayerchainError):
                await send_frame(sock, m.ErrorReply.from_error(rid, error))
        finally:
            if pending:
                self._pending -= 1
            if not kept:
                sock.close()

    async def _register(self, sock: socket.socket, msg: m.RelayRegister, nonce: bytes) -> bool:
        if peer_id_from_public_key(msg.public_key) != msg.peer_id or not verify(
            msg.public_key, msg.signature, register_payload(nonce)
        ):
            raise ProtocolError(f"the registration does not prove peer id {msg.peer_id[:40]!r}",
                                rid=msg.rid)
        old = self.registrations.get(msg.peer_id)
        if old is None and len(self.registrations) >= self.config.max_registrations:
            raise PeerBusy(f"this relay holds {len(self.registrations)} registrations, its cap")
        await send_frame(sock, m.RelayOk(msg.rid))
        loop = asyncio.get_running_loop()
        _, control = await loop.connect_accepted_socket(
            lambda: TcpConnection(HANDSHAKE_LIMITS, f"relay-control:{msg.peer_id}"), sock
        )
        if old is not None:
            await old.control.close()
        reg = _Registration(msg.peer_id, control)
        self.registrations[msg.peer_id] = reg
        log.info("relay: %s registered", msg.peer_id)
        self._track(loop.create_task(self._keep(reg)), sock)
        return True

    async def _keep(self, reg: _Registration) -> None:
        """Answer the peer's keepalive pings; drop the registration when it goes quiet."""
        try:
            while True:
                msg = await asyncio.wait_for(reg.control.recv(), self.config.control_idle_s)
                if isinstance(msg, m.Ping):
                    await reg.control.send(m.Pong(msg.rid, msg.nonce))
        except (asyncio.TimeoutError, LayerchainError) as error:
            log.info("relay: %s unregistered (%s)", reg.peer_id, error or "idle")
        finally:
            if self.registrations.get(reg.peer_id) is reg:
                del self.registrations[reg.peer_id]
            await reg.control.close()

    async def _connect(self, sock: socket.socket, msg: m.RelayConnect) -> None:
        """A client's ask: have the peer dial in, splice, forward until either side ends."""
        try:
            reg = self.registrations.get(msg.peer_id)
            if reg is None:
                raise PeerUnreachable(f"peer {msg.peer_id[:40]!r} is not registered here")
            if self.pairs >= self.config.max_pairs:
                self._evict_quietest(msg.rid)
        except LayerchainError as error:
            self.refused += 1
            with contextlib.suppress(LayerchainError):
                await send_frame(sock, m.ErrorReply.from_error(msg.rid, error))
            sock.close()
            return
        self.pairs += 1
        token = secrets.token_bytes(TOKEN_BYTES)
        future: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (msg.peer_id, future)
        try:
            try:
                await reg.control.send(m.RelayDial(0, token))
                peer_sock = await asyncio.wait_for(future, self.config.dial_timeout_s)
            except (asyncio.TimeoutError, LayerchainError):
                self.refused += 1
                with contextlib.suppress(LayerchainError):
                    await send_frame(sock, m.ErrorReply.from_error(msg.rid, PeerUnreachable(
                        f"peer {msg.peer_id} did not dial back to the relay")))
                sock.close()
                return
            try:
                await send_frame(sock, m.RelayOk(msg.rid))
            except LayerchainError:
                sock.close()
                peer_sock.close()
                return
            self.spliced += 1
            await splice(sock, peer_sock, self.config, self._live)
        finally:
            self._waiting.pop(token, None)
            self.pairs -= 1

    def _evict_quietest(self, rid: int) -> None:
        """At the cap, the spliced pair whose last byte is oldest gives way to a newcomer,
        as the node's own listener does (idle pipes cannot lock honest clients out);
        PeerBusy if every slot is a client still waiting for its peer."""
        victim = min(self._live, key=lambda p: max(p[0].active_at, p[1].active_at),
                     default=None)
        if victim is None:
            raise PeerBusy(f"this relay forwards {self.pairs} connections, its cap")
        self.evicted += 1
        self._live.discard(victim)
        log.info("relay at its cap of %d pairs: closing the quietest", self.config.max_pairs)
        for pipe in victim:
            if pipe.transport is not None:
                pipe.transport.abort()

    async def _accept(self, sock: socket.socket, msg: m.RelayAccept) -> bool:
        """A peer's data connection for a waiting client: hand it over to the splice."""
        waiting = self._waiting.pop(msg.token, None)
        if waiting is None or waiting[1].done():
            raise ProtocolError("unknown or expired relay token", rid=msg.rid)
        await send_frame(sock, m.RelayOk(msg.rid))
        waiting[1].set_result(sock)
        return True


# ---------------------------------------------------------------------------- the served peer

ServeOver = Callable[[socket.socket], Awaitable[None]]  # serve one spliced data socket


class RelayRegistration:
    """A peer's standing registration with a relay (``RelayTransport.listen``): keeps the
    control connection (re-registering after a loss, with backoff) and, for each client the
    relay announces, opens a data connection and serves it with ``serve``."""

    def __init__(self, address: RelayAddress, identity: Identity, serve: ServeOver,
                 *, keepalive_s: float = 15.0, timeout_s: float = 5.0,
                 max_connections: int = DEFAULT_LIMITS.max_connections) -> None:
        if address.peer_id != identity.peer_id:
            raise ConfigError(f"relay endpoint {address} names another peer than this node "
                              f"({identity.peer_id})")
        self.address = address
        self.endpoint = str(address)
        self.registered = asyncio.Event()  # set while the relay holds our registration
        self._identity = identity
        self._serve = serve
        self._keepalive_s = keepalive_s  # ping the relay when the control is this quiet
        self._timeout_s = timeout_s  # connect and handshake timeout, seconds
        # relayed connections served at once: a relay asking for more is not obeyed (the
        # node's own listener caps its direct connections the same way)
        self._max_connections = max_connections
        self._runner: asyncio.Task[None] | None = None
        self._control: TcpConnection | None = None  # the live control connection
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Register once (PeerUnreachable / ProtocolError if that fails), then keep it."""
        control = await self._register()
        self._runner = asyncio.get_running_loop().create_task(self._run(control))

    async def _register(self) -> TcpConnection:
        sock = await open_socket(self.address.host, self.address.port, self._timeout_s)

        async def register() -> None:
            challenge = await recv_frame(sock)
            if not isinstance(challenge, m.RelayChallenge):
                raise ProtocolError(f"relay {self.address.relay} opened with "
                                    f"{type(challenge).__name__}, not a challenge")
            signature = self._identity.sign(register_payload(challenge.nonce))
            await send_frame(sock, m.RelayRegister(
                1, self._identity.peer_id, self._identity.public_key, signature))
            await _expect_ok(sock, f"registering with relay {self.address.relay}")

        try:
            await asyncio.wait_for(register(), self._timeout_s)
        except asyncio.TimeoutError:
            sock.close()
            raise PeerUnreachable(f"relay {self.address.relay} did not answer") from None
        except BaseException:
            sock.close()
            raise
        _, control = await asyncio.get_running_loop().create_connection(
            lambda: TcpConnection(HANDSHAKE_LIMITS, f"relay-control:{self.address.relay}"),
            sock=sock,
        )
        self._control = control
        self.registered.set()
        log.info("registered with relay %s: reachable at %s", self.address.relay, self.endpoint)
        return control

    async def _run(self, control: TcpConnection) -> None:
        backoff = 1.0
        while True:
            try:
                await self._control_loop(control)
            except LayerchainError as error:
                log.warning("lost relay %s: %s", self.address.relay, error)
            finally:
                self.registered.clear()
                await control.close()
            while True:
                await asyncio.sleep(backoff)
                try:
                    control = await self._register()
                    backoff = 1.0
                    break
                except LayerchainError as error:
                    backoff = min(30.0, backoff * 2)
                    log.warning("relay %s: %s (retrying in %.0f s)", self.address.relay, error,
                                backoff)

    async def _control_loop(self, control: TcpConnection) -> None:
        pings = 0
        while True:
            try:
                msg = await asyncio.wait_for(control.recv(), self._keepalive_s)
            except asyncio.TimeoutError:
                if pings:
                    raise PeerUnreachable("the relay answered no keepalive") from None
                pings += 1
                await control.send(m.Ping(0, pings))
                continue
            pings = 0
            if isinstance(msg, m.RelayDial):
                if len(self._tasks) >= self._max_connections:
                    log.warning("relay %s asks for more than %d connections: refused",
                                self.address.relay, self._max_connections)
                    continue
                self._spawn(self._data(msg.token))

    async def _data(self, token: bytes) -> None:
        try:
            sock = await open_socket(self.address.host, self.address.port, self._timeout_s)
        except PeerUnreachable as error:
            log.info("relay data connection failed: %s", error)
            return

        async def accept() -> None:
            await recv_frame(sock)  # the challenge (unused: the token proves the ask)
            await send_frame(sock, m.RelayAccept(1, token))
            await _expect_ok(sock, "relay data connection")

        try:
            await asyncio.wait_for(accept(), self._timeout_s)
        except (asyncio.TimeoutError, LayerchainError) as error:
            log.info("relay data connection refused: %s", error or "timeout")
            sock.close()
            return
        await self._serve(sock)  # owns the socket from here

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Drop the registration and every connection served through it."""
        tasks = [t for t in (self._runner, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._control is not None:  # (a runner cancelled before it ran closed nothing)
            await self._control.close()
        self.registered.clear()


# ---------------------------------------------------------------------------- the transport

# TLS over a spliced socket (``wire.tls``; a test may put a stand-in here):
# (socket, endpoint, peer id the other end must prove, limits) -> the connection
ClientOver = Callable[[socket.socket, str, str, Limits], Awaitable["Connection"]]
# (socket, this node's identity, handler of the connection, limits): serve it until it ends
ServerOver = Callable[[socket.socket, Identity, "Handler", Limits], Awaitable[None]]


class RelayTransport:
    """``Transport`` for ``relay://HOST:PORT/PEERID`` endpoints.

    ``connect``: a pipe through the relay, then TLS to PEERID inside it (the peer id the
    caller expects must be PEERID: PeerAuthFailed otherwise, or when the far end cannot
    prove it). ``listen`` (needs ``identity``, whose peer id the endpoint must name):
    registers with the relay and serves each client that comes through it with
    ``handler``; the returned ``RelayRegistration`` is the ``Listener``."""

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        *,
        identity: Identity | None = None,
        connect_timeout_s: float = 5.0,
        client_over: ClientOver | None = None,
        server_over: ServerOver | None = None,
    ) -> None:
        self.limits = limits  # of the connections inside the pipes
        self.identity = identity
        self.connect_timeout_s = connect_timeout_s  # per leg: relay, then the peer's dial-back
        self._client_over = client_over
        self._server_over = server_over

    async def connect(self, endpoint: str, *, peer_id: str | None = None) -> Connection:
        address = parse_relay_endpoint(endpoint)
        if peer_id is not None and peer_id != address.peer_id:
            raise PeerAuthFailed(f"{endpoint} reaches peer {address.peer_id}, not {peer_id}",
                                 peer_id=peer_id)
        over = self._client_over or tls_client_over
        sock = await relay_dial(address, self.connect_timeout_s)
        try:
            return await over(sock, endpoint, address.peer_id, self.limits)
        except BaseException:
            sock.close()
            raise

    async def listen(self, endpoint: str, handler: Handler) -> RelayRegistration:
        identity = self.identity
        if identity is None:
            raise ConfigError("serving through a relay needs the node's identity")
        over = self._server_over or tls_server_over
        limits = self.limits

        async def serve(sock: socket.socket) -> None:
            try:
                await over(sock, identity, handler, limits)
            except LayerchainError as error:  # a client failing its handshake: its problem
                log.info("relayed connection ended: %s", error)
            finally:
                sock.close()

        registration = RelayRegistration(
            parse_relay_endpoint(endpoint), identity, serve, timeout_s=self.connect_timeout_s,
            max_connections=limits.max_connections,
        )
        await registration.start()
        return registration


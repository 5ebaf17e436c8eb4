"""The I/O seam: ``Transport.connect(endpoint, peer_id=...) -> Connection`` and ``listen``.

A ``Connection`` carries whole ``Message`` objects both ways; what a frame looks like is the
codec's business, how bytes move is the implementation's. Endpoint schemes:

* ``tls://HOST:PORT``  TLS 1.3 over TCP, the listener proving its layerchain peer id with
  its Ed25519 identity key (``wire.tls``). The default for nodes.
* ``tcp://HOST:PORT``  plaintext TCP (``wire.tcp``): a node announces it only when started
  with ``--insecure``, and the ``Dialer`` dials it only when built with ``insecure=True``.
* ``mem://NAME``       in-process, for fast tests (``wire.memory``; same semantics).
* ``relay://RELAYHOST:PORT/PEERID``  reach PEERID through a relay, TLS end to end inside.

``Dialer`` is the one transport clients use: it dispatches on the scheme.

Contract of ``connect(endpoint, *, peer_id)``: ``peer_id`` is the layerchain peer id
(``discovery.identity``) the other end must prove. An authenticating transport (tls://)
raises ``PeerAuthFailed`` when it cannot; ``peer_id=None`` accepts anyone (probes of a bare
address). Unauthenticated transports ignore it. ``Connection.remote_peer_id`` is what the
other end proved (None for tcp://, for a mem:// listener without identity, and on the
accepting side, where clients stay anonymous: they are known by the vouchers they sign).

Contract of every Connection:
* ``send(msg)`` writes one whole frame; concurrent senders never interleave bytes. It raises
  ``ProtocolError`` (nothing written) if ``msg`` breaks the limits, ``PeerUnreachable`` once
  the connection is gone.
* ``recv()`` (one reader at a time) returns the next message, raises a ``ProtocolError`` for
  a bad frame (after which TCP may have lost frame sync: the next ``recv`` then raises
  ``PeerUnreachable``), and ``PeerUnreachable`` once the connection is gone.
* ``set_receiver(receiver)`` switches to push mode instead of ``recv`` (``Receiver``).
* ``pinned`` is set by the server while the peer holds sessions over the connection (a
  listener at its connection cap evicts such a connection last).
* ``close()`` is idempotent. ``peer`` is the remote endpoint string.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from layerchain.discovery.identity import Identity
from layerchain.errors import ConfigError, PeerUnreachable, ProtocolError
from layerchain.wire.codec import DEFAULT_LIMITS, Limits
from layerchain.wire.memory import MemoryConnection, MemoryListener, MemoryNetwork, MemoryTransport
from layerchain.wire.messages import Message
from layerchain.wire.tcp import TcpConnection, TcpListener, TcpTransport
from layerchain.wire.relay import RelayTransport
from layerchain.wire.tls import TlsTransport

__all__ = [
    "Connection",
    "Listener",
    "Transport",
    "Handler",
    "Incoming",
    "Receiver",
    "Dialer",
    "SCHEMES",
    "scheme_of",
    "TlsTransport",
    "TcpTransport",
    "TcpConnection",
    "TcpListener",
    "MemoryTransport",
    "MemoryConnection",
    "MemoryListener",
    "MemoryNetwork",
    "transport_for",
]

# What a connection in push mode hands its receiver, from the event loop: each incoming
# message, a ProtocolError for each bad frame, and finally one PeerUnreachable (the end).
Incoming = Message | ProtocolError | PeerUnreachable
Receiver = Callable[[Incoming], None]


@runtime_checkable
class Connection(Protocol):
    """A bidirectional stream of messages with one peer."""

    peer: str  # the remote endpoint
    remote_peer_id: str | None  # the layerchain peer id the other end proved, if any
    pinned: bool  # set by the server while the peer holds sessions over this connection

    @property
    def closed(self) -> bool: ...

    async def send(self, msg: Message) -> None: ...

    async def recv(self) -> Message: ...

    def set_receiver(self, receiver: Receiver) -> None: ...

    async def close(self) -> None: ...


Handler = Callable[[Connection], Awaitable[None]]  # called with each accepted Connection


@runtime_checkable
class Listener(Protocol):
    """A bound endpoint accepting connections."""

    endpoint: str  # the real bound address, e.g. tls://127.0.0.1:41234

    async def close(self) -> None: ...


class Transport(Protocol):
    """Connects to and listens on endpoints."""

    async def connect(self, endpoint: str, *, peer_id: str | None = None) -> Connection: ...

    async def listen(self, endpoint: str, handler: Handler) -> Listener: ...


SCHEMES = ("tls", "tcp", "mem", "relay")  # every endpoint scheme layerchain knows
PLAINTEXT_HINT = "pass --insecure to use plaintext tcp:// on a network you trust"


def scheme_of(endpoint: str) -> str:
    """``"tls"`` for ``tls://...``; ConfigError for an endpoint without a known scheme."""
    scheme, sep, _ = endpoint.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ConfigError(
            f"unknown endpoint scheme in {endpoint!r}",
            hint="use tls://HOST:PORT, tcp://HOST:PORT (with --insecure),"
            " relay://HOST:PORT/PEER or mem://NAME",
        )
    return scheme


class Dialer:
    """The one ``Transport`` clients and nodes use: each endpoint by its scheme.

    ``identity``: the key a tls:// listener proves (a node's; a pure client needs none).
    ``insecure``: allow plaintext tcp:// (dialling and listening); without it a tcp://
    endpoint is refused with a ``ConfigError`` naming ``--insecure``, so nothing is ever
    sent in the clear by accident. mem:// goes to ``memory`` (default: the default hub).
    """

    def __init__(
        self,
        identity: Identity | None = None,
        insecure: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        *,
        connect_timeout_s: float = 5.0,
        memory: MemoryNetwork | None = None,
    ) -> None:
        self.identity = identity
        self.insecure = insecure  # plaintext tcp:// allowed (a trusted network)
        self.limits = limits
        self.tls = TlsTransport(identity, limits, connect_timeout_s=connect_timeout_s)
        self.tcp = TcpTransport(limits, connect_timeout_s=connect_timeout_s)
        self.relay = RelayTransport(limits, identity=identity, connect_timeout_s=connect_timeout_s)
        self.memory = MemoryTransport(
            memory, limits=limits, peer_id=identity.peer_id if identity else None
        )

    def _transport(self, endpoint: str, doing: str) -> Transport:
        scheme = scheme_of(endpoint)
        if scheme == "tls":
            return self.tls
        if scheme == "tcp":
            if not self.insecure:
                raise ConfigError(
                    f"refusing to {doing} {endpoint}: plaintext, unauthenticated",
                    hint=PLAINTEXT_HINT,
                )
            return self.tcp
        if scheme == "mem":
            return self.memory
        return self.relay  # relay://: TLS end to end through a relay (wire.relay)

    async def connect(self, endpoint: str, *, peer_id: str | None = None) -> Connection:
        """Dial ``endpoint`` (see ``Transport.connect``; PeerAuthFailed over tls://)."""
        return await self._transport(endpoint, "dial").connect(endpoint, peer_id=peer_id)

    async def listen(self, endpoint: str, handler: Handler) -> Listener:
        """Listen on ``endpoint`` (tls:// needs ``identity``, tcp:// needs ``insecure``)."""
        return await self._transport(endpoint, "listen on").listen(endpoint, handler)


def transport_for(endpoint: str, *, limits: Limits = DEFAULT_LIMITS) -> Transport:
    """A transport for ``endpoint``'s scheme alone: tls:// (dialling only: no identity to
    listen with), tcp:// (plaintext, whatever ``insecure`` says: callers that dial peers
    use a ``Dialer``) or mem:// (memory on the default hub)."""
    if endpoint.startswith("tls://"):
        return TlsTransport(limits=limits)
    if endpoint.startswith("tcp://"):
        return TcpTransport(limits)
    if endpoint.startswith("mem://"):
        return MemoryTransport(limits=limits)
    raise ConfigError(
        f"unknown endpoint scheme in {endpoint!r}",
        hint="use tls://HOST:PORT, tcp://HOST:PORT or mem://NAME",
    )

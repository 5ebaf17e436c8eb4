"""The I/O seam: ``Transport.connect(endpoint) -> Connection`` and ``listen(endpoint, handler)``.

A ``Connection`` carries whole ``Message`` objects both ways; what a frame looks like is the
codec's business, how bytes move is the implementation's. Implementations:

* ``TcpTransport``     ``tcp://HOST:PORT`` (port 0 to listen on a free port), direct sockets;
* ``MemoryTransport``  ``mem://NAME``, in-process, for fast tests (same semantics).

Contract of every Connection:
* ``send(msg)`` writes one whole frame; concurrent senders never interleave bytes. It raises
  ``ProtocolError`` (nothing written) if ``msg`` breaks the limits, ``PeerUnreachable`` once
  the connection is gone.
* ``recv()`` (one reader at a time) returns the next message, raises a ``ProtocolError`` for
  a bad frame (after which TCP may have lost frame sync: the next ``recv`` then raises
  ``PeerUnreachable``), and ``PeerUnreachable`` once the connection is gone.
* ``close()`` is idempotent. ``peer`` is the remote endpoint string.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from layerchain.errors import ConfigError
from layerchain.wire.codec import DEFAULT_LIMITS, Limits
from layerchain.wire.memory import MemoryConnection, MemoryNetwork, MemoryListener, MemoryTransport
from layerchain.wire.messages import Message
from layerchain.wire.tcp import TcpConnection, TcpListener, TcpTransport

__all__ = [
    "Connection",
    "Listener",
    "Transport",
    "Handler",
    "TcpTransport",
    "TcpConnection",
    "TcpListener",
    "MemoryTransport",
    "MemoryConnection",
    "MemoryListener",
    "MemoryNetwork",
    "transport_for",
]


@runtime_checkable
class Connection(Protocol):
    """A bidirectional stream of messages with one peer."""

    peer: str  # the remote endpoint

    @property
    def closed(self) -> bool: ...

    async def send(self, msg: Message) -> None: ...

    async def recv(self) -> Message: ...

    async def close(self) -> None: ...


Handler = Callable[[Any], Awaitable[None]]  # called with each accepted Connection


@runtime_checkable
class Listener(Protocol):
    """A bound endpoint accepting connections."""

    endpoint: str  # the real bound address, e.g. tcp://127.0.0.1:41234

    async def close(self) -> None: ...


class Transport(Protocol):
    """Connects to and listens on endpoints of one scheme."""

    async def connect(self, endpoint: str) -> Any: ...

    async def listen(self, endpoint: str, handler: Handler) -> Any: ...


def transport_for(endpoint: str, *, limits: Limits = DEFAULT_LIMITS, **options: Any) -> Transport:
    """A transport for ``endpoint``'s scheme: tcp:// or mem:// (memory on the default hub)."""
    if endpoint.startswith("tcp://"):
        return TcpTransport(limits, **options)
    if endpoint.startswith("mem://"):
        return MemoryTransport(limits=limits, **options)
    raise ConfigError(
        f"unknown endpoint scheme in {endpoint!r}", hint="use tcp://HOST:PORT or mem://NAME"
    )

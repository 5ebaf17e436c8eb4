"""The wire protocol: messages, frames, transports and request/reply, imported by both sides.

``messages`` (typed, versioned records) -> ``codec`` (frames, ``Limits``) -> ``tls`` /
``tcp`` / ``memory`` (transports behind the ``transport`` seam; ``Dialer`` picks one by
endpoint scheme) -> ``rpc`` (``RpcClient``, ``serve_connection``). Client and node both import this package and never each other.
"""

from layerchain.wire.codec import DEFAULT_LIMITS, Limits, decode, encode, encode_bytes
from layerchain.wire.messages import (
    ERROR_CODES,
    MAX_STEP_TOKENS,
    PROTOCOL_VERSION,
    CloseSession,
    ErrorReply,
    Info,
    InfoReply,
    Message,
    OpenSession,
    Ping,
    Pong,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
)
from layerchain.wire.rpc import RpcClient, ServeStats, peer_error, serve_connection
from layerchain.wire.transport import (
    Connection,
    Dialer,
    Listener,
    MemoryNetwork,
    MemoryTransport,
    TcpTransport,
    TlsTransport,
    Transport,
    transport_for,
)

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_STEP_TOKENS",
    "ERROR_CODES",
    "DEFAULT_LIMITS",
    "Limits",
    "encode",
    "encode_bytes",
    "decode",
    "Message",
    "OpenSession",
    "SessionOpened",
    "Step",
    "StepResult",
    "CloseSession",
    "SessionClosed",
    "Info",
    "InfoReply",
    "Ping",
    "Pong",
    "ErrorReply",
    "RpcClient",
    "ServeStats",
    "serve_connection",
    "peer_error",
    "Connection",
    "Dialer",
    "Listener",
    "Transport",
    "TcpTransport",
    "TlsTransport",
    "MemoryTransport",
    "MemoryNetwork",
    "transport_for",
]

"""The messages of the layerchain wire protocol, version ``PROTOCOL_VERSION``.

Every message is a frozen dataclass with ``rid`` (request id) first: a request carries the
rid its sender chose and the reply echoes it, so many calls can share one connection.
Requests and their replies::

    OpenSession  -> SessionOpened     open an inference session on blocks [start, end)
    Step         -> StepResult        one forward call of a session over its hidden states
    CloseSession -> SessionClosed     free the session's KV cache
    Info         -> InfoReply         what the peer serves, at what speed and price
    Ping         -> Pong              liveness and round-trip time
    DialBack     -> DialBackResult    dial me back (reachability; the dial is a DialBackProbe)
    RelayQuery   -> RelayOffer        do you relay, on which port (``wire.relay``)
    ManifestQuery -> ManifestReply    a model's manifest, and which of its files the peer seeds
    PieceQuery   -> PieceReply        bytes [offset, offset + length) of one file of a model
    TrainForward -> TrainForwardResult    a hop's forward over whole sequences (training)
    TrainBackward -> TrainBackwardResult  its inputs' gradient, given its outputs'
    PushStep     -> StepResult        a step whose input a Forward brings (push mode)
    Forward      -> Forwarded         a hop's output, sent on to the next hop (push mode)
    (any)        -> ErrorReply        ``code`` is one of ``ERROR_CODES``

This module knows nothing of bytes: ``codec`` turns these records into frames. The field
order of each class *is* its wire layout (positional), and ``TYPE_ID`` its tag on the wire:
changing either, or adding a field, means bumping ``PROTOCOL_VERSION``. One exception, kept
in version 1: ``OpenSession.price_per_block`` was appended as a trailing field (issue 17);
the codec checks every message's exact arity, so an older peer's OpenSession is refused as
a ``frame_error``: clients and nodes upgrade together.

``hidden`` tensors are ``[B, T, H]`` (batch, new tokens, hidden size) in float32, float16
or bfloat16. ``voucher`` and ``receipt`` are opaque bytes here; ``market`` defines them.
Tensor-carrying messages compare by identity (``eq=False``): tensors have no truth value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Union

import torch

from layerchain.errors import LayerchainError, PaymentError

PROTOCOL_VERSION = 1

# Tokens (B x T) one Step may carry. A node refuses a longer step with ``limit_exceeded``;
# a client splits a longer prompt into several steps, so a long prefill never holds a node
# (and its pings and other sessions) for more than one bounded step at a time.
MAX_STEP_TOKENS = 512


# The codes a node may answer in an ErrorReply, each an ``errors.py`` class ``code``, with
# what it tells the client. A server maps any other error it raises to one of these
# (``rpc.error_reply``); a client treats any other code from a peer as that peer misbehaving.
ERROR_CODES: dict[str, str] = {
    "busy": "no room now (sessions, cache, shutting down): try another peer or later",
    "unknown_session": "the peer holds no such session (it restarted or expired it)",
    "offer_changed": "the peer's price or span moved since the record planned with: re-read it",
    "limit_exceeded": "the request breaks a limit of the protocol or of this peer",
    "invalid_voucher": "the voucher is missing, malformed or does not pay for the work",
    "channel_error": "the voucher's payment channel is unknown, closed or disputed",
    "protocol_error": "the frame breaks the wire protocol",
    "frame_error": "the frame is malformed, truncated or inconsistent",
    "version_mismatch": "the frame speaks another protocol version",
    "remote_error": "the peer failed internally (a bug or a fault on its side)",
}


def _short_repr(msg: object) -> str:
    """repr with tensors shown as shape and dtype, not values."""
    parts = []
    for name in msg.__dataclass_fields__:  # type: ignore[attr-defined]
        value = getattr(msg, name)
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}=<{str(value.dtype).removeprefix('torch.')} {list(value.shape)}>")
        else:
            parts.append(f"{name}={value!r}")
    return f"{type(msg).__name__}({', '.join(parts)})"


@dataclass(frozen=True)
class OpenSession:
    """Ask a peer to hold a KV cache for blocks ``[start, end)`` of ``model_id``, paying
    ``price_per_block``: the price in the peer's record the client planned with (-1: not
    said, the peer's current price). A peer charges it if it is its current price or one it
    left less than two record TTLs ago (an adaptive node re-prices; clients' records lag),
    else answers ``offer_changed``; its receipts then carry that price for the session.
    ``wire`` names the form the session's hidden states travel in, both ways
    (``wire.compress.WIRE_FORMS``; another is ``limit_exceeded``).
    (Trailing fields appended in protocol 1: client and node upgrade together.)"""

    TYPE_ID: ClassVar[int] = 1
    rid: int
    session_id: str
    model_id: str
    start: int
    end: int
    max_length: int  # tokens the session may reach (prompt + generated)
    voucher: bytes = b""
    price_per_block: int = -1  # credits per block per token agreed; -1: the peer's current
    wire: str = ""  # "" (float32 as sent, the exactness reference) | "fp16" | "bf16" | "int8"


@dataclass(frozen=True)
class SessionOpened:
    """The session is admitted; ``free_cache_tokens`` left on the peer afterwards."""

    TYPE_ID: ClassVar[int] = 2
    rid: int
    session_id: str
    free_cache_tokens: int


@dataclass(frozen=True, eq=False)
class Step:
    """Run the session's blocks over ``hidden`` [B, T, H]; ``step`` counts from 0."""

    TYPE_ID: ClassVar[int] = 3
    rid: int
    session_id: str
    step: int
    hidden: torch.Tensor  # [B, T, H] float32 | float16 | bfloat16
    voucher: bytes = b""

    __repr__ = _short_repr


@dataclass(frozen=True, eq=False)
class StepResult:
    """The blocks' output [B, T, H] for ``step``, with the peer's signed receipt. (The
    trailing ``compute_ms`` was appended in protocol 1: client and node upgrade together.)"""

    TYPE_ID: ClassVar[int] = 4
    rid: int
    session_id: str
    step: int
    hidden: torch.Tensor  # [B, T, H], same shape and dtype as the Step's input
    receipt: bytes = b""
    compute_ms: float = 0.0  # the peer's own time on this step (waiting for the span, the
    # blocks, the reply's cast), ms: a client tells protocol cost from compute with it
    # (``bench --json``); informative only, never trusted for routing or payment

    __repr__ = _short_repr


@dataclass(frozen=True)
class CloseSession:
    """Free the session's cache."""

    TYPE_ID: ClassVar[int] = 5
    rid: int
    session_id: str


@dataclass(frozen=True)
class SessionClosed:
    """The session is gone."""

    TYPE_ID: ClassVar[int] = 6
    rid: int
    session_id: str


@dataclass(frozen=True)
class Info:
    """Ask a peer what it serves."""

    TYPE_ID: ClassVar[int] = 7
    rid: int


@dataclass(frozen=True)
class InfoReply:
    """What a peer serves, how fast, at what price."""

    TYPE_ID: ClassVar[int] = 8
    rid: int
    peer_id: str
    model_id: str
    start: int
    end: int
    ms_per_block: float  # measured compute, milliseconds per block per token
    price_per_block: int  # credits per block per token
    free_cache_tokens: int
    wallet: str  # payment address, "" if none
    version: str  # layerchain version string of the peer
    rtts: dict[str, float] = field(default_factory=dict)  # peer_id -> round trip, seconds


@dataclass(frozen=True)
class Ping:
    """Liveness probe; the peer echoes ``nonce``."""

    TYPE_ID: ClassVar[int] = 9
    rid: int
    nonce: int


@dataclass(frozen=True)
class Pong:
    """Answer to Ping with the same ``nonce``."""

    TYPE_ID: ClassVar[int] = 10
    rid: int
    nonce: int


@dataclass(frozen=True)
class ErrorReply:
    """The request ``rid`` failed; ``code`` names an ``errors.py`` class (rid 0: no request)."""

    TYPE_ID: ClassVar[int] = 11
    rid: int
    code: str
    message: str

    @classmethod
    def from_error(cls, rid: int, error: LayerchainError) -> ErrorReply:
        """The reply for ``error``, its code one of ``ERROR_CODES`` (a payment error outside
        them is ``invalid_voucher``, anything else ``remote_error``); the message is cut to
        500 characters."""
        code, message = error.code, str(error)
        if code not in ERROR_CODES:
            message = f"{code}: {message}"
            code = "invalid_voucher" if isinstance(error, PaymentError) else "remote_error"
        return cls(rid, code, message[:500])


# ---- reachability and relaying (``node.reachability``, ``wire.relay``); type ids 20-30.
# DialBack and RelayQuery go to a node's inference endpoint; the Relay* messages are the
# handshake on a relay's own port, before its sockets turn into byte pipes.


@dataclass(frozen=True)
class DialBack:
    """Ask a peer to dial ``endpoint`` (proving ``peer_id``) and send it ``DialBackProbe``
    with ``nonce``: the asking node learns it is reachable when the probe arrives."""

    TYPE_ID: ClassVar[int] = 20
    rid: int
    endpoint: str  # the asker's announced endpoint
    peer_id: str  # the asker's peer id (an authenticating transport checks it)
    nonce: int  # echoed in the probe: the asker recognises its own dial-back


@dataclass(frozen=True)
class DialBackResult:
    """The dial-back was tried; ``error`` is "" if the probe was answered, else why not."""

    TYPE_ID: ClassVar[int] = 21
    rid: int
    error: str


@dataclass(frozen=True)
class DialBackProbe:
    """Sent by a dialling-back peer; answered with ``Pong`` (same nonce)."""

    TYPE_ID: ClassVar[int] = 22
    rid: int
    nonce: int


@dataclass(frozen=True)
class RelayQuery:
    """Ask a node whether it relays."""

    TYPE_ID: ClassVar[int] = 23
    rid: int


@dataclass(frozen=True)
class RelayOffer:
    """The TCP port of the node's relay service (on the host it was reached at); 0: none."""

    TYPE_ID: ClassVar[int] = 24
    rid: int
    port: int


@dataclass(frozen=True)
class RelayChallenge:
    """A relay's first frame on every accepted socket: a fresh nonce to sign."""

    TYPE_ID: ClassVar[int] = 25
    rid: int
    nonce: bytes  # 32 random bytes


@dataclass(frozen=True)
class RelayRegister:
    """A peer registers its control connection: ``signature`` = its Ed25519 signature of
    ``wire.relay.register_payload(nonce)``, ``peer_id`` derived from ``public_key``."""

    TYPE_ID: ClassVar[int] = 26
    rid: int
    peer_id: str
    public_key: bytes  # raw 32-byte Ed25519 key
    signature: bytes  # 64 bytes


@dataclass(frozen=True)
class RelayConnect:
    """A client asks the relay for a pipe to ``peer_id``."""

    TYPE_ID: ClassVar[int] = 27
    rid: int
    peer_id: str


@dataclass(frozen=True)
class RelayAccept:
    """A registered peer's data connection for the client the relay announced with ``token``."""

    TYPE_ID: ClassVar[int] = 28
    rid: int
    token: bytes  # 16 random bytes, used once


@dataclass(frozen=True)
class RelayDial:
    """Relay -> registered peer, on its control connection: open a data connection with
    ``token`` (a client is waiting)."""

    TYPE_ID: ClassVar[int] = 29
    rid: int
    token: bytes


@dataclass(frozen=True)
class RelayOk:
    """The relay accepted a registration, a connect or an accept; for the last two, every
    byte after this frame belongs to the spliced pipe."""

    TYPE_ID: ClassVar[int] = 30
    rid: int


# ---- training (``node.training``, ``train.remote``); type ids 40-49. A hop's forward and
# backward over whole sequences, without a KV cache: the node recomputes what the backward
# needs from the inputs the request carries (stateless, so a failed hop is simply redone on
# another peer). Both run in an inference session opened with OpenSession (its max_length
# bounds the tokens of one request), share its step numbers and its receipt chain, and are
# paid by the same vouchers: a forward as its tokens, a backward as ``BACKWARD_TOKEN_FACTOR``
# times its tokens (recomputing the forward, then the backward through it). Receipts name
# the tensors as [1, B x T, H] (reshaped), the shape of a step's.

MAX_TRAIN_TOKENS = MAX_STEP_TOKENS // 2  # B x T of one training request: a Backward carries
# two such tensors, so its frame fits in the one a node sizes for a Step
BACKWARD_TOKEN_FACTOR = 2  # a Backward is billed, and receipted, as this many tokens a position


@dataclass(frozen=True, eq=False)
class TrainForward:
    """Run the session's blocks over ``hidden`` [B, T, H] at positions 0..T-1 (no cache);
    the receipt's input is ``hidden``."""

    TYPE_ID: ClassVar[int] = 40
    rid: int
    session_id: str
    step: int
    hidden: torch.Tensor  # [B, T, H] float32 | float16 | bfloat16, B x T <= MAX_TRAIN_TOKENS
    voucher: bytes = b""

    __repr__ = _short_repr


@dataclass(frozen=True, eq=False)
class TrainForwardResult:
    """The blocks' output [B, T, H] for ``step`` and its signed receipt."""

    TYPE_ID: ClassVar[int] = 41
    rid: int
    session_id: str
    step: int
    hidden: torch.Tensor  # [B, T, H], the request's shape and dtype
    receipt: bytes = b""

    __repr__ = _short_repr


@dataclass(frozen=True, eq=False)
class TrainBackward:
    """The gradient of the loss with respect to ``hidden`` (the hop's inputs), given
    ``grad`` (its outputs' gradient, same shape); the receipt's input is
    ``torch.cat([hidden, grad])`` [2B, T, H], its tokens ``BACKWARD_TOKEN_FACTOR`` x B x T."""

    TYPE_ID: ClassVar[int] = 42
    rid: int
    session_id: str
    step: int
    hidden: torch.Tensor  # [B, T, H], the inputs of the forward being differentiated
    grad: torch.Tensor  # [B, T, H], d loss / d output
    voucher: bytes = b""

    __repr__ = _short_repr


@dataclass(frozen=True, eq=False)
class TrainBackwardResult:
    """d loss / d ``hidden`` [B, T, H] for ``step`` and its signed receipt."""

    TYPE_ID: ClassVar[int] = 43
    rid: int
    session_id: str
    step: int
    grad: torch.Tensor  # [B, T, H], the request's shape and dtype
    receipt: bytes = b""

    __repr__ = _short_repr


# ---- files of models, fetched from peers (``node.seeding`` serves them, ``fetch`` fetches
# them); type ids 50-59. A model's files are those its manifest lists (``model.manifest``):
# the fetcher checks the manifest against the model id and each file against its sha256, so
# nothing here is trusted; these messages only move bytes.

MAX_PIECE_BYTES = 512 * 1024  # bytes one PieceQuery may ask for: a piece travels in the frame
# header (bytes fields are msgpack), which a node bounds at ``Limits.max_header_bytes`` (1 MiB)
MAX_MANIFEST_BYTES = 768 * 1024  # bytes of a manifest's JSON a ManifestReply may carry


@dataclass(frozen=True)
class ManifestQuery:
    """Ask a peer for the manifest of ``model_id`` (a manifest hash: the fp32 form's id)."""

    TYPE_ID: ClassVar[int] = 50
    rid: int
    model_id: str


@dataclass(frozen=True)
class ManifestReply:
    """The manifest's JSON, and which files the peer seeds: the block files of ``[start,
    end)`` (``start == end``: none), and the head and tokenizer files if ``client_files``."""

    TYPE_ID: ClassVar[int] = 51
    rid: int
    model_id: str
    manifest: bytes  # UTF-8 JSON; its hash must be model_id (``shards.manifest_id``)
    start: int
    end: int
    client_files: int  # 1: the head and the tokenizer files are seeded too; 0: not


@dataclass(frozen=True)
class PieceQuery:
    """Ask for bytes ``[offset, offset + length)`` of the file ``file`` of ``model_id``;
    ``length`` <= ``MAX_PIECE_BYTES``."""

    TYPE_ID: ClassVar[int] = 52
    rid: int
    model_id: str
    file: str  # a file name the manifest lists: "block_007.safetensors", "head.safetensors"
    offset: int
    length: int


@dataclass(frozen=True)
class PieceReply:
    """The bytes asked for (fewer only at the file's end); ``size`` is the whole file's."""

    TYPE_ID: ClassVar[int] = 53
    rid: int
    model_id: str
    file: str
    offset: int
    size: int  # bytes of the whole file
    data: bytes


# ---- push mode (``node.push``, ``client.push``); type ids 60-69. Each hop forwards its
# output straight to the next hop of the route; the client asks every hop for its result.


@dataclass(frozen=True)
class PushStep:
    """Run step ``step`` of session ``session_id`` on the input a ``Forward`` brings, one
    whose ``secret`` hashes (sha256) to ``expect``; then forward the output to
    ``next_endpoint`` (a node proving ``next_peer_id``) as ``Forward(next_session_id,
    step + k, out, next_secret)`` ("": the last hop, nothing forwarded). Answered with the
    step's ``StepResult`` (output and receipt, as a Step). Sent by the session's client on
    its own connection; ``voucher`` pays for the step as a Step's does. ``next_step`` is the
    step number of the next hop's session (hops' sessions count their steps apart)."""

    TYPE_ID: ClassVar[int] = 60
    rid: int
    session_id: str
    step: int
    voucher: bytes
    expect: bytes  # sha256 of the secret the forwarded input must carry (32 bytes)
    next_endpoint: str  # where to forward the output; "": nowhere (the last hop)
    next_peer_id: str  # the peer id the next hop must prove
    next_session_id: str
    next_step: int
    next_secret: bytes  # the next hop's secret for this step (<= 64 bytes)


@dataclass(frozen=True, eq=False)
class Forward:
    """The input [1, T, H] of step ``step`` of session ``session_id``, brought by the
    previous hop (or the client, to the first hop) with the secret its client gave it."""

    TYPE_ID: ClassVar[int] = 61
    rid: int
    session_id: str
    step: int
    hidden: torch.Tensor  # [1, T, H]
    secret: bytes

    __repr__ = _short_repr


@dataclass(frozen=True)
class Forwarded:
    """The forwarded input was taken (held for its ``PushStep``; not computed yet)."""

    TYPE_ID: ClassVar[int] = 62
    rid: int
    session_id: str
    step: int


Message = Union[
    OpenSession,
    SessionOpened,
    Step,
    StepResult,
    CloseSession,
    SessionClosed,
    Info,
    InfoReply,
    Ping,
    Pong,
    ErrorReply,
    DialBack,
    DialBackResult,
    DialBackProbe,
    RelayQuery,
    RelayOffer,
    RelayChallenge,
    RelayRegister,
    RelayConnect,
    RelayAccept,
    RelayDial,
    RelayOk,
    ManifestQuery,
    ManifestReply,
    PieceQuery,
    PieceReply,
    TrainForward,
    TrainForwardResult,
    TrainBackward,
    TrainBackwardResult,
    PushStep,
    Forward,
    Forwarded,
]

MESSAGE_TYPES: dict[int, type] = {
    cls.TYPE_ID: cls
    for cls in (
        OpenSession,
        SessionOpened,
        Step,
        StepResult,
        CloseSession,
        SessionClosed,
        Info,
        InfoReply,
        Ping,
        Pong,
        ErrorReply,
        DialBack,
        DialBackResult,
        DialBackProbe,
        RelayQuery,
        RelayOffer,
        RelayChallenge,
        RelayRegister,
        RelayConnect,
        RelayAccept,
        RelayDial,
        RelayOk,
        ManifestQuery,
        ManifestReply,
        PieceQuery,
        PieceReply,
        TrainForward,
        TrainForwardResult,
        TrainBackward,
        TrainBackwardResult,
        PushStep,
        Forward,
        Forwarded,
    )
}

# Which reply answers which request (ErrorReply answers any of them).
REPLY_TYPES: dict[type, type] = {
    OpenSession: SessionOpened,
    Step: StepResult,
    CloseSession: SessionClosed,
    Info: InfoReply,
    Ping: Pong,
    DialBack: DialBackResult,
    DialBackProbe: Pong,
    RelayQuery: RelayOffer,
    ManifestQuery: ManifestReply,
    PieceQuery: PieceReply,
    TrainForward: TrainForwardResult,
    TrainBackward: TrainBackwardResult,
    PushStep: StepResult,
    Forward: Forwarded,
}

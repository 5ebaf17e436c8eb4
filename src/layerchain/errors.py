"""The one exception tree of layerchain.

Every error layerchain raises on purpose is a ``LayerchainError``. The CLI and the gateway
catch it and show ``str(error)``: one line saying what went wrong and what to do. Anything
else escaping is a bug.

::

    LayerchainError                      base; ``code`` names it on the wire and in JSON
    ├── UserError                        caused by what the user asked for; shown as one line
    │   ├── ConfigError                  a bad flag, option or file
    │   ├── ModelError
    │   │   ├── UnknownModel             a model reference that resolves to nothing
    │   │   ├── UnsupportedArchitecture  a model family we cannot run
    │   │   ├── SpanError                a block span out of range or empty
    │   │   └── ModelFileError           a missing, unreadable or corrupt weight file
    │   │       └── ShardHashMismatch    a shard file whose sha256 is not the manifest's
    │   ├── RoutingError
    │   │   └── NoRoute                  no chain of peers covers the blocks within the limits
    │   ├── PaymentError
    │   │   ├── InsufficientFunds        a wallet or key balance too small for the request
    │   │   ├── InvalidReceipt           a receipt whose signature, hashes or chain is wrong
    │   │   ├── InvalidVoucher           a voucher with a bad signature, nonce or amount
    │   │   ├── ChannelError             a channel that is unknown, closed or disputed
    │   │   └── InvalidEvidence          evidence of cheating that is malformed or not
    │   │       │                        signed by its accuser (nothing is charged)
    │   │       └── FalseAccusation      evidence that does not prove the accused cheated
    │   │                                (the accuser's bond was taken)
    │   ├── LedgerError                  a ledger that is unreachable or inconsistent
    │   ├── InvalidApiKey                a gateway API key that is missing, unknown or revoked
    │   ├── RequestTooLarge              a prompt + max_new_tokens beyond the model's context
    │   │                                or every peer's free cache (checked before sending)
    │   └── CostLimitExceeded            a request whose prompt alone costs more than its max_cost
    ├── InvalidPlan                      a planned route that breaks the route rules (a bug)
    ├── ProtocolError                    a frame or message that breaks the wire protocol
    │   ├── FrameError                   malformed, truncated or oversized frame
    │   ├── VersionMismatch              a peer speaking another protocol version
    │   └── LimitExceeded                shape, dtype, session or size limit exceeded
    └── PeerError                        a peer failed us; the client routes around it
        ├── PeerUnreachable              connect failed or the connection dropped
        │   └── PeerAuthFailed           the other end of a TLS link cannot prove the peer
        │                                id we dialled (a wrong node or a man in the middle)
        ├── PeerTimeout                  no answer within the step timeout
        ├── InvalidOutput                wrong shape, dtype or non-finite values returned
        └── RemoteError                  the peer answered with an error reply
            ├── PeerBusy                 the peer has no cache room for the session
            ├── UnknownSession           the peer does not know the session (it restarted)
            └── OfferChanged             the peer's price or span moved since the record the
                                         client planned with (re-read it, plan again; no ban)

``error_from_code(code, message)`` turns an error reply from the wire back into the class,
so a client sees ``PeerBusy`` for a node's "busy" answer.
"""

from __future__ import annotations


class LayerchainError(Exception):
    """Base of every error layerchain raises on purpose."""

    code = "error"

    def __init__(self, message: str = "", *, hint: str | None = None) -> None:
        self.message = message or self.__class__.__doc__ or self.code
        self.hint = hint
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UserError(LayerchainError):
    """Caused by what the user asked for.

    ``param``: the request field at fault, when the request came as fields (the gateway's
    JSON body; OpenAI's ``param``), else None.
    """

    code = "user_error"

    def __init__(
        self, message: str = "", *, hint: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.param = param


class ConfigError(UserError):
    """A bad flag, option or configuration file."""

    code = "config_error"


class ModelError(UserError):
    """A model that cannot be loaded or run."""

    code = "model_error"


class UnknownModel(ModelError):
    """A model reference that resolves to nothing."""

    code = "unknown_model"


class UnsupportedArchitecture(ModelError):
    """A model family layerchain cannot run."""

    code = "unsupported_architecture"


class SpanError(ModelError):
    """A block span out of range or empty."""

    code = "span_error"


class ModelFileError(ModelError):
    """A missing, unreadable or corrupt weight file."""

    code = "model_file_error"


class ShardHashMismatch(ModelFileError):
    """A shard file whose sha256 differs from the manifest."""

    code = "shard_hash_mismatch"


class RoutingError(UserError):
    """No usable route."""

    code = "routing_error"


class NoRoute(RoutingError):
    """No chain of peers covers the blocks within the limits."""

    code = "no_route"


class PaymentError(UserError):
    """A payment that cannot be made or accepted."""

    code = "payment_error"


class InsufficientFunds(PaymentError):
    """A balance too small for the request."""

    code = "insufficient_funds"


class InvalidReceipt(PaymentError):
    """A receipt whose signature, hashes or chain is wrong."""

    code = "invalid_receipt"


class InvalidVoucher(PaymentError):
    """A voucher with a bad signature, nonce or amount."""

    code = "invalid_voucher"


class ChannelError(PaymentError):
    """A payment channel that is unknown, closed or disputed."""

    code = "channel_error"


class InvalidEvidence(PaymentError):
    """Evidence of cheating that is malformed or not signed by its accuser."""

    code = "invalid_evidence"


class FalseAccusation(InvalidEvidence):
    """Evidence that does not prove the accused cheated; the accuser's bond was taken."""

    code = "false_accusation"


class LedgerError(UserError):
    """A ledger that is unreachable or inconsistent."""

    code = "ledger_error"


class InvalidApiKey(UserError):
    """A gateway API key that is missing, unknown or revoked."""

    code = "invalid_api_key"


class RequestTooLarge(UserError):
    """A request larger than the model's context or every peer's free cache."""

    code = "request_too_large"


class CostLimitExceeded(UserError):
    """A request that would cost more than its max_cost before producing anything."""

    code = "cost_limit_exceeded"


class InvalidPlan(LayerchainError):
    """A planned route that is not contiguous, leaves [start, end) or a peer's span: a bug
    in the planner, to be reported; never the user's nor a peer's fault."""

    code = "invalid_plan"


class ProtocolError(LayerchainError):
    """A frame or message that breaks the wire protocol.

    ``rid``: the request id of the frame at fault when it could be read (so the error reply
    goes to the right call), else 0.
    """

    code = "protocol_error"

    def __init__(self, message: str = "", *, hint: str | None = None, rid: int = 0) -> None:
        super().__init__(message, hint=hint)
        self.rid = rid


class FrameError(ProtocolError):
    """A malformed, truncated or oversized frame."""

    code = "frame_error"


class VersionMismatch(ProtocolError):
    """A peer speaking another protocol version."""

    code = "version_mismatch"


class LimitExceeded(ProtocolError):
    """A shape, dtype, session or size limit was exceeded."""

    code = "limit_exceeded"


class PeerError(LayerchainError):
    """A peer failed; the client routes around it."""

    code = "peer_error"


class PeerUnreachable(PeerError):
    """A peer that cannot be connected to, or whose connection dropped."""

    code = "peer_unreachable"


class PeerAuthFailed(PeerUnreachable):
    """A peer whose TLS certificate does not prove the peer id we dialled: another node
    answers at that address, or someone is in the middle. The client routes around it.

    ``peer_id``: the id we expected (the one in the peer's signed record).
    """

    code = "peer_auth_failed"

    def __init__(self, message: str = "", *, peer_id: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.peer_id = peer_id


class PeerTimeout(PeerError):
    """A peer that did not answer within the step timeout."""

    code = "peer_timeout"


class InvalidOutput(PeerError):
    """A peer that returned output of the wrong shape, dtype or with non-finite values."""

    code = "invalid_output"


class RemoteError(PeerError):
    """A peer answered with an error reply."""

    code = "remote_error"


class PeerBusy(RemoteError):
    """A peer without cache room for the session."""

    code = "busy"


class UnknownSession(RemoteError):
    """A peer that does not know the session."""

    code = "unknown_session"


class OfferChanged(RemoteError):
    """A peer that no longer offers what the client planned with: its price moved (adaptive
    pricing) longer ago than the grace it gives clients' records, or it moved from the span
    asked (rebalancing), so the client's record is stale. The client re-reads the records
    and plans again within its limits; nobody is banned."""

    code = "offer_changed"


def _all_subclasses(cls: type[LayerchainError]) -> list[type[LayerchainError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


def error_from_code(code: str, message: str) -> LayerchainError:
    """The exception for an error reply ``(code, message)``; unknown codes give RemoteError."""
    for cls in _all_subclasses(LayerchainError):
        if cls.code == code and cls is not PeerAuthFailed:  # a local verdict, never a reply
            return cls(message)
    return RemoteError(f"{code}: {message}")

"""The client's rules, pure: what a peer's answer means, what a step may take, and what a
request may ask before anything is sent.

Trust nothing a peer says. A peer's error reply is a *hop failure*: the peer is banned and
routed around, whatever the code (``insufficient_funds``, ``invalid_api_key``, ``no_route``
from a peer are not the client's verdict). A few codes are accepted with their meaning:

* ``busy``: no room now; the peer is avoided for a while, not banned (``Verdict.AVOID``);
* ``unknown_session``: it lost the session (it restarted); a hop failure like any other;
* ``limit_exceeded``: "not this request" only when the client's own check agrees that it
  exceeds what that peer announced (``Verdict.REQUEST``: the peer is avoided, not banned);
  otherwise the peer refused a request within its own limits: a hop failure.

Errors caused by the request itself are found before sending and ban nobody:
``check_context`` (prompt + max_new_tokens vs the model's context), ``check_room`` (vs the
free cache the peers announce), ``step_tokens`` (steps small enough for the protocol's
``MAX_STEP_TOKENS`` and the wire's frame limit). ``check_output`` is where verification of
what a peer returns lives (shape, dtype, finite values today).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import torch

from layerchain.client.config import ClientConfig
from layerchain.discovery import PeerRecord
from layerchain.errors import InvalidOutput, LayerchainError, LimitExceeded, PeerBusy, RequestTooLarge
from layerchain.wire.codec import DEFAULT_LIMITS
from layerchain.wire.messages import MAX_STEP_TOKENS

# Bytes of a Step frame that are not the tensor: msgpack header, session id, voucher.
FRAME_OVERHEAD_BYTES = 64 * 1024


class Verdict(enum.Enum):
    """What a failed hop means for its peer."""

    BAN = "ban"  # the peer failed us: banned (growing), routed around
    AVOID = "avoid"  # the peer is busy: left out of routes for a while, no ban
    REQUEST = "request"  # the request is too large for this peer: avoided, no ban


def judge(error: LayerchainError, request_exceeds: bool) -> Verdict:
    """The verdict on a peer whose call raised ``error`` (a local failure such as a timeout,
    or the class of its error reply). ``request_exceeds``: whether the client's own check
    says the request exceeds what this peer announced."""
    if isinstance(error, PeerBusy):
        return Verdict.AVOID
    if type(error) is LimitExceeded and request_exceeds:
        return Verdict.REQUEST
    return Verdict.BAN


def step_timeout_s(config: ClientConfig, tokens: int, blocks: int, ms_per_block: float) -> float:
    """Seconds a hop may take for one step of ``tokens`` tokens over ``blocks`` blocks.

    ``step_timeout_s`` plus ``step_timeout_slack`` times the work the peer's speed implies
    (``ms_per_block`` per block per token, its decode cost: a prefill costs less per token),
    at most ``step_timeout_max_s``. A peer that claims to be faster than it is only
    shortens its own deadline; a claim of slowness buys at most the cap."""
    work_s = tokens * blocks * min(max(ms_per_block, 0.0), 1e6) / 1000.0
    return min(config.step_timeout_max_s, config.step_timeout_s + config.step_timeout_slack * work_s)


def step_tokens(hidden_size: int, element_bytes: int, max_frame_bytes: int | None = None) -> int:
    """Most tokens one Step may carry: ``MAX_STEP_TOKENS``, fewer if the frame (``[1, T, H]``
    at ``element_bytes`` per value, plus header room) would pass ``max_frame_bytes``."""
    limit = DEFAULT_LIMITS.max_frame_bytes if max_frame_bytes is None else max_frame_bytes
    fits = (limit - FRAME_OVERHEAD_BYTES) // max(1, hidden_size * element_bytes)
    if fits < 1:
        raise RequestTooLarge(
            f"one token's hidden states ({hidden_size} x {element_bytes} bytes) do not fit "
            f"a {limit}-byte frame"
        )
    return min(MAX_STEP_TOKENS, fits)


def split_steps(hidden: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    """``hidden`` [1, T, H] as consecutive views [1, <= max_tokens, H] (one when it fits)."""
    if hidden.shape[1] <= max_tokens:
        return [hidden]
    return list(torch.split(hidden, max_tokens, dim=1))


def check_context(prompt_tokens: int, max_new_tokens: int, context_length: int | None) -> None:
    """RequestTooLarge if prompt + max_new_tokens passes the model's context length."""
    if context_length is not None and prompt_tokens + max_new_tokens > context_length:
        raise RequestTooLarge(
            f"the prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) is "
            f"longer than the model's context of {context_length} tokens",
            hint="shorten the prompt or ask for fewer new tokens",
        )


def short_of_room(records: Iterable[PeerRecord], max_length: int) -> set[str]:
    """The peers whose announced free cache cannot hold a session of ``max_length`` tokens."""
    return {r.peer_id for r in records if r.free_cache_tokens < max_length}


def check_room(records: Iterable[PeerRecord], max_length: int, num_blocks: int,
               first: int = 0) -> None:
    """RequestTooLarge if, for some block from ``first`` on (the ones routed), no peer
    serving it announced room for a session of ``max_length`` tokens (each hop's cache
    holds the whole prompt + output)."""
    best = [-1] * num_blocks  # most free cache announced for each block
    for r in records:
        for b in range(max(r.start, first), min(r.end, num_blocks)):
            best[b] = max(best[b], r.free_cache_tokens)
    short = [b for b, free in enumerate(best) if 0 <= free < max_length]
    if short:
        raise RequestTooLarge(
            f"the request needs {max_length} cache tokens on every hop; the peers serving "
            f"block {short[0]} have at most {best[short[0]]} free",
            hint="shorten the prompt or ask for fewer new tokens (or retry when the swarm is "
            "less busy)",
        )


def exceeds_announced(record: PeerRecord | None, max_length: int, tokens: int) -> bool:
    """Whether the client agrees that a step of ``tokens`` in a session of ``max_length``
    exceeds what ``record`` announced (or the protocol allows)."""
    if tokens > MAX_STEP_TOKENS:
        return True
    return record is not None and max_length > record.free_cache_tokens


def check_output(peer_id: str, sent: torch.Tensor, received: torch.Tensor) -> None:
    """InvalidOutput unless ``received`` has the shape and dtype of ``sent`` and only finite
    values. Runs once per hop per step: keep it cheap."""
    if received.shape != sent.shape or received.dtype != sent.dtype:
        raise InvalidOutput(
            f"peer {peer_id} returned {list(received.shape)} {received.dtype}, "
            f"expected {list(sent.shape)} {sent.dtype}"
        )
    if not torch.isfinite(received).all():
        raise InvalidOutput(f"peer {peer_id} returned non-finite values")

"""The client's rules, pure: what a peer's answer means, what a step may take, and what a
request may ask before anything is sent.

Trust nothing a peer says. A peer's error reply is a *hop failure*: the peer is banned and
routed around, whatever the code (``insufficient_funds``, ``invalid_api_key``, ``no_route``
from a peer are not the client's verdict). A few codes are accepted with their meaning:

* ``busy``: no room now; the peer is avoided for a while, not banned (``Verdict.AVOID``);
* ``offer_changed`` (to an OpenSession): the peer no longer offers the price or the span of
  the record the client planned with (adaptive pricing or a move, a record older than the
  peer's grace); the client re-reads the records and plans again within its limits
  (``Verdict.STALE``). A receipt at another price than the one agreed at open stays a ban;
* ``unknown_session``: it lost the session (it restarted); a hop failure like any other;
* ``limit_exceeded``: "not this request" only when the client's own check agrees that it
  exceeds what that peer announced (``Verdict.REQUEST``: the peer is avoided, not banned);
  otherwise the peer refused a request within its own limits: a hop failure.

Errors caused by the request itself are found before sending and ban nobody:
``check_context`` (prompt + max_new_tokens vs the model's context), ``check_room`` (vs the
free cache the peers announce), ``step_tokens`` (steps small enough for the protocol's
``MAX_STEP_TOKENS`` and the wire's frame limit). ``check_output`` holds the cheap invariants
of what a peer returns, checked on every step (shape, dtype, finite values, per-token norms
within what the model's blocks produce); that the receipt commits to exactly the tensor
returned is ``ReceiptVerifier.check``'s (``market.commitment``); audits do the rest.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable

import numpy as np
import torch

from layerchain.client.config import ClientConfig
from layerchain.discovery import PeerRecord
from layerchain.errors import (
    InvalidOutput,
    LayerchainError,
    LimitExceeded,
    OfferChanged,
    PeerBusy,
    RequestTooLarge,
)
from layerchain.wire.codec import DEFAULT_LIMITS
from layerchain.wire.messages import MAX_STEP_TOKENS

# Bytes of a Step frame that are not the tensor: msgpack header, session id, voucher.
FRAME_OVERHEAD_BYTES = 64 * 1024


class Verdict(enum.Enum):
    """What a failed hop means for its peer."""

    BAN = "ban"  # the peer failed us: banned (growing), routed around
    AVOID = "avoid"  # the peer is busy: left out of routes for a while, no ban
    REQUEST = "request"  # the request is too large for this peer: avoided, no ban
    STALE = "stale"  # our record of the peer's price is out of date: re-read it, no ban


def judge(error: LayerchainError, request_exceeds: bool) -> Verdict:
    """The verdict on a peer whose call raised ``error`` (a local failure such as a timeout,
    or the class of its error reply). ``request_exceeds``: whether the client's own check
    says the request exceeds what this peer announced."""
    if isinstance(error, PeerBusy):
        return Verdict.AVOID
    if isinstance(error, OfferChanged):
        return Verdict.STALE
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


# Cheap invariants on the size of what a hop returns, per token: the RMS over the hidden
# size. Blocks add to a residual stream, so an honest output never collapses against its
# input (measured: SmolLM2's smallest ratio is 0.27, the first position after block 29).
MIN_RMS_RATIO = 1 / 64  # a token's output RMS is at least this times its input's
NORM_MARGIN = 4.0  # a known model's measured RMS range, widened this many times each way
# model id -> per block boundary b (the hidden states entering block b; b = num_blocks: the
# last block's output) the (lowest, highest) per-token RMS measured on the reference model
# (11 prompts: chat, code, digits, 600 repeated tokens, random ids; the first position, an
# attention sink, holds the highs of 1e3 from block 12 on): tests/test_commitment.py
# ::test_norm_ranges_of_the_default_model measures them again.
KNOWN_NORMS: dict[str, tuple[tuple[float, float], ...]] = {
    # SmolLM2-135M-Instruct Q4_1 (the default model), 30 blocks
    "af9f6628276edc2bac4732d4a065228e579b6fe8b0ffb4bf2a28d2496b523c03": (
        (0.0818, 0.228), (1.24, 4.81), (2.13, 14.4), (2.4, 42.7),
        (2.52, 42.5), (2.57, 42.3), (2.72, 41.9), (3.09, 41.5),
        (3.04, 41), (3.75, 34.8), (4.32, 17.3), (4.33, 9.36),
        (4.22, 1110), (4.45, 1110), (4.35, 1110), (4.65, 1110),
        (5.75, 1100), (5.89, 1100), (6.06, 1100), (6.66, 1100),
        (6.68, 1100), (7.98, 1100), (9.32, 1100), (9.87, 1100),
        (10.9, 1100), (12.9, 1100), (15.1, 1100), (16, 1100),
        (18.8, 1090), (21.3, 503), (18.4, 295),
    ),
}


def _token_norms(sent: torch.Tensor, received: torch.Tensor) -> tuple[float, float] | None:
    """(L2 norm of ``received``, of ``sent``) for one float32 token [1, 1, H] on the CPU
    (a decode step) when both are finite numbers: two numpy dot products, ~10x cheaper than
    the torch ops of the general path. None otherwise (another shape or dtype; non-finite
    values): the general path decides."""
    if received.dtype is not torch.float32 or received.dim() != 3 \
            or received.shape[0] * received.shape[1] != 1 \
            or not (received.is_cpu and sent.is_cpu):
        return None
    # in float64: no square overflows (nor warns), a NaN or infinity stays one
    out = received.detach().reshape(-1).numpy().astype(np.float64)
    into = sent.detach().reshape(-1).numpy().astype(np.float64)
    squares, sent_squares = float(np.dot(out, out)), float(np.dot(into, into))
    if not (math.isfinite(squares) and math.isfinite(sent_squares)):
        return None
    return math.sqrt(squares), math.sqrt(sent_squares)


def check_output(
    peer_id: str, sent: torch.Tensor, received: torch.Tensor, *, model_id: str = "",
    end: int | None = None, input_trusted: bool = False,
) -> None:
    """InvalidOutput unless ``received`` has the shape and dtype of ``sent``, only finite
    values, and per token an RMS of at least ``MIN_RMS_RATIO`` times that of ``sent``; when
    ``input_trusted`` (``sent`` is the client's own: the embeddings, or its private blocks'
    output), ``model_id`` is in ``KNOWN_NORMS`` and ``end`` (the hop's last block + 1) is
    given, also within that boundary's measured range (``NORM_MARGIN`` each way).

    Only then: an honest hop fed a cheater's output may leave the range itself, so the range
    says who is wrong only for a hop whose input the client computed (a cheater upstream
    would otherwise get the honest hop after it banned). The collapse test holds for any
    input. Runs once per hop per step: keep it cheap (two reductions over [B, T, H])."""
    if received.shape != sent.shape or received.dtype != sent.dtype:
        raise InvalidOutput(
            f"peer {peer_id} returned {list(received.shape)} {received.dtype}, "
            f"expected {list(sent.shape)} {sent.dtype}"
        )
    token = _token_norms(sent, received)  # a decode step's: two dot products
    if token is not None:
        norm, sent_norm = token
        collapsed = norm < MIN_RMS_RATIO * sent_norm
        norms: tuple[float, float] | None = (norm, norm)
    else:
        if not torch.isfinite(received).all():
            raise InvalidOutput(f"peer {peer_id} returned non-finite values")
        # per-token L2 norms [B, T] in float32; RMS = norm / sqrt(H)
        each = torch.linalg.vector_norm(received, dim=-1, dtype=torch.float32)
        sent_each = torch.linalg.vector_norm(sent, dim=-1, dtype=torch.float32)
        collapsed = bool((each < MIN_RMS_RATIO * sent_each).any())
        norms = None
        if each.numel():
            least, most = torch.aminmax(each)
            norms = (float(least), float(most))
    if collapsed:
        raise InvalidOutput(
            f"peer {peer_id} returned hidden states that collapsed (a token's RMS is below "
            f"{MIN_RMS_RATIO:.3g} times its input's)"
        )
    bounds = KNOWN_NORMS.get(model_id, ())
    if input_trusted and end is not None and 0 <= end < len(bounds) and norms is not None:
        low, high = bounds[end][0] / NORM_MARGIN, bounds[end][1] * NORM_MARGIN
        smallest, largest = (v / received.shape[-1] ** 0.5 for v in norms)
        if smallest < low or largest > high:
            raise InvalidOutput(
                f"peer {peer_id} returned hidden states with a token RMS of "
                f"{smallest:.3g}..{largest:.3g} after block {end - 1}, outside this model's "
                f"{low:.3g}..{high:.3g}"
            )

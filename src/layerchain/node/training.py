"""A node's side of training: the forward and backward of its blocks over whole sequences.

Petals' ``rpc_forward``/``rpc_backward``: a client fine-tuning through the swarm sends a
hop ``TrainForward`` (hidden states [B, T, H] at positions 0..T-1, no KV cache) and later
``TrainBackward`` (the same inputs and the gradient of the loss with respect to the hop's
outputs); the node recomputes its frozen blocks' forward with autograd on and returns the
gradient with respect to the inputs. Nothing is kept between the two: a request carries
all it needs, so a client whose hop died redoes the work on another peer serving the span.

Both requests run inside an inference session (``OpenSession``) and are bounded like steps:
at most ``MAX_TRAIN_TOKENS`` tokens (B x T) a request and no more than the session's
``max_length`` (what it reserved of the node's cache budget), [B, T, H] of the model's
hidden size, finite values. They take the session's step numbers, sign a receipt on its
chain and are paid by its vouchers through ``NodePayments`` like a ``Step``: a forward as
its tokens, a backward as ``BACKWARD_TOKEN_FACTOR`` times its tokens.

The blocks' weights stay frozen (``load_span`` sets ``requires_grad_(False)``): only the
inputs' gradient is computed. Like a step, the work runs on the node's event loop thread
(see ``node.server`` on libgomp); unlike a long step, a request holds the loop for its
whole compute (not sliced: autograd runs the blocks as one graph), bounded by
``MAX_TRAIN_TOKENS`` (timings: docs/BENCHMARKS.md, "Fine-tuning through the swarm").
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from layerchain.errors import LimitExceeded
from layerchain.market import tokens_of
from layerchain.model.device import reply_dtype
from layerchain.node.sessions import Session
from layerchain.wire import messages as m

if TYPE_CHECKING:
    from layerchain.node.server import Node

TrainRequest = m.TrainForward | m.TrainBackward
TrainReply = m.TrainForwardResult | m.TrainBackwardResult


async def handle(node: Node, msg: TrainRequest, owner: int) -> TrainReply:
    """Answer a training request of connection ``owner`` (counted in the node's load)."""
    node.load.begin(time.monotonic())
    try:
        if isinstance(msg, m.TrainForward):
            return await forward(node, msg, owner)
        return await backward(node, msg, owner)
    finally:
        node.load.end(time.monotonic())
        node._announce_load()


def check_hidden(name: str, hidden: torch.Tensor, hidden_size: int) -> int:
    """Tokens (B x T) of a training tensor; LimitExceeded unless it is [B, T, hidden_size]
    with at most ``MAX_TRAIN_TOKENS`` tokens and only finite values."""
    if hidden.dim() != 3 or hidden.shape[2] != hidden_size:
        raise LimitExceeded(f"{name} must be [B, T, {hidden_size}], got {list(hidden.shape)}")
    tokens = tokens_of(hidden)
    if tokens > m.MAX_TRAIN_TOKENS:
        raise LimitExceeded(
            f"a training request carries at most {m.MAX_TRAIN_TOKENS} tokens (B x T), "
            f"this {name} {tokens}",
            hint="send fewer or shorter sequences per request",
        )
    if not torch.isfinite(hidden).all():
        raise LimitExceeded(f"{name} holds non-finite values")
    return tokens


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """[B, T, H] as [1, B x T, H] (a view): receipts and their commitments name a training
    request's tensors in this shape, the one a step's have (``market.commitment``)."""
    return tensor.reshape(1, -1, tensor.shape[-1])


def _session(node: Node, msg: TrainRequest, owner: int, tokens: int) -> Session:
    session = node.sessions.get(msg.session_id, owner)
    if tokens > session.max_length:
        raise LimitExceeded(
            f"a request of {tokens} tokens is more than session {msg.session_id} reserved "
            f"({session.max_length})",
            hint="open the session with max_length >= the tokens of one request",
        )
    return session


def _check_step(session: Session, step: int) -> None:
    if step != session.next_step:
        raise LimitExceeded(f"session {session.session_id} expects step {session.next_step}, "
                            f"got {step}")


async def forward(node: Node, msg: m.TrainForward, owner: int) -> m.TrainForwardResult:
    """The session's blocks over ``msg.hidden`` at positions 0..T-1, and the receipt."""
    hidden = msg.hidden
    tokens = check_hidden("hidden", hidden, node.spec.hidden_size)
    session = _session(node, msg, owner, tokens)
    node.payments.charge(session.payment, msg.voucher, tokens)  # before the first await
    async with session.lock:
        _check_step(session, msg.step)
        wire = reply_dtype(hidden.dtype, node.span.compute_dtype)
        with torch.inference_mode():
            out = node.span.forward(hidden, None, start=session.start, end=session.end)
            out = out.to(device="cpu", dtype=wire)
        session.stepped(0)  # nothing enters the cache
        receipt = node.payments.receipt(session.payment, msg.step, tokens, flat(hidden),
                                        flat(out))
    return m.TrainForwardResult(msg.rid, msg.session_id, msg.step, out, receipt)


async def backward(node: Node, msg: m.TrainBackward, owner: int) -> m.TrainBackwardResult:
    """d loss / d ``msg.hidden`` through the session's blocks given d loss / d output
    (``msg.grad``), and the receipt (billed ``BACKWARD_TOKEN_FACTOR`` x the tokens)."""
    hidden, grad = msg.hidden, msg.grad
    tokens = check_hidden("hidden", hidden, node.spec.hidden_size)
    if grad.shape != hidden.shape:
        raise LimitExceeded(
            f"grad must have the inputs' shape {list(hidden.shape)}, got {list(grad.shape)}"
        )
    check_hidden("grad", grad, node.spec.hidden_size)
    billed = m.BACKWARD_TOKEN_FACTOR * tokens
    session = _session(node, msg, owner, tokens)
    node.payments.charge(session.payment, msg.voucher, billed)  # before the first await
    async with session.lock:
        _check_step(session, msg.step)
        wire = reply_dtype(hidden.dtype, node.span.compute_dtype)
        with torch.enable_grad():
            x = node.span.to_span(hidden).detach().requires_grad_(True)
            out = node.span.forward(x, None, start=session.start, end=session.end)
            (dx,) = torch.autograd.grad(out, x, grad.to(device=out.device, dtype=out.dtype))
        dx = dx.to(device="cpu", dtype=wire)
        session.stepped(0)
        received = torch.cat([hidden, grad.to(hidden.dtype)])  # [2B, T, H]: what was sent
        receipt = node.payments.receipt(session.payment, msg.step, billed, flat(received),
                                        flat(dx))
    return m.TrainBackwardResult(msg.rid, msg.session_id, msg.step, dx, receipt)

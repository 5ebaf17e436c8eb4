"""The client side of training through remote blocks: a forward and a backward per hop.

A ``TrainingSession`` is an ``InferenceSession`` (the same route planning, sessions on each
hop, receipts, vouchers, cost limits, blame and failover) whose hops are asked
``TrainForward`` and ``TrainBackward`` (``node.training``) instead of cached steps. Each
hop's output is checked like a step's (shape, dtype, finite, not collapsed) and its receipt
like a step's (``ReceiptVerifier``: the chain, the tensors' hashes, the commitment, the
amount); a backward's receipt names ``torch.cat([inputs, grad])`` and
``BACKWARD_TOKEN_FACTOR`` times the tokens, as the node signs it.

Failover: nothing lives on a node between requests, so a hop that fails is replaced (the
session's ``_recover``: blame, re-plan its blocks, open sessions there) and its work redone
there. A forward continues through the replacement chain; a backward first recomputes the
forward through the replacement (its hops' inputs), then runs their backwards in reverse.

``RemoteHop`` is the autograd ``Function`` of one planned hop: its forward is the remote
forward, its backward the remote backward, so ``loss.backward()`` on the client drives the
whole chain. Autograd calls it synchronously: it hands the coroutines to the swarm's event
loop through ``run`` (blocking until they finish), so training runs on another thread than
the loop (``Swarm.run``). ``RemoteBlocks`` opens one session per optimizer step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from layerchain.client.rules import check_output
from layerchain.client.session import HopFailed, HopSession, InferenceSession
from layerchain.errors import InvalidOutput, InvalidReceipt, LayerchainError
from layerchain.market import step_amount, tokens_of
from layerchain.wire import messages as m

Runner = Callable[[Coroutine[Any, Any, Any]], Any]  # runs a coroutine on the swarm's loop
Trace = tuple[tuple[HopSession, torch.Tensor], ...]  # (hop, its input [B, T, H]) in route order


class TrainingSession(InferenceSession):
    """A route's hops for ``requests`` forward + backward pairs of at most ``max_length``
    tokens (B x T) each (see the module docstring)."""

    def __init__(self, peers: Any, max_length: int, *, requests: int = 1, **options: Any) -> None:
        super().__init__(peers, max_length, **options)
        self.requests = requests

    @property
    def work_tokens(self) -> int:
        """Tokens billed on one hop at most: each request's forward and backward."""
        return (1 + m.BACKWARD_TOKEN_FACTOR) * self.max_length * self.requests

    # ---------------------------------------------------------------- forward

    async def forward_hop(self, hs: HopSession, x: torch.Tensor) -> tuple[torch.Tensor, Trace]:
        """``hs``'s blocks over ``x`` [B, T, H]: the output and the hops that computed it
        (``hs``, or what replaced it) with their inputs, for the backward."""
        return await self._forward_hops([hs], x)

    async def _forward_hops(self, hops: list[HopSession], x: torch.Tensor
                            ) -> tuple[torch.Tensor, Trace]:
        hops, trace, k = list(hops), [], 0
        while k < len(hops):
            hs = hops[k]
            try:
                y = await self._forward_call(hs, x)
            except HopFailed as failure:
                hops[k : k + 1] = await self._replace(hs, failure)
                continue
            trace.append((hs, x))
            x, k = y, k + 1
        return x, tuple(trace)

    async def _replace(self, hs: HopSession, failure: HopFailed) -> list[HopSession]:
        """The hops that took over ``hs``'s blocks (``InferenceSession._recover``)."""
        index = next(i for i, h in enumerate(self.hops) if h is hs)
        before = len(self.hops)
        await self._recover(index, failure)
        return self.hops[index : index + len(self.hops) - before + 1]

    async def _forward_call(self, hs: HopSession, x: torch.Tensor) -> torch.Tensor:
        tokens = tokens_of(x)
        reply = await self._request(hs, tokens, tokens, lambda step, voucher: m.TrainForward(
            rid=0, session_id=hs.session_id, step=step, hidden=x, voucher=voucher))
        if not isinstance(reply, m.TrainForwardResult):
            raise self._failure(hs.record, InvalidOutput(
                f"peer {hs.hop.peer_id} answered a TrainForward with {type(reply).__name__}"),
                tokens)
        try:
            check_output(hs.hop.peer_id, x, reply.hidden)  # a trained prefix may leave the
            # model's usual norms: only the collapse test applies (input_trusted=False)
            self._check_receipt(hs, reply.receipt, x, reply.hidden, tokens)
        except LayerchainError as error:
            raise self._failure(hs.record, error, tokens) from error
        return reply.hidden

    # ---------------------------------------------------------------- backward

    async def backward(self, trace: Trace, grad: torch.Tensor) -> torch.Tensor:
        """d loss / d (the first traced hop's input), given d loss / d (the last one's
        output) ``grad`` [B, T, H]: each hop's backward, last hop first."""
        for hs, x in reversed(trace):
            grad = await self._backward_hop(hs, x, grad)
        return grad

    async def _backward_hop(self, hs: HopSession, x: torch.Tensor, grad: torch.Tensor
                            ) -> torch.Tensor:
        try:
            return await self._backward_call(hs, x, grad)
        except HopFailed as failure:
            replacement = await self._replace(hs, failure)
        # the replacement's own inputs: recompute the forward through it, then go back
        _, trace = await self._forward_hops(replacement, x)
        return await self.backward(trace, grad)

    async def _backward_call(self, hs: HopSession, x: torch.Tensor, grad: torch.Tensor
                             ) -> torch.Tensor:
        tokens = tokens_of(x)
        billed = m.BACKWARD_TOKEN_FACTOR * tokens
        grad = grad.to(x.dtype).contiguous()
        reply = await self._request(hs, tokens, billed, lambda step, voucher: m.TrainBackward(
            rid=0, session_id=hs.session_id, step=step, hidden=x, grad=grad, voucher=voucher))
        if not isinstance(reply, m.TrainBackwardResult):
            raise self._failure(hs.record, InvalidOutput(
                f"peer {hs.hop.peer_id} answered a TrainBackward with {type(reply).__name__}"),
                tokens)
        try:
            dx = reply.grad
            if dx.shape != x.shape or dx.dtype != x.dtype:
                raise InvalidOutput(f"peer {hs.hop.peer_id} returned a gradient "
                                    f"{list(dx.shape)} {dx.dtype}, expected {list(x.shape)}")
            if not torch.isfinite(dx).all():
                raise InvalidOutput(f"peer {hs.hop.peer_id} returned a non-finite gradient")
            self._check_receipt(hs, reply.receipt, torch.cat([x, grad]), dx, billed)
        except LayerchainError as error:
            raise self._failure(hs.record, error, tokens) from error
        return dx

    # ---------------------------------------------------------------- one request

    async def _request(self, hs: HopSession, tokens: int, billed: int,
                       make: Callable[[int, bytes], m.Message]) -> m.Message:
        """Pay ``billed`` tokens of ``hs``'s work, send the request of ``tokens`` tokens
        ``make(step, voucher)`` builds, return the reply (HopFailed, judged, if it fails)."""
        amount = step_amount(billed, hs.blocks, hs.verifier.price_per_block)
        voucher = self._pay(hs, amount)  # before any await: vouchers go out in order
        t0 = time.perf_counter()
        try:
            rpc = await self.peers.client(hs.hop.peer_id)
            reply = await rpc.call(make(hs.verifier.next_step, voucher),
                                   timeout=self._step_timeout(hs, billed))
        except LayerchainError as error:
            raise self._failure(hs.record, error, tokens) from error
        self.hop_seconds += time.perf_counter() - t0
        self._count(hs, billed, 0 if voucher else amount)
        return reply

    def _check_receipt(self, hs: HopSession, receipt: bytes, sent: torch.Tensor,
                       received: torch.Tensor, billed: int) -> None:
        if not receipt:
            raise InvalidReceipt(
                f"peer {hs.hop.peer_id} sent no receipt for step {hs.verifier.next_step}")
        # named [1, B x T, H], as the node signs them (``node.training.flat``)
        hs.verifier.check(receipt, flat(sent), flat(received), billed)  # advances next_step


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """[B, T, H] as [1, B x T, H] (a view), the shape receipts name training tensors in."""
    return tensor.reshape(1, -1, tensor.shape[-1])


class RemoteHop(torch.autograd.Function):
    """One planned hop as an autograd function: forward = the remote forward, backward =
    the remote backward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, session: TrainingSession, hs: HopSession,
                run: Runner) -> torch.Tensor:
        y, trace = run(session.forward_hop(hs, x.detach().contiguous()))
        ctx.session, ctx.trace, ctx.run = session, trace, run
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        dx = ctx.run(ctx.session.backward(ctx.trace, grad.contiguous()))
        return dx, None, None, None


def remote_forward(x: torch.Tensor, session: TrainingSession, run: Runner) -> torch.Tensor:
    """``x`` [B, T, H] through the session's route, one ``RemoteHop`` per hop: the output
    [B, T, H], differentiable with respect to ``x``."""
    for hs in list(session.hops):
        x = RemoteHop.apply(x, session, hs, run)
    return x


@dataclass
class RemoteBlocks:
    """The swarm's blocks for a trainer: ``open`` a session for one optimizer step.

    ``swarm`` is a ``client.AsyncSwarm`` (its peers, funding and limits); ``run`` runs a
    coroutine on its event loop and returns the result (``Swarm.run``)."""

    swarm: Any
    run: Runner
    current: TrainingSession | None = None  # the session open now (None between steps)
    sessions: int = 0  # sessions opened so far
    recoveries: int = 0  # failovers in them
    cost: int = 0  # credits paid (or owed) in them
    peers: set[str] = field(default_factory=set)  # peer ids whose hops computed for them
    hop_seconds: float = 0.0  # waiting on hops (the wire and the peers' compute), all sessions

    @contextlib.contextmanager
    def open(self, max_tokens: int, requests: int) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """A function running [B, T, H] (B x T <= ``max_tokens``) through every block,
        differentiably, for ``requests`` forward + backward pairs; the session closes after."""
        swarm = self.swarm
        self.run(swarm.peers.wait_for_coverage())
        session = TrainingSession(swarm.peers, max_tokens, requests=requests,
                                  step_tokens=m.MAX_TRAIN_TOKENS, funding=swarm.funding)
        self.run(session.open(prompt_tokens=session.work_tokens))
        self.sessions += 1
        self.current = session
        try:
            yield lambda x: remote_forward(x, session, self.run)
        finally:
            self.current = None
            self.run(session.settle())
            hops = (*session.hops, *session.retired)  # close() forgets the hops
            self.run(session.close())
            self.recoveries += len(session.recoveries)
            self.peers.update(hs.hop.peer_id for hs in hops)
            self.cost += session.cost
            self.hop_seconds += session.hop_seconds

"""An inference session through a chain of peers, with failover that keeps the answer.

Each hop keeps the inputs it was sent (``[1, T_i, H]`` per step). When a hop fails — it
dies, times out, answers with an error, or returns output of the wrong shape or with
non-finite values — the session bans the peer, re-plans only that hop's blocks (possibly
over several peers), opens sessions there, replays the kept inputs to rebuild their KV
caches, and carries on with the step that failed. Greedy output is therefore identical to
an undisturbed run. Each recovery is recorded as a ``Recovery``.

Every step result carries the node's signed receipt; the session checks it against what it
sent and received (``ReceiptVerifier``) and treats a wrong one like a failed hop. With a
``ChannelPayer`` each step to a priced hop carries a cumulative voucher paying for it in
advance; ``cost`` is what the session paid (or, without a payer, what the receipts say it
owes) and ``payments`` the tally per peer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

from layerchain.client.config import RouteLimits
from layerchain.client.peers import PeerView
from layerchain.errors import InvalidOutput, InvalidReceipt, NoRoute, PeerError, ProtocolError
from layerchain.market import ChannelPayer, ReceiptVerifier, step_amount, tokens_of
from layerchain.types import Hop
from layerchain.wire import messages as m

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recovery:
    """One failover: which peer failed, at which step, what replaced it and how long it took."""

    peer_id: str
    start: int
    end: int
    step: int
    reason: str
    seconds: float
    replacement: tuple[Hop, ...]


# A hop that failed or whose receipt is wrong is routed around.
HOP_FAILURES = (PeerError, ProtocolError, InvalidReceipt)


@dataclass
class HopPayment:
    """What one peer computed for a generation and what it was paid (or is owed)."""

    peer_id: str
    address: str  # the peer's wallet, the receipts' signer
    price_per_block: int
    blocks: int  # blocks of its (last) hop
    tokens: int = 0  # token positions it processed, replays included
    amount: int = 0  # credits for them: sum of tokens x blocks x price per step


@dataclass
class HopSession:
    """One hop's session on one peer, with the inputs kept for replay."""

    hop: Hop
    session_id: str
    verifier: ReceiptVerifier
    next_step: int = 0
    inputs: list[torch.Tensor] = field(default_factory=list)  # [1, T_i, H] per step


class InferenceSession:
    """Pushes hidden states through a route of hops; one call of ``step`` per decode step."""

    def __init__(
        self,
        peers: PeerView,
        hidden_size: int,
        max_length: int,
        timeout_s: float,
        payer: ChannelPayer | None = None,
        limits: RouteLimits | None = None,
    ):
        self.peers = peers
        self.limits = limits  # this session's routing limits (None: the client's)
        self.payer = payer
        self.hidden_size = hidden_size
        self.max_length = max_length
        self.timeout_s = timeout_s
        self.hops: list[HopSession] = []
        self.recoveries: list[Recovery] = []
        self.steps = 0
        self.hop_seconds = 0.0  # wall time spent waiting on hops, all steps
        self.cost = 0  # credits paid (with a payer) or owed (without), all hops
        self.payments: dict[str, HopPayment] = {}  # peer id -> tally
        self._closing: set[asyncio.Task[None]] = set()  # failed hops closed in the background

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    async def open(self, attempts: int = 4) -> None:
        """Plan a route and open a session on each hop; a peer that refuses is banned."""
        for attempt in range(1, attempts + 1):
            plan = self.peers.plan(limits=self.limits)
            try:
                self.hops = await self._open_hops(plan.hops)
                return
            except HOP_FAILURES as error:
                if attempt == attempts or error.peer_id is None:  # type: ignore[attr-defined]
                    raise
                self.peers.ban(error.peer_id, str(error))  # type: ignore[attr-defined]

    async def _open_hops(self, hops: tuple[Hop, ...] | list[Hop]) -> list[HopSession]:
        """Open every hop in order; on failure close those opened and re-raise, with the
        failing peer's id in ``error.peer_id``."""
        opened: list[HopSession] = []
        try:
            for hop in hops:
                try:
                    opened.append(await self._open_hop(hop))
                except HOP_FAILURES as error:
                    error.peer_id = hop.peer_id  # type: ignore[attr-defined]
                    raise
        except BaseException:
            for h in opened:
                await self._close_hop(h)
            raise
        return opened

    async def _open_hop(self, hop: Hop) -> HopSession:
        record = self.peers.records[hop.peer_id]
        rpc = await self.peers.client(hop.peer_id)
        session_id = uuid.uuid4().hex
        await rpc.call(
            m.OpenSession(
                rid=0,
                session_id=session_id,
                model_id=self.peers.model_id,
                start=hop.start,
                end=hop.end,
                max_length=self.max_length,
            ),
            timeout=self.timeout_s,
        )
        verifier = ReceiptVerifier(
            record.wallet, session_id, self.peers.model_id, hop.span, record.price_per_block
        )
        return HopSession(hop, session_id, verifier)

    async def _close_hop(self, hs: HopSession) -> None:
        try:
            rpc = await self.peers.client(hs.hop.peer_id)
            await rpc.call(m.CloseSession(rid=0, session_id=hs.session_id), timeout=1.0)
        except (PeerError, ProtocolError, KeyError):
            pass  # a dead peer frees its cache on its own (idle timeout or exit)

    def _close_later(self, hs: HopSession) -> None:
        """Close a failed hop's session without waiting: a hung peer would cost the whole
        close timeout on the path of the recovery. ``close`` waits for these."""
        task = asyncio.get_running_loop().create_task(self._close_hop(hs))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every hop's session (in parallel) and wait for those closing already."""
        hops, self.hops = self.hops, []
        await asyncio.gather(*(self._close_hop(hs) for hs in hops), *self._closing)

    # ---------------------------------------------------------------- steps

    async def _call(self, hs: HopSession, hidden: torch.Tensor) -> torch.Tensor:
        rpc = await self.peers.client(hs.hop.peer_id)
        verifier = hs.verifier
        tokens = tokens_of(hidden)
        amount = step_amount(tokens, hs.hop.end - hs.hop.start, verifier.price_per_block)
        voucher = b""
        if self.payer is not None and amount > 0:  # paid in advance, before any await
            voucher = self.payer.voucher_for(verifier.node_address, amount)
            self.cost += amount
        reply = await rpc.call(
            m.Step(rid=0, session_id=hs.session_id, step=hs.next_step, hidden=hidden,
                   voucher=voucher),
            timeout=self.timeout_s,
        )
        out = reply.hidden
        if out.shape != hidden.shape or out.dtype != hidden.dtype:
            raise InvalidOutput(
                f"peer {hs.hop.peer_id} returned {list(out.shape)} {out.dtype}, "
                f"expected {list(hidden.shape)} {hidden.dtype}"
            )
        if not torch.isfinite(out).all():
            raise InvalidOutput(f"peer {hs.hop.peer_id} returned non-finite values")
        if not reply.receipt:
            raise InvalidReceipt(f"peer {hs.hop.peer_id} sent no receipt for step {hs.next_step}")
        verifier.check(reply.receipt, hidden, out, tokens)
        if self.payer is None:
            self.cost += amount
        tally = self.payments.setdefault(
            hs.hop.peer_id,
            HopPayment(hs.hop.peer_id, verifier.node_address, verifier.price_per_block, 0),
        )
        tally.blocks, tally.tokens = hs.hop.end - hs.hop.start, tally.tokens + tokens
        tally.amount += amount
        hs.next_step += 1
        hs.inputs.append(hidden)
        return out

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``hidden`` [1, T, H] through every hop; return the last hop's output."""
        t0 = time.perf_counter()
        i = 0
        while i < len(self.hops):
            hs = self.hops[i]
            try:
                hidden = await self._call(hs, hidden)
                i += 1
            except HOP_FAILURES as error:
                await self._recover(i, error)
        self.steps += 1
        self.hop_seconds += time.perf_counter() - t0
        return hidden

    async def _recover(self, index: int, error: Exception) -> None:
        """Replace hop ``index`` by a freshly planned chain; rebuild its caches by replay."""
        t0 = time.perf_counter()
        failed = self.hops[index]
        self.peers.ban(failed.hop.peer_id, str(error))
        if len(self.recoveries) >= self.peers.config.max_recoveries:
            raise NoRoute(
                f"gave up after {len(self.recoveries)} failovers; last: {error}"
            ) from error
        history = torch.cat(failed.inputs, dim=1) if failed.inputs else None
        exclude = {h.hop.peer_id for j, h in enumerate(self.hops) if j != index}
        for attempt in range(1, 5):
            await self.peers.refresh(force=attempt > 1)
            plan = self.peers.plan(failed.hop.start, failed.hop.end, exclude, self.limits)
            replacement: list[HopSession] = []
            current = plan.hops[0]
            try:
                x = history
                for current in plan.hops:
                    replacement.append(await self._open_hop(current))
                    if x is not None:
                        x = await self._call(replacement[-1], x)
                break
            except HOP_FAILURES as again:
                log.warning("recovery attempt %d failed at %s: %s", attempt, current.peer_id, again)
                self.peers.ban(current.peer_id, str(again))
                for hs in replacement:
                    self._close_later(hs)
                if attempt == 4:
                    raise
        self._close_later(failed)
        self.hops[index : index + 1] = replacement
        rec = Recovery(
            peer_id=failed.hop.peer_id,
            start=failed.hop.start,
            end=failed.hop.end,
            step=self.steps,
            reason=str(error),
            seconds=time.perf_counter() - t0,
            replacement=tuple(h.hop for h in replacement),
        )
        self.recoveries.append(rec)
        log.warning(
            "recovered from peer %s at step %d in %.2f s: blocks %d:%d now on %s",
            rec.peer_id, rec.step, rec.seconds, rec.start, rec.end,
            ", ".join(h.peer_id for h in rec.replacement),
        )

"""An inference session through a chain of peers, with failover that keeps the answer.

Each hop keeps the inputs it was sent (``[1, T_i, H]`` per step). When a hop fails — it
dies, times out, answers with an error, returns output of the wrong shape or with
non-finite values, or a wrong receipt — the session blames the peer (``rules.judge``: a
ban, or for "busy" a short avoidance), re-plans only that hop's blocks (possibly over
several peers), opens sessions there, replays the kept inputs to rebuild their KV caches,
and carries on with the step that failed. Greedy output is therefore identical to an
undisturbed run. Each recovery is recorded as a ``Recovery``. A failure caused by the
request (a peer too small for it, checked against what the peer announced) bans nobody.

Prices: a hop opens at the price of the record it was planned with (``OpenSession
.price_per_block``) and checks every receipt against it. A peer that re-priced since (an
adaptive node) still charges it within its record TTL, else answers ``offer_changed``: the
session re-reads the records and plans again (the new price within ``limits``, or another
peer), banning nobody (``_reread_offer``); so does a peer asked for the span it left by a
move less than that grace ago. A receipt at any other price is a ban.

A step of more than ``step_tokens`` tokens (a long prompt) is sent as several consecutive
steps; each step's deadline scales with the work it asks (``rules.step_timeout_s``).

Money has one source of truth, ``payments`` (per peer: tokens computed, credits paid or,
without ``Funding``, owed as receipted); ``cost`` is their sum. With ``Funding`` each step
to a priced hop carries a cumulative voucher paying for it in advance; with a ``max_cost``
a step that would take the total past it raises ``CostLimitExceeded`` before paying.

Audits (``layerchain.client.audit``): each hop keeps its receipts' commitments beside its
inputs and counts the steps an audit ``verified``. A session made with
``pay_when_verified`` pays an audited hop's steps only once they are cleared (``clear``;
within the node's credit, ``layerchain.market.credit``), never those an audit disputed
(``dispute``); a hop no one can audit (``trusted``) is paid in advance. A session can also
cover only ``blocks`` ``(start, end)`` and leave ``exclude``-d peers out: the auditor's
shadow sessions and referees are such sessions. ``restart`` reopens the whole route and
replays a prefix: the rollback of a generation to its last verified point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace

import torch

from layerchain.client.config import RouteLimits
from layerchain.client.funding import Funding
from layerchain.client.peers import PeerView
from layerchain.client.push import PushMode, reopen_hop, push_through
from layerchain.client.rules import (
    Verdict,
    check_output,
    exceeds_announced,
    judge,
    short_of_room,
    split_steps,
    step_timeout_s,
)
from layerchain.discovery import PeerRecord
from layerchain.errors import (
    CostLimitExceeded,
    InvalidOutput,
    InvalidReceipt,
    LayerchainError,
    NoRoute,
)
from layerchain.market import ReceiptVerifier, reservation_amount, step_amount, tokens_of
from layerchain.market.credit import credit_amount
from layerchain.routing import RoutePlan
from layerchain.types import Hop
from layerchain.wire import messages as m
from layerchain.wire.compress import to_wire

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


@dataclass(frozen=True)
class HopPayment:
    """What one peer computed for a generation and what it was paid (or is owed)."""

    peer_id: str
    address: str  # the peer's wallet, the receipts' signer
    price_per_block: int
    blocks: int  # blocks of its (last) hop
    tokens: int = 0  # token positions it computed and receipted, replays included
    amount: int = 0  # credits paid in advance by voucher, or (unpaid) owed per receipt


@dataclass
class HopSession:
    """One hop's session on one peer, with the inputs kept for replay."""

    hop: Hop
    session_id: str
    record: PeerRecord  # the peer's announcement when the session opened: price, wallet, speed
    verifier: ReceiptVerifier
    reserved: int = 0  # credits reserved on the peer's channel and not paid yet
    inputs: list[torch.Tensor] = field(default_factory=list)  # [1, T_i, H] per step
    receipts: list[bytes] = field(default_factory=list)  # the signed receipt of each step
    commitments: list[bytes] = field(default_factory=list)  # each receipt's fingerprint
    verified: int = 0  # steps 0..verified-1 agree with an audit (or need none)
    cleared: int = 0  # steps 0..cleared-1 are cleared for payment
    trusted: bool = False  # no peer could audit this hop: paid in advance, released as run
    disputed: bool = False  # an audit found it lying: nothing from the disputed step is paid

    @property
    def blocks(self) -> int:
        return self.hop.end - self.hop.start


class HopFailed(Exception):
    """A hop's peer failed us; caught inside the session, never raised out of it."""

    def __init__(self, peer_id: str, verdict: Verdict, error: LayerchainError) -> None:
        super().__init__(f"peer {peer_id}: {error}")
        self.peer_id, self.verdict, self.error = peer_id, verdict, error


class InferenceSession:
    """Pushes hidden states through a route of hops; one call of ``step`` per decode step."""

    def __init__(
        self,
        peers: PeerView,
        max_length: int,
        *,
        step_tokens: int = m.MAX_STEP_TOKENS,
        funding: Funding | None = None,
        limits: RouteLimits | None = None,
        max_cost: int | None = None,
        blocks: tuple[int, int | None] = (0, None),
        exclude: frozenset[str] = frozenset(),
        pay_when_verified: bool = False,
        budget: InferenceSession | None = None,
    ) -> None:
        self.peers = peers
        self.config = peers.config
        # this session's routing limits and cost cap, credits (None: the client's)
        self.limits = self.config.limits if limits is None else limits
        self.max_cost = self.config.max_cost if max_cost is None else max_cost
        self.funding = funding
        self.max_length = max_length  # tokens each hop's cache must hold: prompt + new tokens
        self.step_tokens = step_tokens  # most tokens sent in one Step
        self.hops: list[HopSession] = []
        self.recoveries: list[Recovery] = []
        self.steps = 0
        self.hop_seconds = 0.0  # wall time spent waiting on hops, all steps
        self.step_seconds = 0.0  # wall time of the last step through the route, s
        self.node_ms: list[float] = []  # the last step's compute_ms of each hop call (client.timing)
        self.payments: dict[str, HopPayment] = {}  # peer id -> what it computed and was paid
        self.blocks = blocks  # (start, end) the route covers; end None: the last block
        self.exclude = exclude  # peers never planned into this session (audited ones)
        self.pay_when_verified = pay_when_verified  # audited hops are paid once cleared
        self.committed = 0  # credits paid or owed for work asked, disputed work included
        # the session whose max_cost (and committed credits) this one shares: an audit's
        # work counts against the generation it audits
        self.budget = budget or self
        self.retired: list[HopSession] = []  # hops replaced by failover, with their history
        self._opened: dict[str, HopSession] = {}  # wallet -> a hop opened on it (to settle)
        self._closing: set[asyncio.Task[None]] = set()  # failed hops closed in the background
        # hops forward to each other (client.push): forced, or auto past a minimum gain
        self.push = PushMode(self.config.push, self.config.push_min_gain_ms)
        self.wire = self.config.wire_form  # the form hidden states travel in, both ways

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    @property
    def cost(self) -> int:
        """Credits paid (with funding) or owed (without), all peers, replays included."""
        return sum(p.amount for p in self.payments.values())

    @property
    def work_tokens(self) -> int:
        """Tokens of work (billed) one hop's session may ask at most: every cache token
        once (a training session, ``train.remote``, asks more of the same cache budget)."""
        return self.max_length

    def price_per_token(self) -> int:
        """Credits one token costs on the current route."""
        return sum(hs.blocks * hs.verifier.price_per_block for hs in self.hops)

    # ---------------------------------------------------------------- opening and closing

    async def open(self, prompt_tokens: int = 0, attempts: int = 4) -> None:
        """Plan a route and open a session on each hop; a peer that fails is blamed and the
        route planned again, without the peers too short of cache for this session.
        CostLimitExceeded, before any session is opened (or paid for), when ``prompt_tokens``
        alone would cost more than ``max_cost`` on the planned route."""
        last: HopFailed | None = None
        for attempt in range(1, attempts + 1):
            skip = short_of_room(self.peers.records.values(), self.max_length) | self.exclude
            plan = self._plan(*self.blocks, skip, last)
            self._check_prompt_cost(plan.hops, prompt_tokens)
            try:
                self.hops = await self._open_hops(plan.hops)
                return
            except HopFailed as failure:
                self._blame(failure)
                last = failure
                if attempt == attempts:
                    raise failure.error from None
                if failure.verdict is Verdict.STALE:
                    await self._reread_offer(failure)

    def _check_prompt_cost(self, hops: tuple[Hop, ...], prompt_tokens: int) -> None:
        if self.max_cost is None:
            return
        records = self.peers.records
        cost = prompt_tokens * sum(
            (h.end - h.start) * records[h.peer_id].price_per_block for h in hops
        )
        if cost > self.max_cost:
            raise CostLimitExceeded(
                f"the prompt alone costs {cost} credits on the route, more than max_cost "
                f"{self.max_cost}",
                hint="raise --max-cost (max_cost=), shorten the prompt or set --max-price",
            )

    def _plan(self, start: int, end: int | None, skip: set[str], last: HopFailed | None) -> RoutePlan:
        """The route over ``[start, end)`` without ``skip``; a NoRoute names the last failure
        (what the peer that is now left out answered)."""
        try:
            return self.peers.plan(start, end, skip, self.limits)
        except NoRoute as error:
            if last is None:
                raise
            raise NoRoute(f"{error}; the last peer tried failed: {last}") from last.error

    async def _open_hops(self, hops: tuple[Hop, ...] | list[Hop]) -> list[HopSession]:
        """Open every hop in order; on failure close those opened and re-raise."""
        opened: list[HopSession] = []
        try:
            for hop in hops:
                opened.append(await self._open_hop(hop))
        except BaseException:
            for hs in opened:
                self._close_later(hs)
            raise
        return opened

    async def _open_hop(self, hop: Hop) -> HopSession:
        """Open a session on ``hop``; it counts in the peer's load (``PeerView``) from the
        moment it is planned, so generations planning meanwhile already see it."""
        session_id = uuid.uuid4().hex
        self.peers.session_opened(hop.peer_id, session_id)
        try:
            return await self._open_session(hop, session_id)
        except BaseException:
            self.peers.session_closed(hop.peer_id, session_id)
            raise

    async def _open_session(self, hop: Hop, session_id: str) -> HopSession:
        record = self.peers.records[hop.peer_id]
        verifier = ReceiptVerifier(
            record.wallet, session_id, self.peers.model_id, hop.span, record.price_per_block
        )
        hs = HopSession(hop, session_id, record, verifier)
        self._opened.setdefault(record.wallet, hs)
        voucher = b""
        if self.funding is not None and record.price_per_block > 0:
            # the most this session can pay the peer: the reservation fee a priced node
            # charges to open it, then every cache token through its blocks
            fee = reservation_amount(self.max_length, hs.blocks, record.price_per_block)
            hs.reserved = fee + step_amount(self.work_tokens, hs.blocks, record.price_per_block)
            self.funding.reserve(record.wallet, hs.reserved)  # InsufficientFunds: the wallet's
            try:
                voucher = self._pay(hs, fee, cleared=True)  # CostLimitExceeded: the request's
            except BaseException:
                self._release(hs)
                raise
        try:
            rpc = await self.peers.client(hop.peer_id)
            await rpc.call(
                m.OpenSession(rid=0, session_id=session_id, model_id=self.peers.model_id,
                              start=hop.start, end=hop.end, max_length=self.max_length,
                              voucher=voucher, price_per_block=record.price_per_block,
                              wire=self.wire),
                timeout=self.config.step_timeout_s,
            )
        except LayerchainError as error:
            self._release(hs)
            raise self._failure(record, error, tokens=0) from error
        return hs

    def _release(self, hs: HopSession) -> None:
        if self.funding is not None and hs.reserved:
            self.funding.release(hs.record.wallet, hs.reserved)
            hs.reserved = 0

    async def _close_hop(self, hs: HopSession) -> None:
        self._release(hs)
        self.peers.session_closed(hs.hop.peer_id, hs.session_id)
        try:
            rpc = await self.peers.client(hs.hop.peer_id)
            await rpc.call(m.CloseSession(rid=0, session_id=hs.session_id), timeout=1.0)
        except (LayerchainError, KeyError):
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

    # ---------------------------------------------------------------- verdicts

    def _failure(self, record: PeerRecord, error: LayerchainError, tokens: int) -> HopFailed:
        """The hop failure for ``error`` from ``record``'s peer, with the verdict on it; the
        request is judged against ``record``, the announcement the route was planned on (a
        later one counts this session's own reservation)."""
        peer_id = record.peer_id
        verdict = judge(error, exceeds_announced(record, self.max_length, tokens))
        return HopFailed(peer_id, verdict, error)

    def _blame(self, failure: HopFailed) -> None:
        """Ban a peer that failed; avoid (for ``busy_avoid_s``) one that was busy or that this
        request is too large for."""
        if failure.verdict is Verdict.BAN:
            self.peers.ban(failure.peer_id, str(failure.error))
        elif failure.verdict is Verdict.STALE:  # our record is old: ``_reread_offer``
            log.info("peer %s re-priced: %s", failure.peer_id, failure.error)
        else:
            self.peers.avoid(failure.peer_id, self.config.busy_avoid_s, str(failure.error))

    async def _reread_offer(self, failure: HopFailed, *, step: bool = False) -> None:
        """The peer's offer changed since the record we planned with (``Verdict.STALE``: its
        price, or its span after a move): re-read the records, so the next plan sees the new
        offer (within ``limits``, or routed elsewhere). If its record still shows the old
        one, it is avoided for ``busy_avoid_s`` (at open: the DHT may not have its
        re-announcement yet), or banned when it said so of a ``step`` (a node announces its
        move before it closes the sessions it drains: a peer failing steps so is lying)."""
        planned = self.peers.records.get(failure.peer_id)
        await self.peers.refresh(force=True)
        now = self.peers.records.get(failure.peer_id)
        if planned is not None and now is not None and _offer(now) == _offer(planned):
            reason = f"its record still says {_offer(planned)}: {failure.error}"
            if step:
                self.peers.ban(failure.peer_id, reason)
            else:
                self.peers.avoid(failure.peer_id, self.config.busy_avoid_s, reason)

    # ---------------------------------------------------------------- steps

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``hidden`` [1, T, H] through every hop (in Steps of at most ``step_tokens``
        tokens); return the last hop's output [1, T, H]."""
        t0 = time.perf_counter()
        self.node_ms = []
        outputs = [await (push_through(self, part) if self.push.use(self) else
                          self._through_hops(part))
                   for part in (to_wire(x, self.wire)  # what the first hop decodes
                                for x in split_steps(hidden, self.step_tokens))]
        self.steps += 1
        self.step_seconds = time.perf_counter() - t0
        self.hop_seconds += self.step_seconds
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return out.to(hidden.dtype)  # the caller's dtype, whatever the wire's (no copy if same)

    async def _through_hops(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pull mode: each hop in turn gets the output of the one before. Pipelined: hop i's
        answer goes on to hop i+1 as soon as it arrives in the right shape (``_forwardable``)
        and is checked (``_accept``: values, receipt, commitment) while hop i+1 computes, so
        the client's checks leave the critical path but for the last hop's. If the check
        fails, hop i+1 ran on an output the client cannot vouch for: its call is dropped and
        it gets a new session on the same peer rebuilt from the inputs the client holds
        (``client.push.reopen_hop``, blaming nobody), hop i is failed over as always, and the
        step goes on from hop i: the same answer, the same bans as checking first."""
        i = 0
        digest: bytes | None = None  # sha256 of ``hidden`` when known (a checked receipt's)
        ahead: _Ahead | None = None  # hop i's call, sent before hop i-1's answer was checked
        deferred: LayerchainError | None = None  # paying hop i+1 ahead failed: raised after
        try:  # hop i's check, where checking first would have raised it
            while i < len(self.hops):
                hs = self.hops[i]
                try:
                    if ahead is not None and ahead.hs is hs:
                        call, ahead = ahead, None
                        sent, voucher = call.sent, call.voucher
                        reply, seconds = await call.task
                    else:
                        sent, voucher = self._prepare(hs, hidden)
                        reply, seconds = await self._send_step(hs, sent, voucher)
                    onward = _forwardable(sent, reply) if i + 1 < len(self.hops) else None
                    if onward is not None:
                        try:
                            ahead = await self._send_ahead(self.hops[i + 1], onward)
                        except LayerchainError as error:  # before anything was sent
                            deferred = error
                    try:
                        hidden, digest = self._check(
                            hs, sent, reply, voucher, seconds, digest if sent is hidden else None)
                    except HopFailed:
                        if ahead is not None:  # it ran on what failed: drop its step
                            await ahead.drop()
                            ahead = None
                            await reopen_hop(self, i + 1)
                        raise
                    i += 1
                except HopFailed as failure:
                    await self._recover(i, failure)
                if deferred is not None:
                    raise deferred
        finally:
            if ahead is not None:  # cancelled, or an error raised past it
                await ahead.drop()
        return hidden

    async def _call(
        self, hs: HopSession, hidden: torch.Tensor, voucher: bytes | None = None
    ) -> torch.Tensor:
        """One Step on one hop: pay (unless given the ``voucher`` paid for this step already
        and never spent: push mode's fallback), call, check what came back, count it."""
        hidden, voucher = self._prepare(hs, hidden, voucher)
        reply, seconds = await self._send_step(hs, hidden, voucher)
        return self._accept(hs, hidden, reply, voucher, seconds)

    def _prepare(
        self, hs: HopSession, hidden: torch.Tensor, voucher: bytes | None = None
    ) -> tuple[torch.Tensor, bytes]:
        """(``hidden`` in the wire's form, the voucher paying ``hs`` for a step over it):
        paid here unless ``voucher`` is given. Call it right before the step is sent, with
        no await in between: vouchers go out in order."""
        tokens = tokens_of(hidden)
        hidden = to_wire(hidden, self.wire)  # kept, hashed and sent as the node decodes it
        if voucher is None:
            voucher = self._pay(hs, step_amount(tokens, hs.blocks, hs.verifier.price_per_block))
        return hidden, voucher

    async def _send_step(
        self, hs: HopSession, hidden: torch.Tensor, voucher: bytes
    ) -> tuple[m.Message, float]:
        """Send ``hs`` its next Step over ``hidden`` (as ``_prepare`` made it); its answer,
        not checked yet, and the call's wall time (s). HopFailed if the call fails."""
        tokens = tokens_of(hidden)
        timeout = self._step_timeout(hs, tokens)
        t0 = time.perf_counter()
        try:
            rpc = await self.peers.client(hs.hop.peer_id)
            reply = await rpc.call(
                m.Step(rid=0, session_id=hs.session_id, step=hs.verifier.next_step,
                       hidden=hidden, voucher=voucher),
                timeout=timeout,
            )
        except LayerchainError as error:
            raise self._failure(hs.record, error, tokens) from error
        return reply, time.perf_counter() - t0

    async def _send_ahead(self, hs: HopSession, hidden: torch.Tensor) -> _Ahead:
        """Pay and send ``hs`` its Step over ``hidden`` (another hop's answer, not checked
        yet); returns once the frame is written (the call's task ran to its first wait), so
        the checks that follow overlap with the hop's compute. Raises what paying raises,
        before anything is sent."""
        sent, voucher = self._prepare(hs, hidden)
        task = asyncio.ensure_future(self._send_step(hs, sent, voucher))
        await asyncio.sleep(0)  # one loop turn: the task dials (a live link: no wait), sends
        return _Ahead(hs, sent, voucher, task)

    def _accept(
        self, hs: HopSession, hidden: torch.Tensor, reply: m.Message, voucher: bytes,
        seconds: float | None,
    ) -> torch.Tensor:
        """Check ``hs``'s answer to a step over ``hidden`` (its output and receipt), count
        it, keep the input; HopFailed if it is wrong. ``seconds``: the call's wall time, a
        sample of the peer's speed (None: not one; push mode passes the time after the answer
        of the hop before, ``client.push``)."""
        return self._check(hs, hidden, reply, voucher, seconds)[0]

    def _check(
        self, hs: HopSession, hidden: torch.Tensor, reply: m.Message, voucher: bytes,
        seconds: float | None, digest: bytes | None = None,
    ) -> tuple[torch.Tensor, bytes]:
        """``_accept``, also returning the sha256 of the output (``tensor_sha256``, the
        checked receipt's): the next hop's input digest. ``digest``: that of ``hidden`` when
        known (the hop before's output), else hashed here."""
        peer_id, tokens = hs.hop.peer_id, tokens_of(hidden)
        amount = step_amount(tokens, hs.blocks, hs.verifier.price_per_block)
        try:
            if not isinstance(reply, m.StepResult):  # rpc checks it; this tells the type checker
                raise InvalidOutput(f"peer {peer_id} answered a Step with {type(reply).__name__}")
            out = reply.hidden
            check_output(peer_id, hidden, out, model_id=self.peers.model_id, end=hs.hop.end,
                         # the first routed block's input is ours (also in a replay);
                         # an audit's session of a later hop replays another peer's output
                         input_trusted=hs.hop.start == self.budget.blocks[0])
            if not reply.receipt:
                raise InvalidReceipt(f"peer {peer_id} sent no receipt for step {hs.verifier.next_step}")
            # advances next_step; the input's digest stands for it when known
            receipt = hs.verifier.check(reply.receipt, digest or hidden, out, tokens)
        except LayerchainError as error:
            raise self._failure(hs.record, error, tokens) from error
        if seconds is not None:
            self.peers.observe_step(peer_id, hs.blocks, tokens, seconds)
        self.node_ms.append(reply.compute_ms)
        self._count(hs, tokens, 0 if voucher or self._lagging(hs) else amount)
        hs.inputs.append(hidden)
        hs.receipts.append(reply.receipt)
        hs.commitments.append(receipt.fingerprint)
        if not self._lagging(hs):  # paid (or owed) in advance: nothing left to clear
            hs.cleared = len(hs.inputs)
        return out, receipt.output_sha256

    def _step_timeout(self, hs: HopSession, tokens: int) -> float:
        """Seconds the step may take: scaled to the work at the slower of the peer's claimed
        and measured speed (a peer that under-claims still gets the time it needs)."""
        ms = hs.record.ms_per_block
        if tokens > 1 and hs.hop.peer_id in self.peers.records:  # not on the decode path
            ms = max(ms, self.peers.speed(hs.hop.peer_id))
        return step_timeout_s(self.config, tokens, hs.blocks, ms)

    def _lagging(self, hs: HopSession) -> bool:
        """Whether ``hs``'s steps are paid once an audit clears them (not in advance)."""
        return self.pay_when_verified and not hs.trusted

    def _pay(self, hs: HopSession, amount: int, *, cleared: bool = False) -> bytes:
        """The voucher to send with the next request, worth ``amount`` (b"" when nothing is
        paid): paying it in advance, or on a lagging hop what audits cleared and what the
        node's credit requires (``cleared``: this amount needs no audit, a reservation fee).
        CostLimitExceeded, before paying, when it would take the cost past ``max_cost``."""
        budget = self.budget
        if budget.max_cost is not None and budget.committed + amount > budget.max_cost:
            raise CostLimitExceeded(
                f"the next step costs {amount} credits and {budget.committed} are spent: "
                f"more than max_cost {budget.max_cost}",
                hint="raise --max-cost (max_cost=) or lower max_new_tokens",
            )
        budget.committed += amount
        if self.funding is None or (amount == 0 and not self._lagging(hs)):
            return b""
        if hs.verifier.price_per_block == 0:
            return b""
        record = hs.record
        credit = credit_amount(record.end - record.start, record.price_per_block)
        if cleared or not self._lagging(hs):  # paid in advance: needs no audit to be paid
            self.funding.clear(record.wallet, amount)
        voucher, paid = self.funding.owe(
            record.wallet, amount, credit if self._lagging(hs) else 0
        )
        hs.reserved = max(0, hs.reserved - paid)
        self._count(hs, 0, paid)  # paid now, whatever the peer does with it
        return voucher

    # ---------------------------------------------------------------- audits' verdicts

    def step_amount(self, hs: HopSession, step: int) -> int:
        """Credits step ``step`` of ``hs`` is worth."""
        return step_amount(tokens_of(hs.inputs[step]), hs.blocks, hs.verifier.price_per_block)

    def clear(self, hs: HopSession, steps: int) -> None:
        """Steps ``hs.cleared .. steps-1`` of ``hs`` were verified: pay them (with the next
        voucher to the peer, or ``settle``), or count them owed without funding."""
        if hs.disputed:
            return
        amount = sum(self.step_amount(hs, i) for i in range(hs.cleared, steps))
        hs.cleared = max(hs.cleared, steps)
        if amount == 0 or not self.pay_when_verified:
            return
        if self.funding is not None:
            self.funding.clear(hs.record.wallet, amount)
        else:
            self._count(hs, 0, amount)

    def dispute(self, hs: HopSession, step: int) -> int:
        """Steps ``step..`` of ``hs`` were found wrong: never paid (nor counted owed), nor
        any it runs later. Returns the credits refused (again: those run since)."""
        amount = sum(self.step_amount(hs, i) for i in range(max(step, hs.cleared), len(hs.inputs)))
        hs.cleared = len(hs.inputs)  # settled: nothing more of it is cleared
        hs.disputed = True
        self.budget.committed -= amount
        if self.funding is not None and self.pay_when_verified and amount:
            self.funding.dispute(hs.record.wallet, amount)
        return amount

    def trust(self, hs: HopSession) -> None:
        """No peer can audit ``hs``: take its steps as run, pay them, pay later ones ahead."""
        self.clear(hs, len(hs.inputs))
        hs.verified = len(hs.inputs)
        hs.trusted = True

    async def settle(self) -> None:
        """Pay what audits cleared after the last step (``Funding.flush``)."""
        if self.funding is None:
            return
        for wallet, hs in list(self._opened.items()):
            paid = await self.funding.flush(wallet)
            if paid:
                self._count(hs, 0, paid)

    def absorb(self, other: InferenceSession) -> None:
        """Count what ``other`` (an audit's session) computed and cost as this session's."""
        for peer_id, p in other.payments.items():
            mine = self.payments.get(peer_id)
            self.payments[peer_id] = p if mine is None else replace(
                mine, tokens=mine.tokens + p.tokens, amount=mine.amount + p.amount
            )
        if other.budget is not self:  # a budget of its own: its credits join this one's
            self.committed += other.committed
        other.payments = {}
        other.committed = 0

    async def restart(self, prefix: torch.Tensor | None) -> list[HopSession]:
        """Roll back: close every hop, open a new route (without the banned peers) and push
        ``prefix`` [1, P, H] (the inputs of the verified steps) through it, rebuilding the
        caches; its output is not needed. Returns the hops closed (for their accounts)."""
        old = self.hops + self.retired
        for hs in self.hops:
            self._close_later(hs)
        self.hops, self.retired = [], []
        await self.open()
        if prefix is not None and prefix.shape[1]:
            for part in split_steps(prefix, self.step_tokens):
                await self._through_hops(part)
        return old

    def _count(self, hs: HopSession, tokens: int, amount: int) -> None:
        peer_id = hs.hop.peer_id
        paid = self.payments.get(peer_id) or HopPayment(
            peer_id, hs.record.wallet, hs.verifier.price_per_block, hs.blocks
        )
        self.payments[peer_id] = replace(
            paid, blocks=hs.blocks, tokens=paid.tokens + tokens, amount=paid.amount + amount
        )

    # ---------------------------------------------------------------- failover

    async def _recover(self, index: int, failure: HopFailed) -> None:
        """Replace hop ``index`` by a freshly planned chain; rebuild its caches by replay."""
        t0 = time.perf_counter()
        failed = self.hops[index]
        self._blame(failure)
        if failure.verdict is Verdict.STALE:  # a node that moved closed our session
            await self._reread_offer(failure, step=True)
        if len(self.recoveries) >= self.config.max_recoveries:
            raise NoRoute(
                f"gave up after {len(self.recoveries)} failovers; last: {failure}"
            ) from failure.error
        others = {h.hop.peer_id for j, h in enumerate(self.hops) if j != index}
        last = failure
        for attempt in range(1, 5):
            await self.peers.refresh(force=attempt > 1)
            skip = others | short_of_room(self.peers.records.values(), self.max_length)
            plan = self._plan(failed.hop.start, failed.hop.end, skip | self.exclude, last)
            replacement: list[HopSession] = []
            try:
                replacement = await self._open_hops(plan.hops)
                for x in regroup(failed.inputs, self.step_tokens):  # replay, step by step
                    for hs in replacement:
                        x = await self._call(hs, x)
                break
            except HopFailed as again:
                log.warning("recovery attempt %d failed: %s", attempt, again)
                self._blame(again)
                last = again
                for hs in replacement:
                    self._close_later(hs)
                if attempt == 4:
                    raise again.error from None
                if again.verdict is Verdict.STALE:
                    await self._reread_offer(again)
        self._close_later(failed)
        self.retired.append(failed)  # its steps still count: audits check them too
        self.hops[index : index + 1] = replacement
        rec = Recovery(
            peer_id=failed.hop.peer_id,
            start=failed.hop.start,
            end=failed.hop.end,
            step=self.steps,
            reason=str(failure.error),
            seconds=time.perf_counter() - t0,
            replacement=tuple(h.hop for h in replacement),
        )
        self.recoveries.append(rec)
        log.warning(
            "recovered from peer %s at step %d in %.2f s: blocks %d:%d now on %s",
            rec.peer_id, rec.step, rec.seconds, rec.start, rec.end,
            ", ".join(h.peer_id for h in rec.replacement),
        )


@dataclass
class _Ahead:
    """A hop's call sent before the answer it carries was checked (``_through_hops``)."""

    hs: HopSession
    sent: torch.Tensor  # its input, in the wire's form
    voucher: bytes
    task: asyncio.Future[tuple[m.Message, float]]  # -> (answer, wall time s); HopFailed

    async def drop(self) -> None:
        """Cancel the call (its answer, or failure, no longer matters)."""
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


def _forwardable(sent: torch.Tensor, reply: m.Message) -> torch.Tensor | None:
    """The output in ``reply`` to a Step over ``sent`` if it may go on to the next hop
    before it is checked: a StepResult with a receipt and an output of the input's shape and
    dtype; else None (such an answer fails its check: sending it on would be wasted)."""
    if not isinstance(reply, m.StepResult) or not reply.receipt:
        return None
    out = reply.hidden
    return out if out.shape == sent.shape and out.dtype == sent.dtype else None


def _offer(record: PeerRecord) -> tuple[int, int, int]:
    """What a peer offers: (price per block, start, end)."""
    return record.price_per_block, record.start, record.end


def regroup(inputs: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    """Consecutive inputs [1, T_i, H] joined into as few tensors of <= ``max_tokens``
    tokens as keeps their order (each input is at most ``max_tokens`` already)."""
    groups: list[list[torch.Tensor]] = []
    size = max_tokens
    for x in inputs:
        if size + x.shape[1] > max_tokens:
            groups.append([])
            size = 0
        groups[-1].append(x)
        size += x.shape[1]
    return [g[0] if len(g) == 1 else torch.cat(g, dim=1) for g in groups]

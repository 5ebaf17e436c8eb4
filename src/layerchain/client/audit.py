"""Audits: the client re-executes hops on other peers and acts on a mismatch.

Every receipt carries a commitment of the hop's output (``market.commitment``, checked
against the tensor received on every step). An ``Auditor`` watches one generation's
``InferenceSession``; for each hop session it keeps a **shadow session** on another peer
serving the same blocks (never the audited one), fed the hop's kept inputs as prefill
chunks: one audit compares every step since the last one, so every step is checked in
the end and ``audit_rate`` only sets how soon. After each decode step each hop is picked
with probability ``audit_rate`` (the dice: a cheater cannot tell which steps are looked
at first), and always once it holds ``SCHEDULE_TOKENS`` unverified tokens; a step that
would leave more than ``CREDIT_TOKENS`` unverified (the node's credit, ``market.credit``)
waits for the audit. Audits run as tasks beside the decode loop (on other peers).

A mismatch (``commitment_distance`` above ``AUDIT_TOLERANCE``) goes to a **referee**: a
third peer (neither the accused nor the auditor) recomputes steps ``0..k``. Whoever it
disagrees with lied and is banned (by peer id and wallet, for ``ban_max_s``: a proven
liar). With no referee, or one agreeing with neither, both are banned as for a failure
and the hop is rolled back all the same, without evidence. No peer paid to the wallet of
the accused (or, for a referee, of an auditor) takes part: a node never checks itself.

When the accused lied: its steps from ``k`` on are never paid (``dispute``); an
``Evidence`` (``ledger.evidence``) is signed by the client's wallet and, with a ledger,
checked with the model here and submitted only when it convicts (the accused's stake is
slashed; a refused accusation would cost the client its bond); and the ``Dispute`` asks
the decode loop to roll back to the last verified point (``settled_position``) and resume
on honest peers.

A hop no other peer can audit is **trusted** (logged, paid in advance): audits need
spares. What a stream consumer sees: with audits on, a token is yielded only once every
hop's steps up to it are verified, so a rollback never takes back a token already shown
(``layerchain.client.swarm``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field, replace

import torch

from layerchain.client.session import HopSession, InferenceSession, regroup
from layerchain.errors import CostLimitExceeded, LayerchainError, NoRoute
from layerchain.ledger.base import SlashResult
from layerchain.ledger.evidence import Evidence, check_evidence, make_evidence
from layerchain.ledger.signatures import Signer
from layerchain.market.commitment import AUDIT_TOLERANCE, commit, commitment_distance
from layerchain.market.credit import CREDIT_TOKENS
from layerchain.model.spec import ModelSpec

log = logging.getLogger(__name__)

# The default audit rate (ClientConfig.audit_rate, 1/16): the always-cheater is caught
# within 64 tokens in >= 95% of runs when 1 - (1 - r)^64 >= 0.95, r >= 0.046; an audit
# checks every step since the last, so a 20%-of-steps cheater is caught at the same audit.
# SCHEDULE_TOKENS bounds it whatever the dice say.
SCHEDULE_TOKENS = 32  # an audit starts once a hop holds this many unverified tokens
MAX_AUDIT_FAILURES = 3  # audits of one hop that may fail (their peers) before it is trusted


@dataclass(frozen=True)
class Dispute:
    """A hop caught computing wrong, what the referee said, and what it cost the liar."""

    peer_id: str  # the liar
    address: str  # its wallet (the receipts' signer)
    start: int  # blocks of the hop
    end: int
    step: int  # the first wrong step of its session on that hop
    position: int  # the first token position that step covers
    distance: float  # its commitment's distance from the referee's recomputation
    referee: tuple[str, ...]  # peers that decided (empty: unresolved, the auditor banned too)
    unpaid: int  # credits of its work refused (steps ``step`` on)
    evidence: Evidence | None = field(default=None, repr=False)  # signed; None without a referee
    slashed: int = 0  # credits of its stake taken on the ledger (0: no ledger or no stake)


class _Shadow:
    """The audit session of one hop session, and how many of its steps it was fed."""

    def __init__(self, session: InferenceSession) -> None:
        self.session = session
        self.fed = 0


class Auditor:
    """Audits one generation's hops (see the module docstring)."""

    def __init__(
        self,
        session: InferenceSession,
        rate: float,
        *,
        accuser: Signer,
        rng: random.Random | None = None,
        submit: bool = False,  # slash on the ledger the client pays through
        spec: ModelSpec | None = None,  # the model, to check evidence before slashing
    ) -> None:
        self.session = session
        self.rate = rate
        self.accuser = accuser
        self.rng = rng or random.Random()
        self.submit = submit
        self.spec = spec
        self.model_name = spec.name if spec is not None else ""
        self.dispute: Dispute | None = None  # set when a liar is found: the loop rolls back
        self.disputes: list[Dispute] = []
        self.audited_steps = 0  # hop steps compared with a recomputation
        self.floor = 0  # token positions below it are settled (a rollback's verified prefix)
        self._shadows: dict[str, _Shadow] = {}  # hop session id -> its audit session
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, int] = {}  # hop session id -> audits of it that failed
        self._sums: dict[str, list[int]] = {}  # hop session id -> tokens in its first i steps
        self._background: set[asyncio.Task[None]] = set()  # shadows closing, slashing

    # ---------------------------------------------------------------- positions

    def _tracked(self) -> list[HopSession]:
        return [*self.session.retired, *self.session.hops]

    def _position(self, hs: HopSession, steps: int) -> int:
        """Tokens in ``hs``'s first ``steps`` steps (prefix sums kept as steps are added:
        this runs for every hop after every step, so it must not walk the history)."""
        sums = self._sums.setdefault(hs.session_id, [0])
        for x in hs.inputs[len(sums) - 1 :]:
            sums.append(sums[-1] + int(x.shape[1]))
        return sums[steps]

    def settled_position(self) -> int:
        """Token positions every hop's output is verified for (or settled by a rollback)."""
        hops = self.session.hops
        position = self._position(hops[0], len(hops[0].inputs)) if hops else 0
        for hs in self._tracked():
            if not hs.trusted and hs.verified < len(hs.inputs):
                position = min(position, self._position(hs, hs.verified))
        return max(self.floor, position)

    def _unverified_tokens(self, hs: HopSession) -> int:
        return self._position(hs, len(hs.inputs)) - self._position(hs, hs.verified)

    # ---------------------------------------------------------------- scheduling

    def after_step(self) -> None:
        """Roll the dice for each hop (and audit one holding ``SCHEDULE_TOKENS`` unverified
        tokens, or replaced by failover, at once)."""
        if self.dispute is not None:
            return
        current = {hs.session_id for hs in self.session.hops}
        for hs in self._tracked():
            running = self._tasks.get(hs.session_id)
            if hs.trusted or hs.verified >= len(hs.inputs) or (running and not running.done()):
                continue
            if (
                hs.session_id not in current
                or self._unverified_tokens(hs) >= SCHEDULE_TOKENS
                or self.rng.random() < self.rate
            ):
                self._start(hs)

    async def make_room(self, tokens: int) -> None:
        """Before a step of ``tokens`` tokens: wait for the audits of hops that would hold
        more than ``CREDIT_TOKENS`` unverified (their node's credit) otherwise."""
        for hs in list(self.session.hops):
            while (
                self.dispute is None and not hs.trusted and hs.verified < len(hs.inputs)
                and self._unverified_tokens(hs) + tokens > CREDIT_TOKENS
            ):
                await self._await(hs)

    async def finish(self) -> bool:
        """Audit every step not verified yet; False when that found a liar (roll back)."""
        while self.dispute is None:
            pending = [
                hs for hs in self._tracked() if not hs.trusted and hs.verified < len(hs.inputs)
            ]
            if not pending:
                return True
            await asyncio.gather(*(self._await(hs) for hs in pending))
        return False

    def _start(self, hs: HopSession) -> asyncio.Task[None]:
        task = self._tasks.get(hs.session_id)
        if task is None or task.done():  # done: its callback may not have run yet
            task = asyncio.get_running_loop().create_task(self._audit(hs, len(hs.inputs)))
            self._tasks[hs.session_id] = task
            task.add_done_callback(lambda t: self._forget(hs.session_id, t))
        return task

    def _forget(self, key: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]

    async def _await(self, hs: HopSession) -> None:
        await asyncio.shield(self._start(hs))

    # ---------------------------------------------------------------- one audit

    def _new_session(self, hs: HopSession, exclude: set[str]) -> InferenceSession:
        """A session over ``hs``'s blocks on peers other than ``exclude`` and any peer paid
        to the same wallet as one of them (a node never audits itself under another id)."""
        s = self.session
        records = s.peers.records
        wallets = {records[p].wallet.lower() for p in exclude if p in records and records[p].wallet}
        exclude = exclude | {p for p, r in records.items() if r.wallet.lower() in wallets}
        return InferenceSession(
            s.peers, s.max_length, step_tokens=s.step_tokens, funding=s.funding,
            limits=s.limits, max_cost=s.max_cost, blocks=(hs.hop.start, hs.hop.end),
            exclude=frozenset(exclude),
            budget=s,  # audits are paid within the generation's max_cost
        )

    async def _replay(self, session: InferenceSession, inputs: list[torch.Tensor]) -> torch.Tensor:
        """``inputs`` (consecutive steps) through ``session`` as few prefill chunks; the
        outputs [1, sum T_i, H]."""
        outs = [await session.step(x) for x in regroup(inputs, session.step_tokens)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    async def _audit(self, hs: HopSession, target: int) -> None:
        """Compare steps ``hs.verified .. target-1`` with a recomputation on another peer."""
        try:
            shadow = self._shadows.get(hs.session_id)
            if shadow is None:
                session = self._new_session(hs, {hs.hop.peer_id})
                try:
                    await session.open()
                except LayerchainError as error:  # NoRoute: no one else serves these blocks
                    # a swarm without spares is usual, not alarming: info, not a warning
                    level = logging.INFO if isinstance(error, NoRoute) else logging.WARNING
                    self._trust(hs, f"no peer can audit it ({error})", level)
                    return
                shadow = self._shadows[hs.session_id] = _Shadow(session)
            first = shadow.fed
            if first >= target:
                return
            out = await self._replay(shadow.session, hs.inputs[first:target])
            shadow.fed = target
            offset = 0
            for k in range(first, target):
                tokens = int(hs.inputs[k].shape[1])
                recomputed = out[:, offset : offset + tokens]
                offset += tokens
                if k < hs.verified:
                    continue
                self.audited_steps += 1
                distance = commitment_distance(hs.commitments[k], recomputed)
                if distance > AUDIT_TOLERANCE:
                    self.session.clear(hs, hs.verified)  # the steps before it were right
                    await self._contest(hs, k, recomputed, shadow, distance)
                    return
                hs.verified = k + 1
            self.session.clear(hs, hs.verified)
        except LayerchainError as error:  # the audit itself failed (its peers, max_cost)
            log.warning("audit of peer %s failed: %s", hs.hop.peer_id, error)
            self._drop_shadow(hs)
            failures = self._failures[hs.session_id] = self._failures.get(hs.session_id, 0) + 1
            if isinstance(error, CostLimitExceeded) or failures >= MAX_AUDIT_FAILURES:
                self._trust(hs, f"its audits failed {failures} time(s), last: {error}")
                return
            try:
                self.session.peers.plan(hs.hop.start, hs.hop.end, {hs.hop.peer_id})
            except NoRoute:
                self._trust(hs, f"its audit failed and no other peer serves it ({error})")

    def _trust(self, hs: HopSession, why: str, level: int = logging.WARNING) -> None:
        log.log(level, "hop %d:%d on peer %s is not audited: %s", hs.hop.start, hs.hop.end,
                hs.hop.peer_id, why)
        self.session.trust(hs)

    def _drop_shadow(self, hs: HopSession) -> None:
        shadow = self._shadows.pop(hs.session_id, None)
        if shadow is not None:
            self.session.absorb(shadow.session)
            task = asyncio.get_running_loop().create_task(shadow.session.close())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- a mismatch

    async def _contest(
        self, hs: HopSession, k: int, audited: torch.Tensor, shadow: _Shadow, distance: float
    ) -> None:
        """Step ``k`` of ``hs`` and its audit disagree: a referee decides who lied."""
        accused = hs.hop.peer_id
        auditors = {h.hop.peer_id for h in (*shadow.session.hops, *shadow.session.retired)}
        reference = await self._referee(hs, k, {accused, *auditors})
        peers = self.session.peers
        if reference is not None:
            referee_peers, ref = reference
            accused_ok = commitment_distance(hs.commitments[k], ref) <= AUDIT_TOLERANCE
            auditor_ok = commitment_distance(commit(audited), ref) <= AUDIT_TOLERANCE
            if accused_ok:  # the auditor lied (or both within tolerance: a near miss)
                for peer_id in auditors if not auditor_ok else ():
                    peers.ban(peer_id, f"its audit of step {k} disagreed with a referee",
                              proven=True)
                log.warning("audit of peer %s at step %d: the %s", accused, k,
                            "auditor lied" if not auditor_ok else "referee sided with both")
                self._drop_shadow(hs)
                hs.verified = max(hs.verified, k + 1)
                return
            distance = commitment_distance(hs.commitments[k], ref)
            proven = auditor_ok  # the referee agrees with the auditor, not the accused
        else:
            referee_peers, ref, proven = (), audited, False
        if not proven:  # no referee, or it agrees with neither: someone lied, not known who
            referee_peers = ()
            for peer_id in auditors:
                peers.ban(peer_id, f"disputed step {k} of peer {accused}, unresolved")
        peers.ban(accused, f"its output at step {k} is not what blocks "
                           f"{hs.hop.start}:{hs.hop.end} compute (distance {distance:.3g})",
                  proven=proven)
        unpaid = self.session.dispute(hs, k)
        evidence = None
        if proven:
            evidence = make_evidence(
                self.accuser, model_id=self.session.peers.model_id, start=hs.hop.start,
                end=hs.hop.end, receipts=hs.receipts[: k + 1], inputs=hs.inputs[: k + 1],
                referee_commitment=commit(ref), model_name=self.model_name,
            )
        dispute = Dispute(
            peer_id=accused, address=hs.record.wallet, start=hs.hop.start, end=hs.hop.end,
            step=k, position=self._position(hs, k), distance=distance,
            referee=tuple(referee_peers), unpaid=unpaid, evidence=evidence,
        )
        log.warning("peer %s lied at step %d (distance %.3g); banned, %d credits refused",
                    accused, k, distance, unpaid)
        self.dispute = dispute
        self.disputes.append(dispute)
        if evidence is not None and self.submit:
            self._slash_later(len(self.disputes) - 1)

    async def _referee(
        self, hs: HopSession, k: int, exclude: set[str]
    ) -> tuple[tuple[str, ...], torch.Tensor] | None:
        """A third peer's output of step ``k`` (fed steps ``0..k``), or None when none can."""
        session = self._new_session(hs, exclude)
        try:
            await session.open()
            out = await self._replay(session, hs.inputs[: k + 1])
            referees = tuple(h.hop.peer_id for h in session.hops)
        except LayerchainError as error:
            log.warning("no referee for step %d of peer %s: %s", k, hs.hop.peer_id, error)
            return None
        finally:
            self.session.absorb(session)
            await session.close()
        return referees, out[:, -int(hs.inputs[k].shape[1]) :]

    # ---------------------------------------------------------------- slashing

    def _slash_later(self, index: int) -> None:
        task = asyncio.get_running_loop().create_task(self._slash(index))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _slash(self, index: int) -> None:
        """Check the evidence with the model (blocks of the hop, loaded here) and record the
        verdict on the ledger the client pays through."""
        dispute = self.disputes[index]
        funding = self.session.funding
        if dispute.evidence is None or funding is None or funding.payer.ledger is None:
            return
        from layerchain.model import load_span

        if self.spec is None:
            return
        spec, ledger, evidence = self.spec, funding.payer.ledger, dispute.evidence

        def check_and_slash() -> SlashResult | None:
            # a worker thread: seconds of loading and recomputing must not stop the decode
            # loop (or a gateway's other requests); it happens once per caught liar
            span = load_span(spec, dispute.start, dispute.end)
            with torch.inference_mode():
                verdict = check_evidence(evidence, span)
            if not verdict.guilty:  # never accuse on what the ledger would refuse: the bond
                log.warning("not accusing peer %s: %s", dispute.peer_id, verdict.reason)
                return None
            return ledger.slash(self.accuser, verdict)

        try:
            result = await asyncio.to_thread(check_and_slash)
        except LayerchainError as error:
            log.warning("could not slash peer %s: %s", dispute.peer_id, error)
            return
        if result is None:
            return
        self.disputes[index] = replace(dispute, slashed=result.slashed)
        log.warning("slashed %d credits of peer %s's stake", result.slashed, dispute.peer_id)

    # ---------------------------------------------------------------- rollback, close

    def restart(self, old: list[HopSession], floor: int) -> None:
        """The loop rolled back to ``floor`` token positions and reopened the route: close
        the shadows of the ``old`` hops and pay their honest work (the liar's was disputed:
        nothing of it is cleared any more)."""
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        for hs in old:
            self._drop_shadow(hs)
            self._sums.pop(hs.session_id, None)
            if hs.disputed:  # the steps it ran after the lie was found
                self.session.dispute(hs, len(hs.inputs))
            self.session.clear(hs, len(hs.inputs))
        self.floor = floor
        self.dispute = None

    async def close(self) -> None:
        """Stop the audits, close their sessions (their cost joins the generation's) and
        wait for any slashing under way."""
        for task in self._tasks.values():
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for key in list(self._shadows):
            shadow = self._shadows.pop(key)
            self.session.absorb(shadow.session)
            await shadow.session.close()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


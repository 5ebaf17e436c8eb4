"""Push mode on the client: a step crosses the route in N+1 transfers instead of 2N.

Pull mode (``InferenceSession._through_hops``) sends each hop its input and waits for its
output: two transfers per hop. In push mode the client sends every hop of the route, at
once, a ``PushStep`` (tiny: the step, its voucher, where to forward the output: the next
hop's endpoint, peer id, session, step and a fresh secret) and the first hop its input
(``Forward``); each hop forwards its output straight to the next (``node.push``) and
answers its PushStep with its ``StepResult``. The last hop's answer is the only transfer
back on the critical path; the others come back meanwhile, so the client still holds every
hop's input (the previous hop's output) and receipt, exactly as in pull mode, and failover
replays them as it does there.

Checks, in route order, as the answers come: each result is checked like a pull step's
(``InferenceSession._accept``: shape, finite values, the receipt committing to the input
the client holds and the output returned). At the first hop whose answer fails or is wrong
the client falls back to pull for the rest of the token, from that hop on, with the
vouchers it already paid and nobody spent (a node charges a voucher when the step runs): a
Step supersedes the PushStep waiting there. A hop that fails its pull Step too is failed
over as in pull mode (``_recover``: ban, re-plan, replay); one whose pull Step then works
never got its input (the hop before it did not forward, or late): the session stops
pushing (``PushMode.off``). One-hop routes never push (2 transfers either way).

The choice (``PushMode.use``): ``ClientConfig.push`` True or False forces it; None (auto)
pushes when the planner's push latency model (``routing.route.route_terms``, with the
peer-to-peer round trips nodes announce in their records) is lower than pull's for the
route by at least ``ClientConfig.push_min_gain_ms`` per token (on a LAN the gain is noise);
without announced RTTs both models cost the same and the client pulls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from layerchain.discovery import PeerRecord
from layerchain.errors import LayerchainError
from layerchain.market import step_amount, tokens_of
from layerchain.market.receipts import SignedReceipt, tensor_sha256, verify_receipt
from layerchain.node.push import new_secret, secret_digest
from layerchain.routing.route import RoutePeer, route_terms
from layerchain.types import Hop
from layerchain.wire import messages as m

if TYPE_CHECKING:
    from layerchain.client.session import HopFailed, HopSession, InferenceSession

log = logging.getLogger(__name__)


def announced_rtts(records: Iterable[PeerRecord]) -> dict[tuple[str, str], float]:
    """``{(a, b): ms}``: the round trips peers announce to other peers (``PeerRecord.rtts``)."""
    return {(r.peer_id, other): ms for r in records for other, ms in r.rtts}


def push_is_faster(
    route: Sequence[Hop], peers: Mapping[str, RoutePeer],
    peer_rtts: Mapping[tuple[str, str], float], min_gain_ms: float = 0.0,
) -> bool:
    """Pure: whether the planner's push latency of ``route`` beats its pull (client)
    latency, by at least ``min_gain_ms`` per token (and by something), with ``peers`` as
    the planner sees them and the announced ``peer_rtts``."""
    if len(route) < 2 or any(h.peer_id not in peers for h in route):
        return False
    pull_ms, _ = route_terms(route, peers, mode="client")
    push_ms, _ = route_terms(route, peers, mode="push", peer_rtts=peer_rtts)
    return pull_ms - push_ms > 0 and pull_ms - push_ms >= min_gain_ms


class PushMode:
    """One session's push choice: forced (``forced`` True/False) or auto (None), cached per
    route and records; ``off`` once a hop did not forward (see the module)."""

    def __init__(self, forced: bool | None, min_gain_ms: float = 0.0) -> None:
        self.forced = forced
        self.min_gain_ms = min_gain_ms  # auto: push only if it saves this much per token
        self.off = False  # a forward went missing: pull for the rest of the session
        self.pushed = 0  # steps sent in push mode
        self.fallbacks = 0  # push steps finished in pull mode
        self._choice: tuple[tuple[Hop, ...], object, bool] | None = None  # (route,
        # records, choice) of the last auto choice

    def use(self, session: InferenceSession) -> bool:
        """Whether the next step of ``session`` goes in push mode."""
        route = session.route
        if self.off or len(route) < 2 or self.forced is False:
            return False
        if self.forced:
            return True
        records = session.peers.records
        if self._choice is None or self._choice[0] != tuple(route) \
                or self._choice[1] is not records:
            snapshot = {p.id: p for p in session.peers.snapshot()}
            faster = push_is_faster(route, snapshot, announced_rtts(records.values()),
                                    self.min_gain_ms)
            self._choice = (tuple(route), records, faster)
        return self._choice[2]


async def push_through(session: InferenceSession, hidden: torch.Tensor) -> torch.Tensor:
    """Run ``hidden`` [1, T, H] (at most ``step_tokens`` tokens) through every hop of
    ``session`` in push mode; the last hop's output [1, T, H]. Falls back to pull from the
    first hop that fails (see the module); failover as in pull mode."""
    hops = list(session.hops)
    tokens = tokens_of(hidden)
    # paid in route order before any await, as pull mode pays (vouchers go out in order)
    vouchers = [session._pay(hs, step_amount(tokens, hs.blocks, hs.verifier.price_per_block))
                for hs in hops]
    unspent = {id(hs): v for hs, v in zip(hops, vouchers)}
    session.push.pushed += 1
    try:
        rpcs = [await session.peers.client(hs.hop.peer_id) for hs in hops]
        endpoints = [session.peers.endpoint(hs.hop.peer_id) for hs in hops]
    except (LayerchainError, KeyError) as error:  # pull mode fails the hop properly
        log.info("push step: a hop is unreachable (%s): pulling", error)
        return await _pull_from(session, 0, hidden, unspent)
    loop = asyncio.get_running_loop()
    secrets = [new_secret() for _ in hops]
    calls: list[asyncio.Task[m.Message]] = []
    waited = 0.0  # hop k waits for hops 0..k: its deadline is theirs added up
    for k, hs in enumerate(hops):
        waited += session._step_timeout(hs, tokens)
        nxt = hops[k + 1] if k + 1 < len(hops) else None
        calls.append(loop.create_task(rpcs[k].call(m.PushStep(
            rid=0, session_id=hs.session_id, step=hs.verifier.next_step, voucher=vouchers[k],
            expect=secret_digest(secrets[k]),
            next_endpoint=endpoints[k + 1] if nxt else "",
            next_peer_id=nxt.hop.peer_id if nxt else "",
            next_session_id=nxt.session_id if nxt else "",
            next_step=nxt.verifier.next_step if nxt else 0,
            next_secret=secrets[k + 1] if nxt else b"",
        ), timeout=waited)))
    # when each hop's answer came back: hop k's speed sample is the time after hop k-1's
    # (the first's: after the input went out), so a hop that holds its answers is caught
    # as slow in push mode as in pull (a negative gap, behind a late predecessor: no sample)
    answered = [0.0] * len(hops)

    def stamp(k: int) -> Callable[[asyncio.Task[m.Message]], None]:
        return lambda _: answered.__setitem__(k, time.perf_counter())

    for k, call in enumerate(calls):
        call.add_done_callback(stamp(k))
    sent = time.perf_counter()
    first = hops[0]
    calls.append(loop.create_task(rpcs[0].call(m.Forward(
        rid=0, session_id=first.session_id, step=first.verifier.next_step, hidden=hidden,
        secret=secrets[0]), timeout=session._step_timeout(first, tokens))))
    from layerchain.client.session import HopFailed  # the session imports this module

    x = hidden
    try:
        for k, hs in enumerate(hops):
            try:
                reply = await calls[k]
            except LayerchainError as error:
                log.info("push step: hop %d (%s) failed: %s; pulling from it", k,
                         hs.hop.peer_id, error)
                return await _pull_from(session, k, x, unspent)
            try:
                gap = answered[k] - (answered[k - 1] if k else sent)
                x_next = session._accept(hs, x, reply, vouchers[k], gap if gap > 0 else None)
            except HopFailed as failure:  # a wrong answer: see _redo
                await _redo(session, k, failure, k > 0 and ran_on_another_input(hs, reply, x))
                return await _pull_from(session, k, x, {}, missing=False)
            x = x_next
            del unspent[id(hs)]
        return x
    finally:
        for call in calls:
            if not call.done():
                call.cancel()
            elif not call.cancelled():
                call.exception()  # retrieved: a failure past the fallback point is moot


def ran_on_another_input(hs: HopSession, reply: m.Message, x: torch.Tensor) -> bool:
    """Whether ``reply`` is right in every respect but its input: a receipt the hop's peer
    signed for this step, over another input than ``x`` (what the hop before returned).
    Then the hop before forwarded another tensor than it returned, or this one lies about
    its input: the client cannot tell which."""
    if not isinstance(reply, m.StepResult) or not reply.receipt:
        return False
    v = hs.verifier
    try:
        claimed = SignedReceipt.from_bytes(reply.receipt).receipt.input_sha256
        if claimed == tensor_sha256(x):
            return False
        verify_receipt(reply.receipt, expected_node_address=v.node_address,
                       session_id=v.session_id, expected_step=v.next_step,
                       input_sha256=claimed, output_sha256=tensor_sha256(reply.hidden),
                       prev_hash=v.last_hash, price_per_block=v.price_per_block,
                       model_id=v.model_id, span=v.span, tokens=tokens_of(x))
    except (LayerchainError, ValueError):
        return False
    return True


async def _redo(session: InferenceSession, index: int, failure: HopFailed,
                ambiguous: bool) -> None:
    """Hop ``index`` answered this step wrongly; it forwarded its output on, so the hops
    after it may have run on it: each gets a new session on the same peer, rebuilt from
    the inputs the client holds (nobody blamed: they did their part). The hop itself is
    failed over as in pull mode (banned), unless ``ambiguous`` (``ran_on_another_input``:
    it or the hop before lied): then it is reopened too, blaming nobody. The session
    stops pushing."""
    log.warning("push step: hop %d (%s) answered wrongly (%s)%s: rebuilding hops %d.. and "
                "pulling from now on", index, failure.peer_id, failure.error,
                " on an input its predecessor never returned" if ambiguous else "", index)
    session.push.off = True
    for j in range(len(session.hops) - 1, index, -1):  # indices stay valid from the end
        await reopen_hop(session, j)
    if ambiguous:
        await reopen_hop(session, index)
    else:
        await session._recover(index, failure)


async def reopen_hop(session: InferenceSession, index: int) -> None:
    """Hop ``index`` on a new session on the same peer, replaying the inputs held (its
    old one may hold a step the client cannot vouch for); a failure: failover."""
    from layerchain.client.session import HopFailed, regroup  # imports this module

    old = session.hops[index]
    new: list[HopSession] = []
    try:
        new = await session._open_hops([old.hop])
        for x in regroup(old.inputs, session.step_tokens):
            await session._call(new[0], x)
    except HopFailed as failure:
        for hs in new:
            session._close_later(hs)
        await session._recover(index, failure)
        return
    session._close_later(old)
    session.retired.append(old)  # its steps still count: audits check them too
    session.hops[index] = new[0]


async def _pull_from(
    session: InferenceSession, index: int, x: torch.Tensor, unspent: dict[int, bytes],
    *, missing: bool = True,
) -> torch.Tensor:
    """Pull mode from hop ``index`` on with input ``x``: each hop still planned gets the
    voucher paid for this step; failover as in ``_through_hops``. If hop ``index`` then
    answers (``missing``: its push failed), its input never came (a forward went missing):
    the session stops pushing."""
    from layerchain.client.session import HopFailed  # the session imports this module

    session.push.fallbacks += 1
    i, first = index, True
    while i < len(session.hops):
        hs: HopSession = session.hops[i]
        try:
            x = await session._call(hs, x, unspent.pop(id(hs), None))
            if first and missing and index > 0 and not session.push.off:
                log.warning("push: peer %s did not forward its output to %s: pulling from "
                            "now on", session.hops[index - 1].hop.peer_id, hs.hop.peer_id)
                session.push.off = True
            i += 1
        except HopFailed as failure:
            await session._recover(i, failure)
        first = False
    return x

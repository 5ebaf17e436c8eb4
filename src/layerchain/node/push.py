"""Push mode on a node: steps whose input the previous hop forwards, and forwarding on.

In push mode a token's hidden states cross the route in N+1 transfers instead of 2N: the
client sends its input to the first hop, every hop forwards its output straight to the next
hop, and the last hop's output goes back to the client. The wire messages (type ids 60-62)::

    client -> hop k   PushStep(session, step, voucher, expect, next hop, its session, step,
                               secret)             answered with the step's StepResult
    hop k-1 -> hop k  Forward(session, step, hidden, secret)   answered with Forwarded
    (client -> hop 0  Forward too: the first hop's input is the client's)

Every peer is a stranger, so a forwarded input is taken only:
* for a session open here, at the step that session expects next;
* with a secret whose sha256 is the ``expect`` of that step's PushStep: the client draws a
  fresh secret per hop and step and tells it only to the hop that must forward it (so a
  previous hop can feed this session nothing but the one step it was asked to forward);
* one at a time: one PushStep in flight per session, one Forward held per session while its
  PushStep has not arrived (the two travel on different links; either may come first),
  dropped after ``FORWARD_WAIT_S``; the usual token limits (the Step it turns into).
The PushStep itself comes on the client's own connection (the session's owner) and pays
like a Step: its voucher is charged when the step runs (``Node._step``), and the receipt
commits to the input that ran and the output returned, as in pull mode.

A forward goes out over a link this node dials to ``next_endpoint`` proving
``next_peer_id`` (TLS): the link is authenticated in the direction that matters (the
receiver cannot know who dialled it: the secret is what it checks). A Step (pull mode) for
the step a PushStep waits on supersedes it: the client fell back to pull for that token.

RTTs: the node pings the peers that could be its next hop (those serving the block after
its span: ``measure_successors``, every record refresh) and the hops it forwards to, each at
most every ``RTT_REFRESH_S``; it announces those round trips (ms) in its record's ``rtts``,
which the client's push latency model reads (so a client can choose push mode before anyone
pushed). Knows nothing of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from layerchain.errors import LayerchainError, LimitExceeded
from layerchain.wire import messages as m
from layerchain.wire.rpc import RpcClient

if TYPE_CHECKING:
    from layerchain.node.server import Node

log = logging.getLogger(__name__)

FORWARD_WAIT_S = 30.0  # a PushStep waits this long for its forwarded input; a Forward that
# came first is held this long for its PushStep
FORWARD_TIMEOUT_S = 10.0  # the next hop must acknowledge a Forward within this, seconds
RTT_REFRESH_S = 30.0  # a link in use is pinged again after this many seconds
MAX_SECRET_BYTES = 64  # a push secret's size at most
MAX_LINKS = 64  # links to next hops kept open at most (least recently used closed first)
MAX_PROBED = 8  # possible next hops pinged per round at most


def secret_digest(secret: bytes) -> bytes:
    """What a PushStep's ``expect`` holds for ``secret``: its sha256."""
    return hashlib.sha256(secret).digest()


def new_secret() -> bytes:
    """A fresh push secret (16 random bytes)."""
    return os.urandom(16)


@dataclass
class _Waiting:
    """A PushStep waiting for its input."""

    step: int
    expect: bytes  # sha256 of the secret its Forward must carry
    arrived: asyncio.Future[torch.Tensor]


@dataclass(frozen=True)
class _Held:
    """A Forward that came before its PushStep."""

    step: int
    digest: bytes  # sha256 of the secret it carried
    hidden: torch.Tensor  # [1, T, H]
    at: float  # monotonic s it arrived


class PushService:
    """A node's push mode: waiting PushSteps, held Forwards, links to next hops."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.waiting: dict[str, _Waiting] = {}  # session id -> its PushStep in flight
        self.held: dict[str, _Held] = {}  # session id -> a Forward ahead of its PushStep
        self.links: OrderedDict[tuple[str, str], RpcClient] = OrderedDict()  # (endpoint,
        # peer id) -> an authenticated connection, most recently used last
        self.pinged: dict[str, float] = {}  # peer id -> monotonic s of its last ping
        self.forwarded = 0  # forwards the next hop acknowledged
        self.forward_failures = 0  # forwards that failed (dial, refusal, timeout)
        self._dialing = asyncio.Lock()

    async def handle(self, msg: m.PushStep | m.Forward, owner: int) -> m.StepResult | m.Forwarded:
        if isinstance(msg, m.PushStep):
            return await self.push_step(msg, owner)
        return self.forward_in(msg)

    # ---------------------------------------------------------------- this hop's step

    async def push_step(self, msg: m.PushStep, owner: int) -> m.StepResult:
        """Wait for the step's input (a Forward with the right secret), run it as a Step of
        ``owner``'s session, forward the output on (without waiting), return the result."""
        session = self.node.sessions.get(msg.session_id, owner)  # the client's own session
        if len(msg.expect) != 32 or len(msg.next_secret) > MAX_SECRET_BYTES:
            raise LimitExceeded("a PushStep's expect is a sha256 (32 bytes), its secret at "
                                f"most {MAX_SECRET_BYTES} bytes")
        if msg.next_endpoint and not msg.next_peer_id:
            raise LimitExceeded("a PushStep forwarding on must name the next hop's peer id")
        if msg.session_id in self.waiting:
            raise LimitExceeded(f"session {msg.session_id} has a push step in flight already")
        if msg.step != session.next_step:
            raise LimitExceeded(
                f"session {msg.session_id} expects step {session.next_step}, got {msg.step}")
        waiting = _Waiting(msg.step, msg.expect, asyncio.get_running_loop().create_future())
        self.waiting[msg.session_id] = waiting
        held = self.held.pop(msg.session_id, None)
        if held is not None and held.step == msg.step and hmac.compare_digest(held.digest,
                                                                                msg.expect):
            waiting.arrived.set_result(held.hidden)
        try:
            hidden = await asyncio.wait_for(asyncio.shield(waiting.arrived), FORWARD_WAIT_S)
        except TimeoutError:
            raise LimitExceeded(f"no input was forwarded for step {msg.step} of session "
                              f"{msg.session_id} within {FORWARD_WAIT_S:g} s") from None
        finally:
            if self.waiting.get(msg.session_id) is waiting:
                del self.waiting[msg.session_id]
            if not waiting.arrived.done():
                waiting.arrived.cancel()
        result = await self.node.run_step(
            m.Step(rid=msg.rid, session_id=msg.session_id, step=msg.step, hidden=hidden,
                   voucher=msg.voucher), owner)
        if msg.next_endpoint:
            self.node._spawn(self._forward(msg, result.hidden))
        return result

    def forward_in(self, msg: m.Forward) -> m.Forwarded:
        """Take a forwarded input for a waiting PushStep, or hold it until that comes."""
        if len(msg.secret) > MAX_SECRET_BYTES:
            raise LimitExceeded(f"a push secret has at most {MAX_SECRET_BYTES} bytes")
        hidden, size = msg.hidden, self.node.spec.hidden_size
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != size:
            raise LimitExceeded(f"hidden states must be [1, T, {size}], got {list(hidden.shape)}")
        session = self.node.sessions.get(msg.session_id)  # anyone's: the secret proves it
        if msg.step != session.next_step:
            raise LimitExceeded(
                f"session {msg.session_id} expects step {session.next_step}, got {msg.step}")
        digest = secret_digest(msg.secret)
        waiting = self.waiting.get(msg.session_id)
        if waiting is not None:
            if waiting.step != msg.step or waiting.arrived.done() \
                    or not hmac.compare_digest(waiting.expect, digest):
                raise LimitExceeded(f"forward to session {msg.session_id} refused: not the "
                                    "input its push step waits for")
            waiting.arrived.set_result(hidden)
        else:
            now = time.monotonic()
            for sid in [sid for sid, h in self.held.items() if now - h.at >= FORWARD_WAIT_S]:
                del self.held[sid]  # never claimed (its PushStep gone, its session closed)
            held = self.held.get(msg.session_id)
            if held is not None and now - held.at < FORWARD_WAIT_S and \
                    held.step >= session.next_step:
                raise LimitExceeded(f"session {msg.session_id} holds a forward already")
            self.held[msg.session_id] = _Held(msg.step, digest, hidden, now)
        return m.Forwarded(rid=msg.rid, session_id=msg.session_id, step=msg.step)

    def supersede(self, session_id: str, step: int) -> None:
        """A Step (pull mode) for ``step`` came from the client: a PushStep waiting for it
        gives up (``LimitExceeded``), a held Forward is dropped."""
        self.held.pop(session_id, None)
        waiting = self.waiting.get(session_id)
        if waiting is not None and waiting.step == step and not waiting.arrived.done():
            waiting.arrived.set_exception(LimitExceeded(
                f"push step {step} of session {session_id} superseded by a Step"))

    # ---------------------------------------------------------------- forwarding on

    async def _forward(self, msg: m.PushStep, out: torch.Tensor) -> None:
        """Send ``out`` to the next hop; a failure is only logged: the client, missing the
        next hop's result, falls back to pull for the token."""
        try:
            rpc = await self._link(msg.next_endpoint, msg.next_peer_id)
            await rpc.call(m.Forward(rid=0, session_id=msg.next_session_id, step=msg.next_step,
                                     hidden=out, secret=msg.next_secret),
                           timeout=FORWARD_TIMEOUT_S)
            self.forwarded += 1
            if time.monotonic() - self.pinged.get(msg.next_peer_id, -math.inf) > RTT_REFRESH_S:
                await self._ping(rpc, msg.next_peer_id)
        except LayerchainError as error:
            self.forward_failures += 1
            log.info("forward to %s failed: %s", msg.next_peer_id, error)

    async def _link(self, endpoint: str, peer_id: str) -> RpcClient:
        """An open connection to ``endpoint`` proving ``peer_id``, dialled if needed."""
        key = (endpoint, peer_id)
        async with self._dialing:
            rpc = self.links.get(key)
            if rpc is not None and not rpc.closed:
                self.links.move_to_end(key)
                return rpc
            try:
                conn = await self.node.transport.connect(endpoint, peer_id=peer_id)
            except (ValueError, OSError) as error:  # a bad endpoint: the client's fault
                raise LimitExceeded(f"cannot dial {endpoint[:100]}: {error}") from None
            rpc = self.links[key] = RpcClient(conn)
            while len(self.links) > MAX_LINKS:
                _, old = self.links.popitem(last=False)
                self.node._spawn(old.close())
        return rpc

    async def measure_successors(self) -> int:
        """Ping the peers that could be this node's next hop (their span holds block
        ``end``) whose round trip is older than ``RTT_REFRESH_S``, at most ``MAX_PROBED``;
        returns how many answered (their RTTs go in the record)."""
        node = self.node
        end = node.span.end
        if end >= node.spec.num_blocks:
            return 0
        records = await node.discovery.find(node.spec.model_id, node.spec.num_blocks)
        now = time.monotonic()
        due = sorted((r for r in records if r.start <= end < r.end and r.endpoints
                      and r.peer_id != node.peer_id
                      and now - self.pinged.get(r.peer_id, -math.inf) > RTT_REFRESH_S),
                     key=lambda r: self.pinged.get(r.peer_id, -math.inf))
        answered = 0
        for record in due[:MAX_PROBED]:
            try:
                await self._ping(await self._link(record.endpoints[0], record.peer_id),
                                 record.peer_id)
                answered += 1
            except LayerchainError as error:
                self.pinged[record.peer_id] = now  # not again before RTT_REFRESH_S
                log.debug("pinging %s failed: %s", record.peer_id, error)
        for peer_id in [p for p, at in self.pinged.items() if now - at > 10 * RTT_REFRESH_S]:
            del self.pinged[peer_id]
        return answered

    async def measure_every(self, period_s: float) -> None:
        """``measure_successors`` every ``period_s`` seconds, for the node's life (the first
        after one period: the swarm's records have arrived by then)."""
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.measure_successors()
            except Exception as error:  # a DHT hiccup: the next round tries again
                log.info("measuring RTTs to next hops failed: %s", error)

    async def _ping(self, rpc: RpcClient, peer_id: str) -> None:
        """Measure the round trip to ``peer_id`` and keep it for the record (ms)."""
        self.pinged[peer_id] = time.monotonic()
        t0 = time.perf_counter()
        await rpc.call(m.Ping(rid=0, nonce=int.from_bytes(os.urandom(4), "big")), timeout=5.0)
        self.node.observe_rtt(peer_id, 1000.0 * (time.perf_counter() - t0))

    async def close(self) -> None:
        """Close every link; fail every waiting PushStep."""
        for waiting in self.waiting.values():
            if not waiting.arrived.done():
                waiting.arrived.cancel()
        self.waiting.clear()
        self.held.clear()
        links, self.links = list(self.links.values()), OrderedDict()
        for rpc in links:
            with contextlib.suppress(Exception):
                await rpc.close()

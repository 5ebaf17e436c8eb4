"""A node that re-prices never gets banned by clients planning with its old record (issue 17).

A session opens at the price of the record its client planned with (``OpenSession
.price_per_block``); the node charges it within one record TTL of leaving it, else answers
``offer_changed`` and the client re-reads the records and plans again. A node whose receipts
carry another price than the one agreed is still banned. In-process (memory DHT, mem://).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from memswarm import MemorySwarm

from layerchain.client import ClientConfig, RouteLimits
from layerchain.client.peers import PeerView
from layerchain.client.session import InferenceSession
from layerchain.discovery import MemoryDiscovery
from layerchain.errors import OfferChanged
from layerchain.market import ReceiptSigner
from layerchain.model import SamplingParams, load_span
from layerchain.node import Node
from layerchain.node.rebalance import MarketTask
from layerchain.node.payments import agreed_price
from layerchain.types import Span
from layerchain.wire import MemoryTransport
from layerchain.wire import messages as m

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=4)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_the_agreed_price():
    retired = {10: 100.0, 12: 40.0}  # price -> when the node stopped charging it (s)
    assert agreed_price(-1, 20, retired, 120.0, 60.0) == 20  # not said: the current one
    assert agreed_price(20, 20, retired, 120.0, 60.0) == 20
    assert agreed_price(10, 20, retired, 120.0, 60.0) == 10  # left 20 s ago: within the TTL
    with pytest.raises(OfferChanged, match="charges 20 .* not 12"):
        agreed_price(12, 20, retired, 120.0, 60.0)  # left 80 s ago: no record says it now
    for never in (11, 0, -2):  # a price it never charged, however cheap
        with pytest.raises(OfferChanged):
            agreed_price(never, 20, retired, 120.0, 60.0)


def test_a_client_with_the_old_price_is_served_at_it_within_the_grace(tiny_model, reference,
                                                                      tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            node = await swarm.add_node(0, 4, tmp_path / "n", price_per_block=10)
            node.set_price(12)  # MarketTask.reprice; the DHT has not seen it yet
            client = swarm.client(audit_rate=0)
            result = await client.generate(PROMPT, PARAMS)  # planned with price 10
            return result, client.peers.banned()
        finally:
            await swarm.close()

    result, banned = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    assert not banned and result.recoveries == ()
    assert [p.price_per_block for p in result.payments] == [10]  # receipts checked at 10


async def _stale_view(swarm: MemorySwarm, node: Node, price: int, **config) -> InferenceSession:
    """A client's session holding ``node``'s record from before it moved to ``price``, once
    the node's grace for the old price is over."""
    peers = PeerView(MemoryDiscovery(swarm.hub), MemoryTransport(swarm.wire),
                     swarm.spec.model_id, swarm.spec.num_blocks, ClientConfig(audit_rate=0))
    await peers.refresh(force=True)  # its view: the old price, kept for refresh_s
    node.set_price(price)  # what MarketTask.reprice does
    assert node.announcer is not None
    await node.announcer.announce_now()
    later = 2 * node.config.record_ttl_s + 1.0  # the node's grace for the old price is over
    node.payments.clock = lambda: time.monotonic() + later
    return InferenceSession(peers, max_length=16, **config)


def test_a_client_with_a_lapsed_price_replans_without_a_ban(tiny_model, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            node = await swarm.add_node(0, 4, tmp_path / "n", price_per_block=10)
            session = await _stale_view(swarm, node, 12)
            with pytest.raises(OfferChanged):  # what the session's first open gets
                node._open(m.OpenSession(1, "s", swarm.spec.model_id, 0, 4, 8,
                                         price_per_block=10), owner=1)
            await session.open()
            hops = [(hs.hop.peer_id, hs.verifier.price_per_block) for hs in session.hops]
            await session.close()
            return hops, session.peers.unavailable(), node.peer_id
        finally:
            await swarm.close()

    hops, left_out, node = run(main())
    assert hops == [(node, 12)]  # re-read its record, then opened at 12
    assert not left_out  # neither banned nor avoided


def test_a_price_rise_past_max_price_routes_elsewhere(tiny_model, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            riser = await swarm.add_node(0, 4, tmp_path / "r", price_per_block=10)
            other = await swarm.add_node(0, 4, tmp_path / "o", price_per_block=20,
                                         emulate_latency_ms=20)
            # 4 blocks: the riser costs 40 a token, the other 80, both within 100; then any
            # route using the riser's blocks (50 each) costs 110 or more: above max_price
            session = await _stale_view(swarm, riser, 50, limits=RouteLimits(max_price=100))
            await session.open()
            hops = [(hs.hop.peer_id, hs.verifier.price_per_block) for hs in session.hops]
            await session.close()
            return hops, session.peers.banned(), other.peer_id
        finally:
            await swarm.close()

    hops, banned, other = run(main())
    assert hops == [(other, 20)]
    assert not banned


def test_a_client_planning_on_the_span_a_node_left_replans_without_a_ban(tiny_model,
                                                                         tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            mover = await swarm.add_node(0, 4, tmp_path / "m")
            spare = await swarm.add_node(0, 2, tmp_path / "s", emulate_latency_ms=20)
            peers = PeerView(MemoryDiscovery(swarm.hub), MemoryTransport(swarm.wire),
                             swarm.spec.model_id, swarm.spec.num_blocks, ClientConfig())
            await peers.refresh(force=True)  # its view: the mover on 0:4
            await MarketTask(mover, mover.config, 2,
                             lambda span: load_span(swarm.spec, span.start, span.end)
                             ).move(Span(2, 4))
            session = InferenceSession(peers, max_length=16)
            await session.open()  # planned on the mover's 0:4: told it moved, re-read
            hops = [(hs.hop.peer_id, hs.hop.start, hs.hop.end) for hs in session.hops]
            await session.close()
            return hops, peers.unavailable(), mover.peer_id, spare.peer_id
        finally:
            await swarm.close()

    hops, left_out, mover, spare = run(main())
    assert hops == [(spare, 0, 2), (mover, 2, 4)]
    assert not left_out


class Overcharges(Node):
    """Agrees to the client's price at open, then signs its receipts at one credit more."""

    def _open(self, msg: m.OpenSession, owner: int) -> m.SessionOpened:
        opened = super()._open(msg, owner)
        payment = self.sessions.get(msg.session_id, owner).payment
        signer = payment.signer
        payment.signer = ReceiptSigner(self.payments.wallet, msg.session_id, signer.model_id,
                                       signer.span, signer.price_per_block + 1)
        return opened


def test_a_node_signing_another_price_than_agreed_is_banned(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            liar = await swarm.add_node(0, 4, tmp_path / "l", price_per_block=10,
                                        node_class=Overcharges)
            await swarm.add_node(0, 4, tmp_path / "h", price_per_block=10, emulate_latency_ms=20)
            client = swarm.client(audit_rate=0)
            result = await client.generate(PROMPT, PARAMS)
            return result, client.peers.banned(), liar.peer_id
        finally:
            await swarm.close()

    result, banned, liar = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    assert liar in banned
    assert [r.peer_id for r in result.recoveries] == [liar]
    assert "price" in result.recoveries[0].reason


class ClaimsToHaveMoved(Node):
    """Fails every step saying it moved (offer_changed), while its record stays the same."""

    async def _step(self, msg: m.Step, owner: int = 0) -> m.StepResult:
        raise OfferChanged(f"node moved and closed session {msg.session_id}")


def test_a_node_failing_steps_with_a_move_it_never_made_is_banned(tiny_model, reference,
                                                                  tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            liar = await swarm.add_node(0, 4, tmp_path / "l", node_class=ClaimsToHaveMoved)
            await swarm.add_node(0, 4, tmp_path / "h", emulate_latency_ms=20)
            client = swarm.client(audit_rate=0)
            result = await client.generate(PROMPT, PARAMS)
            return result, client.peers.banned(), liar.peer_id
        finally:
            await swarm.close()

    result, banned, liar = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    assert liar in banned and [r.peer_id for r in result.recoveries] == [liar]

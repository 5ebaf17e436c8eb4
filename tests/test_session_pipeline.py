"""Pull mode's pipeline (``InferenceSession._through_hops``): a hop's answer goes on to the
next hop before the client checks it, and a wrong answer still costs nothing but time.

In-process swarms over the memory transport (``memswarm``), a tiny model: real nodes,
sessions, receipts and failover.
"""

from __future__ import annotations

import asyncio

import pytest
from memswarm import MemorySwarm

from layerchain.client import session as session_module
from layerchain.errors import InvalidReceipt, LayerchainError
from layerchain.market import ReceiptVerifier
from layerchain.model import SamplingParams
from layerchain.wire import messages as m
from layerchain.wire.rpc import RpcClient

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


def _spy(monkeypatch) -> list[tuple[str, str, int]]:
    """Events in the client, in order: ("send", session id, step) when a Step goes out,
    ("checked", session id, step) when its receipt passed the check."""
    events: list[tuple[str, str, int]] = []
    call, check = RpcClient.call, ReceiptVerifier.check

    async def spied_call(self, msg, timeout):
        if isinstance(msg, m.Step):
            events.append(("send", msg.session_id, msg.step))
        return await call(self, msg, timeout)

    def spied_check(self, *args, **kwargs):
        step = self.next_step
        receipt = check(self, *args, **kwargs)
        events.append(("checked", self.session_id, step))
        return receipt

    monkeypatch.setattr(RpcClient, "call", spied_call)
    monkeypatch.setattr(ReceiptVerifier, "check", spied_check)
    return events


def test_the_next_hop_gets_an_answer_before_it_is_checked(tiny_model, reference, tmp_path,
                                                          monkeypatch):
    events = _spy(monkeypatch)

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for start, end in ((0, 1), (1, 3), (3, 4)):
                await swarm.add_node(start, end, tmp_path)
            client = swarm.client(audit_rate=0.0)
            return await client.generate(PROMPT, PARAMS)
        finally:
            await swarm.close()

    result = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    assert result.recoveries == ()
    sessions = list(dict.fromkeys(sid for kind, sid, _ in events if kind == "send"))
    assert len(sessions) == 3
    steps = len(result.token_ids)  # the prompt's step and one per decode step but the last
    for hop in range(2):  # hop k+1's step went out before hop k's answer was checked
        for step in range(steps):
            sent = events.index(("send", sessions[hop + 1], step))
            checked = events.index(("checked", sessions[hop], step))
            assert sent < checked
    last = sessions[2]  # the last hop's answer is checked before the step returns
    for step in range(steps - 1):
        assert events.index(("checked", last, step)) < events.index(("send", sessions[0], step + 1))


class Tampering:
    """Wraps a node's handler: at its ``at``-th Step (0-based, over all sessions) it returns
    the honest output scaled by 1.5 under the honest receipt: the right shape, so the client
    sends it on before its check finds that the receipt names another output."""

    def __init__(self, node, at: int) -> None:
        self.node, self.at, self.steps = node, at, 0
        self.original = node.handle
        node.handle = self.handle

    async def handle(self, msg, *args):
        reply = await self.original(msg, *args)
        if isinstance(msg, m.Step):
            self.steps += 1
            if self.steps - 1 == self.at:
                reply = m.StepResult(reply.rid, reply.session_id, reply.step, reply.hidden * 1.5,
                                     reply.receipt, reply.compute_ms)
        return reply


class Counting:
    """Wraps a node's handler: counts the Steps it answers, per session."""

    def __init__(self, node) -> None:
        self.steps: dict[str, int] = {}
        self.original = node.handle
        node.handle = self.handle

    async def handle(self, msg, *args):
        if isinstance(msg, m.Step):
            self.steps[msg.session_id] = self.steps.get(msg.session_id, 0) + 1
        return await self.original(msg, *args)


@pytest.mark.parametrize("at", [0, 5])  # the prompt's step, a decode step
def test_a_wrong_answer_sent_on_unchecked_is_caught_banned_and_undone(
    tiny_model, reference, tmp_path, monkeypatch, at
):
    """Hop 0:2's peer returns another output than its receipt names; the client has sent it
    on to hop 2:4 already. The liar is banned and routed around; hop 2:4's step over the
    wrong input is dropped (a new session on the same peer, its inputs replayed, nobody
    blamed); the answer is the single-process model's."""
    errors: list[LayerchainError] = []
    failure = session_module.InferenceSession._failure

    def spied_failure(self, record, error, tokens):
        errors.append(error)
        return failure(self, record, error, tokens)

    monkeypatch.setattr(session_module.InferenceSession, "_failure", spied_failure)

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            liar = await swarm.add_node(0, 2, tmp_path / "liar")
            await swarm.add_node(0, 2, tmp_path / "spare", emulate_latency_ms=5)
            after = await swarm.add_node(2, 4, tmp_path / "after")
            Tampering(liar, at)
            counted = Counting(after)
            client = swarm.client(audit_rate=0.0)  # no audit sessions in the counts
            result = await client.generate(PROMPT, PARAMS)
            return result, client, liar, after, counted
        finally:
            await swarm.close()

    result, client, liar, after, counted = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    assert [(r.peer_id, r.start, r.end) for r in result.recoveries] == [(liar.peer_id, 0, 2)]
    assert liar.peer_id in client.peers.banned()
    assert after.peer_id not in client.peers.banned()
    assert [type(e) for e in errors] == [InvalidReceipt]
    assert "output hash" in str(errors[0])
    # hop 2:4 ran on the wrong output in its first session, then a second one rebuilt it
    # from the inputs the client vouches for, and carried on
    assert [(h.start, h.end) for h in result.route] == [(0, 2), (2, 4)]
    assert result.route[1].peer_id == after.peer_id
    first, second = counted.steps.values()
    assert first == at + 1  # the steps it ran before the wrong one, and the wrong one
    # the replay (the steps before, regrouped into one step: they fit) and the rest
    steps = len(result.token_ids)  # the prompt's step and one per token but the last
    assert second == (1 if at else 0) + steps - at

"""Push mode (issue 16, item 3): each hop forwards its output straight to the next hop.

Fast tests run real nodes in one event loop over the memory transport (tests/memswarm.py):
the protocol's rules (a forward needs the step's secret, the step the session expects, one
at a time; a Step supersedes a waiting PushStep), generations identical to the local model
in push mode, a hop that does not forward or fails (the client falls back to pull for that
token, failover as in pull mode), the RTTs nodes announce and the auto choice (a pure
function over literals). The slow end-to-end test (real node processes, TLS, kill -9 of a
hop mid-generation) is at the end.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from memswarm import MemorySwarm

from layerchain.client.push import announced_rtts, push_is_faster
from layerchain.errors import LimitExceeded, RemoteError, UnknownSession
from layerchain.model import LocalModel, SamplingParams, resolve_model
from layerchain.node import Node
from layerchain.node.push import new_secret, secret_digest
from layerchain.routing.route import RoutePeer
from layerchain.types import Hop
from layerchain.wire import messages as m

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))  # 4 blocks, context 256 tokens


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LocalModel(resolve_model(tiny_model)).generate(PROMPT, PARAMS)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def chain(swarm: MemorySwarm, tmp_path, spans=((0, 2), (2, 3), (3, 4))) -> list[Node]:
    return [await swarm.add_node(a, b, tmp_path / f"n{a}") for a, b in spans]


# ------------------------------------------------------------------ generations


def test_push_mode_gives_the_local_models_tokens_and_nodes_announce_rtts(
    tiny_model, reference, tmp_path
):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            nodes = await chain(swarm, tmp_path)
            client = swarm.client(push=True)
            result = await client.generate(PROMPT, PARAMS)
            records = {n.peer_id: n.record() for n in nodes}
            return result, nodes, records
        finally:
            await swarm.close()

    result, nodes, records = run(main())
    assert result.token_ids == reference.token_ids
    assert not result.recoveries
    steps = 1 + PARAMS.max_new_tokens - 1  # the prompt, then one step per new token but the last
    assert [n.push.forwarded for n in nodes] == [steps, steps, 0]  # the last hop returns
    assert [n.push.forward_failures for n in nodes] == [0, 0, 0]
    # each hop measured its round trip to the hop it forwards to, and announces it (ms)
    assert [p for p, _ in records[nodes[0].peer_id].rtts] == [nodes[1].peer_id]
    assert [p for p, _ in records[nodes[1].peer_id].rtts] == [nodes[2].peer_id]
    assert records[nodes[2].peer_id].rtts == ()
    assert set(announced_rtts(records.values())) == {
        (nodes[0].peer_id, nodes[1].peer_id), (nodes[1].peer_id, nodes[2].peer_id)}


def test_pull_mode_forwards_nothing(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            nodes = await chain(swarm, tmp_path)
            result = await swarm.client(push=False).generate(PROMPT, PARAMS)
            return result, nodes
        finally:
            await swarm.close()

    result, nodes = run(main())
    assert result.token_ids == reference.token_ids
    assert [n.push.forwarded for n in nodes] == [0, 0, 0]


def test_a_hop_that_does_not_forward_costs_one_fallback_then_the_session_pulls(
    tiny_model, reference, tmp_path
):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            nodes = await chain(swarm, tmp_path)

            async def swallow(msg, out):  # computes, answers the client, forwards nothing
                return None

            nodes[1].push._forward = swallow  # type: ignore[method-assign]
            client = swarm.client(push=True, step_timeout_s=0.5)
            result = await client.generate(PROMPT, PARAMS)
            return result, nodes, client.peers.banned()
        finally:
            await swarm.close()

    result, nodes, banned = run(main())
    assert result.token_ids == reference.token_ids  # the last hop pulled, same answer
    assert not result.recoveries  # nobody failed over: the last hop's cache was intact
    assert not banned
    assert [n.push.forwarded for n in nodes] == [1, 0, 0]  # the prompt step only, then pull


def test_a_hop_holding_its_answers_in_push_mode_is_measured_slow(tiny_model, reference, tmp_path):
    """A hop that forwards at once but holds its answer to the client (a slow liar: its
    record says fast) slows every token as much in push mode as in pull, so the client must
    learn its speed from push steps too: the gap after the answer of the hop before it."""
    delay_s = 0.2

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            nodes = await chain(swarm, tmp_path)
            slow, handle = nodes[1], nodes[1].handle

            async def hold(msg, owner=0):
                reply = await handle(msg, owner)
                if isinstance(msg, m.PushStep):
                    await asyncio.sleep(delay_s)
                return reply

            slow.handle = hold  # type: ignore[method-assign]
            client = swarm.client(push=True)
            result = await client.generate(PROMPT, PARAMS)
            return result, nodes, {n.peer_id: client.peers.speed(n.peer_id) for n in nodes}
        finally:
            await swarm.close()

    result, nodes, speed = run(main())
    assert result.token_ids == reference.token_ids
    assert nodes[0].push.forwarded > 1  # it stayed in push mode
    slow_ms = speed[nodes[1].peer_id]  # ms per block: its one block, held 200 ms a step
    assert slow_ms > 0.5 * 1000 * delay_s
    assert slow_ms > 10 * max(speed[nodes[0].peer_id], speed[nodes[2].peer_id])


def test_a_hop_forwarding_another_tensor_than_it_returns_changes_nothing_and_bans_nobody(
    tiny_model, reference, tmp_path
):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            nodes = await chain(swarm, tmp_path)
            liar, forward = nodes[1], nodes[1].push._forward

            async def garbage(msg, out):  # returns its honest output, forwards noise
                return await forward(msg, out + torch.randn_like(out))

            liar.push._forward = garbage  # type: ignore[method-assign]
            client = swarm.client(push=True)
            result = await client.generate(PROMPT, PARAMS)
            return result, nodes, client.peers.banned()
        finally:
            await swarm.close()

    result, nodes, banned = run(main())
    assert result.token_ids == reference.token_ids
    # the last hop's receipt names an input the liar never returned: the client cannot
    # tell which of the two lied, bans neither, rebuilds the last hop and pulls from then on
    assert not banned and not result.recoveries
    assert [n.push.forwarded for n in nodes] == [1, 1, 0]


def test_a_hop_answering_garbage_in_push_mode_is_banned_and_its_successors_rebuilt(
    tiny_model, reference, tmp_path
):
    import dataclasses

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            nodes = await chain(swarm, tmp_path)
            spare = await swarm.add_node(2, 3, tmp_path / "spare", emulate_latency_ms=30)
            liar, original = nodes[1], nodes[1].handle

            async def handle(msg, *args):
                reply = await original(msg, *args)
                if isinstance(msg, m.PushStep) and msg.step == 3:  # forwards the truth,
                    return dataclasses.replace(reply, hidden=reply.hidden * float("nan"))
                return reply

            liar.handle = handle  # type: ignore[method-assign]
            client = swarm.client(push=True)
            result = await client.generate(PROMPT, PARAMS)
            return result, liar, spare, client.peers.banned()
        finally:
            await swarm.close()

    result, liar, spare, banned = run(main())
    assert result.token_ids == reference.token_ids
    assert [r.peer_id for r in result.recoveries] == [liar.peer_id]
    assert [h.peer_id for h in result.recoveries[0].replacement] == [spare.peer_id]
    assert set(banned) == {liar.peer_id}  # the last hop, rebuilt, is not blamed


def test_a_hop_failing_its_push_step_is_failed_over_with_the_same_answer(
    tiny_model, reference, tmp_path
):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            nodes = await chain(swarm, tmp_path)
            spare = await swarm.add_node(2, 3, tmp_path / "spare", emulate_latency_ms=30)
            bad, original, calls = nodes[1], nodes[1].handle, [0]

            async def handle(msg, *args):
                if isinstance(msg, (m.PushStep, m.Step)):
                    calls[0] += 1
                    if calls[0] > 3:  # dies after 3 steps (a crash: every request fails)
                        raise RemoteError("crashed")
                return await original(msg, *args)

            bad.handle = handle  # type: ignore[method-assign]
            client = swarm.client(push=True)
            result = await client.generate(PROMPT, PARAMS)
            return result, bad, spare, client.peers.banned()
        finally:
            await swarm.close()

    result, bad, spare, banned = run(main())
    assert result.token_ids == reference.token_ids
    assert [r.peer_id for r in result.recoveries] == [bad.peer_id]
    assert [h.peer_id for h in result.recoveries[0].replacement] == [spare.peer_id]
    assert bad.peer_id in banned
    assert spare.push.forwarded > 0  # the session kept pushing on the new route


def test_auto_mode_pushes_once_nodes_announce_rtts_to_their_next_hops(
    tiny_model, reference, tmp_path
):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            nodes = [await swarm.add_node(a, b, tmp_path / f"n{a}", emulate_latency_ms=30)
                     for a, b in ((0, 2), (2, 3), (3, 4))]  # every round trip (pings): ~30 ms
            for node in nodes:  # what their periodic round does (``measure_every``)
                await node.push.measure_successors()
                await node.announcer.announce_now()
            client = swarm.client()  # push=None: auto
            result = await client.generate(PROMPT, PARAMS)
            return result, nodes
        finally:
            await swarm.close()

    result, nodes = run(main())
    assert result.token_ids == reference.token_ids
    assert nodes[0].rtts[nodes[1].peer_id] >= 30.0  # measured, announced, ms
    assert nodes[2].rtts == {}  # the last block's node has no next hop
    # pull: 3 round trips a token (~90 ms); push: 4 one-way transfers (~60 ms): 30 ms saved,
    # past push_min_gain_ms (10): auto chose push
    assert nodes[0].push.forwarded == PARAMS.max_new_tokens


# ------------------------------------------------------------------ the node's rules


def _push(session_id: str, step: int, expect: bytes, **next_hop) -> m.PushStep:
    fields = dict(next_endpoint="", next_peer_id="", next_session_id="", next_step=0,
                  next_secret=b"")
    fields.update(next_hop)
    return m.PushStep(1, session_id, step, b"", expect, **fields)


def test_a_node_takes_a_forward_only_with_the_secret_at_the_expected_step(tiny_model, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            node = await swarm.add_node(0, 4, tmp_path / "n")
            size = node.spec.hidden_size
            x = torch.randn(1, 2, size)
            await node.handle(m.OpenSession(1, "s", node.spec.model_id, 0, 4, 64), 7)
            secret = new_secret()
            errors = {}
            with pytest.raises(UnknownSession):
                await node.handle(m.Forward(1, "nope", 0, x, secret), 8)
            waiting = asyncio.create_task(node.handle(_push("s", 0, secret_digest(secret)), 7))
            await asyncio.sleep(0)
            for name, msg, owner in [
                ("wrong secret", m.Forward(1, "s", 0, x, new_secret()), 8),
                ("wrong step", m.Forward(1, "s", 1, x, secret), 8),
                ("bad shape", m.Forward(1, "s", 0, torch.randn(1, 2, size + 1), secret), 8),
                ("huge secret", m.Forward(1, "s", 0, x, b"x" * 65), 8),
                ("second push step", _push("s", 0, secret_digest(secret)), 7),
            ]:
                with pytest.raises(LimitExceeded) as caught:
                    await node.handle(msg, owner)
                errors[name] = str(caught.value)
            with pytest.raises(UnknownSession):  # a PushStep is the session owner's only
                await node.handle(_push("s", 0, secret_digest(secret)), 8)
            assert not waiting.done()
            # the right secret from any connection (the previous hop's) runs the step
            assert isinstance(await node.handle(m.Forward(1, "s", 0, x, secret), 8), m.Forwarded)
            result = await waiting
            # the same output a Step gives, receipt and all
            await node.handle(m.OpenSession(1, "t", node.spec.model_id, 0, 4, 64), 7)
            pulled = await node.handle(m.Step(1, "t", 0, x), 7)
            return result, pulled, errors
        finally:
            await swarm.close()

    result, pulled, errors = run(main())
    assert isinstance(result, m.StepResult) and result.step == 0 and result.receipt
    assert torch.equal(result.hidden, pulled.hidden)
    assert "not the input its push step waits for" in errors["wrong secret"]
    assert "expects step 0" in errors["wrong step"]
    assert "in flight already" in errors["second push step"]


def test_a_forward_ahead_of_its_push_step_is_held_and_a_step_supersedes(tiny_model, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            node = await swarm.add_node(0, 4, tmp_path / "n")
            x = torch.randn(1, 1, node.spec.hidden_size)
            await node.handle(m.OpenSession(1, "s", node.spec.model_id, 0, 4, 64), 7)
            secret = new_secret()
            await node.handle(m.Forward(1, "s", 0, x, secret), 8)  # before its PushStep
            with pytest.raises(LimitExceeded, match="holds a forward already"):
                await node.handle(m.Forward(1, "s", 0, x, new_secret()), 8)
            first = await node.handle(_push("s", 0, secret_digest(secret)), 7)
            # step 1: a PushStep waits; the client falls back to pull with a Step
            waiting = asyncio.create_task(node.handle(_push("s", 1, secret_digest(secret)), 7))
            await asyncio.sleep(0)
            pulled = await node.handle(m.Step(1, "s", 1, x), 7)
            with pytest.raises(LimitExceeded, match="superseded"):
                await waiting
            late = node.handle(m.Forward(1, "s", 1, x, secret), 8)  # the old forward: too late
            with pytest.raises(LimitExceeded, match="expects step 2"):
                await late
            return first, pulled, node
        finally:
            await swarm.close()

    first, pulled, node = run(main())
    assert first.step == 0 and pulled.step == 1
    assert node.push.waiting == {} and node.push.held == {}


def test_a_push_step_whose_input_never_comes_gives_up_and_the_session_steps_on(
    tiny_model, tmp_path, monkeypatch
):
    from layerchain.node import push as node_push

    monkeypatch.setattr(node_push, "FORWARD_WAIT_S", 0.05)

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            node = await swarm.add_node(0, 4, tmp_path / "n")
            x = torch.randn(1, 1, node.spec.hidden_size)
            await node.handle(m.OpenSession(1, "s", node.spec.model_id, 0, 4, 64), 7)
            await node.handle(m.Forward(1, "s", 0, x, new_secret()), 8)  # a stranger's guess
            with pytest.raises(LimitExceeded, match="no input was forwarded"):
                await node.handle(_push("s", 0, secret_digest(new_secret())), 7)
            await asyncio.sleep(0.06)  # a held forward nobody claimed expires
            await node.handle(m.Forward(1, "s", 0, x, new_secret()), 8)
            return await node.handle(m.Step(1, "s", 0, x), 7), node
        finally:
            await swarm.close()

    result, node = run(main())
    assert result.step == 0 and node.push.waiting == {} and node.push.held == {}


# ------------------------------------------------------------------ the auto choice


def _peer(pid: str, start: int, end: int, rtt_ms: float) -> RoutePeer:
    return RoutePeer(pid, start, end, ms_per_block=1.0, price_per_block=0.0, rtt_ms=rtt_ms)


def test_auto_pushes_only_when_the_announced_peer_rtts_make_push_faster():
    peers = {p.id: p for p in (_peer("a", 0, 2, 50.0), _peer("b", 2, 4, 50.0),
                               _peer("c", 4, 6, 50.0))}
    route = [Hop("a", 0, 2), Hop("b", 2, 4), Hop("c", 4, 6)]
    # pull: 3 round trips of 50 ms; push: 25 + (ab)/2 + (bc)/2 + 25
    assert not push_is_faster(route, peers, {})  # nothing announced: the same cost: pull
    assert push_is_faster(route, peers, {("a", "b"): 1.0, ("c", "b"): 1.0})  # either order
    assert not push_is_faster(route, peers, {("a", "b"): 200.0, ("b", "c"): 200.0})
    # 150 - (25 + 0.5 + 0.5 + 25) = 99 ms saved: past a 10 ms minimum, not past 100
    assert push_is_faster(route, peers, {("a", "b"): 1.0, ("b", "c"): 1.0}, min_gain_ms=10.0)
    assert not push_is_faster(route, peers, {("a", "b"): 1.0, ("b", "c"): 1.0}, 100.0)
    assert not push_is_faster(route[:1], peers, {})  # one hop: nothing to gain
    assert not push_is_faster([Hop("x", 0, 6)], peers, {})  # unknown peer


def test_announced_rtts_reads_every_records_pairs(record_for):
    from layerchain.discovery import Identity

    a, b = Identity.generate(), Identity.generate()
    records = [record_for(a, 0, 2, rtts=((b.peer_id, 12.5),)), record_for(b, 2, 4)]
    assert announced_rtts(records) == {(a.peer_id, b.peer_id): 12.5}


# ------------------------------------------------------------------ real node processes


@pytest.fixture(scope="module")
def process_swarm(tmp_path_factory):
    """Two hops of the default model and a spare for the first, as real processes on
    loopback (TLS links, hivemind DHT)."""
    from layerchain.local import swarm_down, swarm_up
    from layerchain.types import Span

    state = tmp_path_factory.mktemp("push-swarm")
    local = swarm_up(state, [Span(0, 15), Span(0, 15), Span(15, 30)])
    try:
        yield local
    finally:
        swarm_down(state, quiet=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_push_over_real_nodes_equals_pull_and_survives_a_kill_9_of_a_hop(process_swarm):
    import os
    import signal

    from layerchain.client import Swarm

    params = SamplingParams(max_new_tokens=8)
    prompt = "Name three rivers in Europe."
    pid_of = {n["peer_id"]: n["pid"] for n in process_swarm.nodes}
    # audit_rate 0: each token is shown as computed, so the kill lands between steps
    config = dict(step_timeout_s=5.0, ban_base_s=60.0, audit_rate=0.0)
    with Swarm(process_swarm.initial_peers, push=False, **config) as client:
        pulled = client.generate(prompt, params)
    with Swarm(process_swarm.initial_peers, push=True, **config) as client:
        pushed = client.generate(prompt, params)
        assert list(pushed.token_ids) == list(pulled.token_ids)
        gen = client.stream(prompt, params)
        killed = None
        for event in gen:
            if event.index == 3:  # the first hop: the last one waits for its forward
                killed = gen.route[0].peer_id
                os.kill(pid_of[killed], signal.SIGKILL)
        result = gen.result
    assert list(result.token_ids) == list(pulled.token_ids)
    assert [r.peer_id for r in result.recoveries] == [killed]


@pytest.mark.parametrize("flag, push", [([], None), (["--push"], True), (["--no-push"], False)])
def test_generate_push_flags_set_the_client_config(monkeypatch, flag, push):
    from typer.testing import CliRunner

    from layerchain.cli import generate as cli_generate
    from layerchain.cli.main import app
    from layerchain.client import ClientConfig

    seen = {}
    monkeypatch.setattr(cli_generate, "_generate_swarm",
                        lambda *args: seen.update(args[-1]))
    out = CliRunner().invoke(app, ["generate", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x",
                                   "--prompt", "hi", *flag])
    assert out.exit_code == 0, out.output
    assert seen["push"] is push
    assert ClientConfig(push=push).push is push


@pytest.mark.parametrize("wire", ["bf16", "int8"])
def test_push_mode_with_a_compressed_wire_gives_pull_modes_tokens(tiny_model, tmp_path, wire):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            nodes = await chain(swarm, tmp_path)
            pulled = await swarm.client(push=False, wire=wire).generate(PROMPT, PARAMS)
            pushed = await swarm.client(push=True, wire=wire).generate(PROMPT, PARAMS)
            return pulled, pushed, nodes
        finally:
            await swarm.close()

    pulled, pushed, nodes = run(main())
    assert pushed.token_ids == pulled.token_ids
    assert not pushed.recoveries
    assert nodes[0].push.forwarded == PARAMS.max_new_tokens  # the receipts matched: no fallback

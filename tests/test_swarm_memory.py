"""In-process swarms over the memory transport and memory discovery: fast, real model code.

Nodes and the client run in one event loop; everything but the sockets and the DHT is the
real thing (real spans, real sessions, real planner, real failover).
"""

from __future__ import annotations

import asyncio

import pytest
from memswarm import MemorySwarm

from layerchain.errors import LimitExceeded, NoRoute, PeerBusy, UnknownSession
from layerchain.model import SamplingParams

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=16)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_three_nodes_match_the_single_process_model(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for start, end in ((0, 1), (1, 3), (3, 4)):
                await swarm.add_node(start, end, tmp_path)
            client = swarm.client()
            result = await client.generate(PROMPT, SamplingParams(max_new_tokens=16))
            return result
        finally:
            await swarm.close()

    result = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    assert result.text == reference(tiny_model, PROMPT, PARAMS).text
    assert [(h.start, h.end) for h in result.route] == [(0, 1), (1, 3), (3, 4)]
    assert result.recoveries == ()


def test_overlapping_spans_use_sub_ranges(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            await swarm.add_node(0, 3, tmp_path)
            await swarm.add_node(2, 4, tmp_path)
            return await swarm.client().generate(PROMPT, SamplingParams(max_new_tokens=16))
        finally:
            await swarm.close()

    result = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    covered = [b for hop in result.route for b in range(hop.start, hop.end)]
    assert covered == [0, 1, 2, 3]


def test_a_failing_hop_is_replaced_and_the_answer_is_unchanged(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            first = await swarm.add_node(0, 2, tmp_path)
            await swarm.add_node(0, 2, tmp_path)  # the spare
            await swarm.add_node(2, 4, tmp_path)
            client = swarm.client()
            # whichever of the two 0:2 nodes the route takes first breaks at its 6th step
            dead: list[int] = []
            for index, node in enumerate(swarm.nodes[:2]):
                original = node.handle
                calls = {"steps": 0}

                async def dying(msg, *args, original=original, calls=calls, index=index):
                    if type(msg).__name__ == "Step":
                        calls["steps"] += 1
                        if calls["steps"] == 6 and not dead:
                            dead.append(index)
                        if dead == [index]:  # from then on it has lost every session
                            raise UnknownSession("node restarted")
                    return await original(msg, *args)

                node.handle = dying
            result = await client.generate(PROMPT, SamplingParams(max_new_tokens=16))
            return result, first
        finally:
            await swarm.close()

    result, _ = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    assert len(result.recoveries) == 1
    recovery = result.recoveries[0]
    assert (recovery.start, recovery.end) == (0, 2)
    assert recovery.replacement[0].peer_id != recovery.peer_id


def test_busy_node_is_skipped(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            small = await swarm.add_node(0, 4, tmp_path, max_cache_tokens=8)
            with pytest.raises((PeerBusy, LimitExceeded)):  # no room now / never this much
                small.sessions.open("x", 64, None)
            await swarm.add_node(0, 4, tmp_path)
            return await swarm.client().generate(PROMPT, SamplingParams(max_new_tokens=16)), small
        finally:
            await swarm.close()

    result, small = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids


def test_uncovered_blocks_are_named(tiny_model, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            await swarm.add_node(0, 2, tmp_path)
            await swarm.client().generate(PROMPT, SamplingParams(max_new_tokens=4))
        finally:
            await swarm.close()

    with pytest.raises(NoRoute, match="2:4"):
        run(main())


def test_routing_limits_per_generation(tiny_model, reference, tmp_path):
    """A dear pair and a cheap pair over the same blocks: one client, three generations with
    their own limits; the client's own limits are untouched."""
    from layerchain.client import RouteLimits

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            dear = [await swarm.add_node(0, 2, tmp_path / "d0", price_per_block=5),
                    await swarm.add_node(2, 4, tmp_path / "d1", price_per_block=5)]
            cheap = [await swarm.add_node(0, 2, tmp_path / "c0", price_per_block=1,
                                          emulate_latency_ms=30),
                     await swarm.add_node(2, 4, tmp_path / "c1", price_per_block=1,
                                          emulate_latency_ms=30)]
            client = swarm.client()
            params = SamplingParams(max_new_tokens=16)
            fast = await client.generate(PROMPT, params)
            thrifty = await client.generate(PROMPT, params, limits=RouteLimits(max_price=4 * 1))
            with pytest.raises(NoRoute):
                await client.generate(PROMPT, params, limits=RouteLimits(max_price=1))
            again = await client.generate(PROMPT, params)
            ids = lambda nodes: {n.peer_id for n in nodes}  # noqa: E731
            return fast, thrifty, again, ids(dear), ids(cheap), client.config
        finally:
            await swarm.close()

    fast, thrifty, again, dear, cheap, config = run(main())
    assert {h.peer_id for h in fast.route} == dear == {h.peer_id for h in again.route}
    assert {h.peer_id for h in thrifty.route} == cheap
    assert fast.token_ids == thrifty.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    assert config.limits.max_price is None


def test_a_step_is_answered_in_the_dtype_it_was_sent_in(tiny_model, tmp_path):
    """The node computes in fp32; a client sending fp16 or bf16 gets that dtype back."""
    import torch

    from layerchain.wire import MemoryTransport
    from layerchain.wire import messages as m
    from layerchain.wire.rpc import RpcClient

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            node = await swarm.add_node(0, 4, tmp_path / "n")
            rpc = RpcClient(await MemoryTransport(swarm.wire).connect(node.endpoint))
            await rpc.call(m.OpenSession(rid=0, session_id="s", model_id=swarm.spec.model_id,
                                         start=0, end=4, max_length=64), timeout=5)
            replies = []
            for step, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16)):
                hidden = torch.randn(1, 3, swarm.spec.hidden_size).to(dtype)
                replies.append(await rpc.call(
                    m.Step(rid=0, session_id="s", step=step, hidden=hidden), timeout=5))
            return replies
        finally:
            await swarm.close()

    replies = run(main())
    assert [r.hidden.dtype for r in replies] == [torch.float32, torch.bfloat16, torch.float16]
    assert all(tuple(r.hidden.shape[:2]) == (1, 3) for r in replies)
    assert all(bool(torch.isfinite(r.hidden.float()).all()) for r in replies)

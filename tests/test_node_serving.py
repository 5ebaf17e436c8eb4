"""A real node (SmolLM2 blocks 0:15) in this event loop over the memory transport: long steps
do not stall it, one client cannot reserve its whole cache, its errors are the documented ones."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from layerchain.discovery import Identity, MemoryDHT, MemoryDiscovery
from layerchain.errors import LimitExceeded, PeerBusy
from layerchain.model import load_span
from layerchain.node import Node, NodeConfig
from layerchain.wire import (
    MAX_STEP_TOKENS,
    Info,
    Limits,
    MemoryNetwork,
    MemoryTransport,
    OpenSession,
    Ping,
    RpcClient,
    Step,
)

pytestmark = pytest.mark.timeout(180)
BLOCKS = (0, 15)


@pytest.fixture(scope="module")
def span(smollm2_spec):
    return load_span(smollm2_spec, *BLOCKS)


async def start_node(spec, span, tmp_path, **settings) -> tuple[Node, MemoryNetwork]:
    network, identity = MemoryNetwork(), Identity.generate()
    node = Node(
        NodeConfig(start=BLOCKS[0], end=BLOCKS[1], data_dir=tmp_path, **settings),
        spec=spec, span=span, transport=MemoryTransport(network),
        listen_at=f"mem://{identity.peer_id}", discovery=MemoryDiscovery(MemoryDHT(), identity),
        identity=identity,
    )
    await node.start()
    return node, network


async def client(node: Node, network: MemoryNetwork, limits: Limits = Limits()) -> RpcClient:
    return RpcClient(await MemoryTransport(network, limits=limits).connect(node.endpoint))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 150))


def test_a_long_prefill_leaves_the_node_answering_pings_and_other_sessions(
    smollm2_spec, span, tmp_path
):
    """Before: a prefill held the event loop for its whole length (a 4,000-token prompt: 11 s
    without a pong). Now pings and another session's decode steps get through between blocks,
    and the prefill's output is bit for bit what one forward computes."""
    H, model_id = smollm2_spec.hidden_size, smollm2_spec.model_id
    prompt = torch.randn(1, MAX_STEP_TOKENS, H)

    async def main():
        node, network = await start_node(smollm2_spec, span, tmp_path)
        long, other, pinger = [await client(node, network) for _ in range(3)]
        await long.call(OpenSession(0, "long", model_id, *BLOCKS, 2 * MAX_STEP_TOKENS), 5)
        await other.call(OpenSession(0, "other", model_id, *BLOCKS, 64), 5)
        await other.call(Step(0, "other", 0, torch.randn(1, 4, H)), 30)
        t0 = time.perf_counter()
        prefill = asyncio.create_task(long.call(Step(0, "long", 0, prompt), 120))
        pongs, decodes, step = [], [], 1
        await asyncio.sleep(0)
        while not prefill.done():
            t = time.perf_counter()
            await pinger.call(Ping(0, 1), 60)
            pongs.append(time.perf_counter() - t)
            if len(pongs) % 5 == 0:
                t = time.perf_counter()
                await other.call(Step(0, "other", step, torch.randn(1, 1, H)), 60)
                decodes.append(time.perf_counter() - t)
                step += 1
            await asyncio.sleep(0.01)
        result = await prefill
        took = time.perf_counter() - t0
        await node.stop(drain_s=0)
        return result, took, pongs, decodes

    result, took, pongs, decodes = run(main())
    cache = span.new_cache()
    expected = span.forward(prompt, cache)
    assert torch.equal(result.hidden, expected)
    print(f"prefill of {MAX_STEP_TOKENS} tokens on 15 blocks: {took:.2f} s; {len(pongs)} pings, "
          f"slowest {max(pongs) * 1000:.0f} ms; {len(decodes)} decode steps of another session")
    # a quiet machine prefills 512 tokens of 15 blocks in ~0.45 s: still many pings long
    assert took > 0.2, "too fast to show anything"
    assert len(pongs) >= 5 and max(pongs) < max(0.35, took / 4), (took, pongs)
    assert len(decodes) >= 1


def test_steps_over_max_step_tokens_are_refused_whatever_the_transport_lets_through(
    smollm2_spec, span, tmp_path
):
    H, model_id = smollm2_spec.hidden_size, smollm2_spec.model_id
    loose = Limits(max_tensor_tokens=10**6)

    async def main():
        node, network = await start_node(smollm2_spec, span, tmp_path)
        rpc = await client(node, network, loose)  # the client's codec lets 513 tokens out
        await rpc.call(OpenSession(0, "s", model_id, *BLOCKS, 4 * MAX_STEP_TOKENS), 5)
        with pytest.raises(LimitExceeded, match="tokens"):  # the node's codec refuses them
            await rpc.call(Step(0, "s", 0, torch.zeros(1, MAX_STEP_TOKENS + 1, H)), 30)
        node.transport = MemoryTransport(network, limits=loose)  # and a node with loose
        await node.listener.close()                               # limits still refuses
        node.listener = await node.transport.listen(node.listen_at + "-loose", node._serve)
        rpc2 = RpcClient(await MemoryTransport(network, limits=loose).connect(node.endpoint))
        await rpc2.call(OpenSession(0, "t", model_id, *BLOCKS, 4 * MAX_STEP_TOKENS), 5)
        with pytest.raises(LimitExceeded, match=f"at most {MAX_STEP_TOKENS} tokens"):
            await rpc2.call(Step(0, "t", 0, torch.zeros(1, 3 * MAX_STEP_TOKENS, H)), 30)
        ok = await rpc2.call(Step(0, "t", 0, torch.zeros(1, 8, H)), 30)  # the session is fine
        await node.stop(drain_s=0)
        return ok

    assert run(main()).hidden.shape == (1, 8, H)


def test_one_connection_cannot_squat_the_cache_and_unstepped_sessions_expire(
    smollm2_spec, span, tmp_path
):
    """Before: one OpenSession with max_length = the whole cache made every other client
    'busy' for the session idle timeout (5 minutes)."""
    H, model_id = smollm2_spec.hidden_size, smollm2_spec.model_id
    cache = 2048  # per session: 512 (a quarter), per connection: 1024 (a half)

    async def main():
        node, network = await start_node(smollm2_spec, span, tmp_path, max_cache_tokens=cache,
                                         first_step_timeout_s=0.6)
        squatter, honest = await client(node, network), await client(node, network)
        with pytest.raises(LimitExceeded, match="one session may reserve"):
            await squatter.call(OpenSession(0, "all", model_id, *BLOCKS, cache), 5)
        held = 0
        for i in range(8):
            try:
                await squatter.call(OpenSession(0, f"sq{i}", model_id, *BLOCKS, 512), 5)
                held += 512
            except PeerBusy:
                pass
        info = await honest.call(Info(0), 5)
        await honest.call(OpenSession(0, "honest", model_id, *BLOCKS, 512), 5)
        await honest.call(Step(0, "honest", 0, torch.randn(1, 16, H)), 30)
        await asyncio.sleep(1.6)  # the squatter's sessions never stepped: closed
        after = await honest.call(Info(0), 5)
        await honest.call(Step(0, "honest", 1, torch.randn(1, 1, H)), 30)  # still open
        await node.stop(drain_s=0)
        return held, info, after

    held, info, after = run(main())
    assert held == 1024  # its connection's share
    assert info.free_cache_tokens == 512  # announced: what one session may get
    assert after.free_cache_tokens == 512

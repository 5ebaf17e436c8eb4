"""Fine-tuning through remote blocks, in process (tiny model, memory transport): the remote
path's loss and gradients equal autograd through the whole model, a hop that dies between
forward and backward is redone on a replica, nodes refuse bad training requests, priced
nodes are paid for forward and backward work, and adapters round-trip."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest
import torch
from memswarm import MemorySwarm

from layerchain.errors import ConfigError, LimitExceeded, UnknownSession
from layerchain.market import ChannelPayer, Wallet, reservation_amount
from layerchain.model import load_head, load_span, resolve_model
from layerchain.model.adapter import Adapter, load_adapter, save_adapter
from layerchain.model.generate import Decoder
from layerchain.model.light_tokenizer import load_client_tokenizer
from layerchain.model.sampling import SamplingParams
from layerchain.train.data import encode, read_records
from layerchain.train.finetune import (
    FinetuneConfig,
    LocalBlocks,
    Trainer,
    make_batches,
)
from layerchain.train.remote import RemoteBlocks
from layerchain.wire import messages as m

TASK = Path(__file__).parents[1] / "examples" / "finetune" / "pirate.jsonl"


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


@pytest.fixture(scope="module")
def parts(tiny_model):
    spec = resolve_model(tiny_model)
    tokenizer = load_client_tokenizer(spec)
    examples = [encode(r, tokenizer, max_tokens=64) for r in read_records(TASK)[:6]]
    return spec, tokenizer, examples


@pytest.fixture
def loop():
    """An event loop on its own thread (the nodes and the client's I/O), as ``Swarm`` runs
    one: autograd calls the remote hops synchronously from this (the training) thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, 60), loop).result()

    yield run

    async def drain():  # what nodes left running (voucher saves), before the loop stops
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(drain(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def swarm_of(run, model, spans, tmp_path, **node):
    swarm = MemorySwarm(model)
    for i, (start, end) in enumerate(spans):
        run(swarm.add_node(start, end, tmp_path / f"n{i}", **node))
    return swarm


def gradients(trainer: Trainer, examples, blocks) -> tuple[float, list[torch.Tensor]]:
    """One step's loss and the trained parameters' gradients (no optimizer step)."""
    trainer.optimizer.zero_grad()
    batches = make_batches(examples, trainer.pad_id, trainer.virtual_tokens)
    count = sum(e.loss_tokens for e in examples)
    total = 0.0
    widest = max(b.input_ids.numel() + b.input_ids.shape[0] * trainer.virtual_tokens
                 for b in batches)
    with blocks.open(widest, len(batches)) as through:
        for batch in batches:
            loss, _ = trainer.loss_sum(batch, through)
            (loss / count).backward()
            total += float(loss.detach())
    return total / count, [p.grad.clone() for p in trainer.parameters()]


@pytest.mark.parametrize("method", ["prompt", "lora"])
def test_remote_gradients_equal_autograd_through_the_whole_model(parts, tiny_model, loop,
                                                                 tmp_path, method):
    spec, tokenizer, examples = parts
    config = FinetuneConfig(method=method, virtual_tokens=4, max_tokens=64)
    local = Trainer(spec, load_head(spec), config, tokenizer=tokenizer)
    remote = Trainer(spec, load_head(spec), config, tokenizer=tokenizer)
    if method == "lora":  # B starts at zero: move it, so the LoRA path carries gradient
        for trainer in (local, remote):
            torch.manual_seed(1)
            trainer.lora.b.data.normal_(0, 0.05)
    swarm = swarm_of(loop, tiny_model, [(0, 1), (1, 3), (3, 4)], tmp_path)
    try:
        client = swarm.client()
        blocks = RemoteBlocks(client, loop)
        expected_loss, expected = gradients(local, examples, LocalBlocks(load_span(spec, 0, 4)))
        loss, got = gradients(remote, examples, blocks)
    finally:
        loop(swarm.close())
    assert abs(loss - expected_loss) < 1e-5
    for g, e in zip(got, expected, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert blocks.sessions == 1 and blocks.recoveries == 0


def test_a_hop_dead_before_its_backward_is_redone_on_a_replica(parts, tiny_model, loop,
                                                               tmp_path):
    spec, tokenizer, examples = parts
    config = FinetuneConfig(method="prompt", virtual_tokens=4, max_tokens=64)
    local = Trainer(spec, load_head(spec), config, tokenizer=tokenizer)
    remote = Trainer(spec, load_head(spec), config, tokenizer=tokenizer)
    swarm = swarm_of(loop, tiny_model, [(0, 2), (2, 4), (2, 4)], tmp_path)
    by_peer = {node.peer_id: node for node in swarm.nodes}
    blocks = RemoteBlocks(swarm.client(), loop)
    stopped = []

    class KillAfterForward:
        """The swarm's blocks, the last hop's node stopped once the forward is done."""

        @contextlib.contextmanager
        def open(self, max_tokens, requests):
            with blocks.open(max_tokens, requests) as through:
                def run(x):
                    y = through(x)
                    victim = by_peer[blocks.current.hops[-1].hop.peer_id]
                    loop(victim.stop(drain_s=0))
                    stopped.append(victim.peer_id)
                    return y
                yield run

    try:
        expected_loss, expected = gradients(local, examples[:2],
                                            LocalBlocks(load_span(spec, 0, 4)))
        loss, got = gradients(remote, examples[:2], KillAfterForward())
    finally:
        loop(swarm.close())
    assert abs(loss - expected_loss) < 1e-5
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-6)
    assert blocks.recoveries == 1 and len(stopped) == 1


async def open_training_session(node, max_length=64):
    await node.handle(m.OpenSession(1, "s", node.spec.model_id, node.span.start, node.span.end,
                                    max_length))


def test_nodes_refuse_bad_training_requests(tiny_model, loop, tmp_path):
    swarm = swarm_of(loop, tiny_model, [(0, 4)], tmp_path)
    node = swarm.nodes[0]
    h = node.spec.hidden_size
    x = torch.randn(1, 8, h)
    try:
        loop(open_training_session(node))
        cases = [
            (m.TrainForward(2, "s", 0, torch.randn(1, 8, h + 1)), "must be \\[B, T"),
            (m.TrainForward(2, "s", 0, torch.full((1, 8, h), float("nan"))), "non-finite"),
            (m.TrainForward(2, "s", 0, torch.randn(2, m.MAX_TRAIN_TOKENS, h)), "at most"),
            (m.TrainForward(2, "s", 0, torch.randn(2, 40, h)), "more than session s reserved"),
            (m.TrainForward(2, "s", 5, x), "expects step 0"),
            (m.TrainBackward(2, "s", 0, x, torch.randn(1, 7, h)), "grad must have"),
            (m.TrainBackward(2, "s", 0, x, torch.full((1, 8, h), float("inf"))), "non-finite"),
        ]
        for msg, error in cases:
            with pytest.raises(LimitExceeded, match=error):
                loop(node.handle(msg, 0))
        with pytest.raises(UnknownSession):
            loop(node.handle(m.TrainForward(2, "other", 0, x), 0))
        # a good pair still works after all that: the step numbers were not consumed
        out = loop(node.handle(m.TrainForward(3, "s", 0, x), 0))
        back = loop(node.handle(m.TrainBackward(4, "s", 1, x, torch.ones_like(x)), 0))
        assert out.hidden.shape == x.shape and back.grad.shape == x.shape
    finally:
        loop(swarm.close())


def test_priced_nodes_are_paid_for_forward_and_backward(parts, tiny_model, loop, ledger,
                                                        tmp_path):
    spec, tokenizer, examples = parts
    wallet = Wallet.generate()
    ledger.deposit(wallet, 1_000_000)
    payer = ChannelPayer(wallet, ledger)
    swarm = swarm_of(loop, tiny_model, [(0, 1), (1, 4)], tmp_path, ledger=ledger,
                     price_per_block=2)
    config = FinetuneConfig(method="prompt", virtual_tokens=4, max_tokens=64)
    trainer = Trainer(spec, load_head(spec), config, tokenizer=tokenizer)
    try:
        client = swarm.client(payer=payer)
        blocks = RemoteBlocks(client, loop)
        stats = trainer.step(examples[:2], blocks)
    finally:
        loop(swarm.close())
    batch = make_batches(examples[:2], trainer.pad_id, 4)[0]
    tokens = batch.input_ids.numel() + 2 * 4  # B x (N + T) of the one request
    fee = sum(reservation_amount(tokens, blocks_, 2) for blocks_ in (1, 3))
    work = (1 + m.BACKWARD_TOKEN_FACTOR) * tokens * 4 * 2  # forward + backward, 4 blocks
    assert blocks.cost == fee + work
    assert stats.loss > 0
    # redeemed on the ledger by the nodes (at session end or when they stopped)
    assert sum(ledger.balance(node.wallet) for node in swarm.nodes) == fee + work


def test_adapter_round_trip_and_application(parts, tmp_path):
    spec, tokenizer, _ = parts
    head = load_head(spec)
    h, v = spec.hidden_size, spec.vocab_size
    adapter = Adapter("lora", spec.model_id, spec.name, h, v, prefix=torch.randn(3, h),
                      lora_a=torch.randn(2, h), lora_b=torch.randn(v, 2), lora_scale=0.5)
    loaded = load_adapter(save_adapter(adapter, tmp_path / "a"))
    for name in ("prefix", "lora_a", "lora_b"):
        assert torch.equal(getattr(loaded, name), getattr(adapter, name))
    loaded.check(spec)
    hidden = torch.randn(1, 2, h)
    normed = head.norm(hidden)
    delta = 0.5 * normed @ adapter.lora_a.T @ adapter.lora_b.T
    before = head.logits(hidden)
    adapted = loaded.apply(head)
    torch.testing.assert_close(adapted.logits(hidden), before + delta, rtol=1e-4, atol=1e-4)
    assert torch.equal(head.logits(hidden), before)  # the base head is untouched
    assert torch.equal(adapted.embed(torch.tensor([[5]])), head.embed(torch.tensor([[5]])))
    # the prefix goes before the prompt's first input only
    decoder = Decoder(head, tokenizer, [5, 6], SamplingParams(max_new_tokens=2), prefix=loaded.prefix)
    first = decoder.next_input()
    assert first.shape == (1, 5, h) and torch.equal(first[0, :3], adapter.prefix)
    decoder.accept(torch.randn(1, 5, h))
    assert decoder.next_input().shape == (1, 1, h)


def test_bad_adapters_are_clear_errors(parts, tmp_path):
    spec, _, _ = parts
    with pytest.raises(ConfigError, match="holds no adapter"):
        load_adapter(tmp_path)
    h, v = spec.hidden_size, spec.vocab_size
    other = Adapter("prompt", "f" * 64, "other", h, v, prefix=torch.zeros(2, h))
    with pytest.raises(ConfigError, match="trained on model other"):
        other.check(spec)
    with pytest.raises(ConfigError, match="prefix must be"):
        Adapter("prompt", spec.model_id, spec.name, h, v, prefix=torch.zeros(2, h + 1))
    save_adapter(other, tmp_path / "b")
    (tmp_path / "b" / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        load_adapter(tmp_path / "b")


def test_padding_does_not_change_the_loss(parts):
    spec, tokenizer, examples = parts
    span = load_span(spec, 0, spec.num_blocks)
    trainer = Trainer(spec, load_head(spec), FinetuneConfig(virtual_tokens=4, max_tokens=64),
                      tokenizer=tokenizer)
    a, b = examples[0], encode({"text": "Arr!"}, tokenizer)
    with torch.no_grad():
        together = make_batches([a, b], trainer.pad_id, 4)
        alone = make_batches([a], trainer.pad_id, 4) + make_batches([b], trainer.pad_id, 4)
        assert len(together) == 1 and together[0].input_ids.shape[0] == 2
        joint = trainer.loss_sum(together[0], span.forward)[0]
        separate = sum(trainer.loss_sum(batch, span.forward)[0] for batch in alone)
    torch.testing.assert_close(joint, separate, rtol=1e-5, atol=1e-5)


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="--method"):
        FinetuneConfig(method="full")
    with pytest.raises(ConfigError, match="--max-tokens"):
        FinetuneConfig(max_tokens=m.MAX_TRAIN_TOKENS)


def test_generation_with_an_adapter_through_the_swarm_equals_local(parts, tiny_model, tmp_path):
    """A prefix and a LoRA head through audited hops: the tokens ``generate_local`` gives
    with the same adapter (the prefix's positions counted in the cache and the audits)."""
    from layerchain.client import AsyncSwarm, ClientConfig
    from layerchain.discovery import MemoryDiscovery
    from layerchain.model import LocalModel
    from layerchain.wire import MemoryTransport

    spec, tokenizer, _ = parts
    head = load_head(spec)
    torch.manual_seed(3)
    h, v = spec.hidden_size, spec.vocab_size
    rows = head.embed(torch.tensor([[7, 8, 9]]))[0].clone()
    adapter = Adapter("lora", spec.model_id, spec.name, h, v, prefix=rows,
                      lora_a=torch.randn(2, h) * 0.1, lora_b=torch.randn(v, 2) * 0.1,
                      lora_scale=2.0)
    params = SamplingParams(max_new_tokens=8)
    local = LocalModel(spec)
    expected = local.generate("Hi there", params, adapter=adapter)
    plain = local.generate("Hi there", params)

    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            for i, (start, end) in enumerate([(0, 2), (2, 4), (0, 2), (2, 4)]):
                await swarm.add_node(start, end, tmp_path / f"n{i}")
            client = AsyncSwarm(
                spec=swarm.spec, head=load_head(swarm.spec), tokenizer=tokenizer,
                discovery=MemoryDiscovery(swarm.hub), transport=MemoryTransport(swarm.wire),
                config=ClientConfig(discovery_wait_s=1.0, audit_rate=0.5), adapter=adapter)
            return await client.generate("Hi there", params)
        finally:
            await swarm.close()

    result = asyncio.run(asyncio.wait_for(main(), 60))
    assert result.token_ids == expected.token_ids
    assert expected.token_ids != plain.token_ids  # the adapter changes the answer
    assert result.audited_steps > 0 and result.disputes == ()

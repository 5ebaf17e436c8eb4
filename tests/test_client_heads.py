"""client.heads: the LM heads of one client's concurrent generations, run at once."""

from __future__ import annotations

import asyncio

import pytest
import torch

from layerchain.client.heads import HeadBatcher

H, V = 8, 32


class FakeHead:
    """A linear LM head that records the shapes it was called with."""

    def __init__(self, fail: bool = False) -> None:
        torch.manual_seed(0)
        self.weight = torch.randn(V, H)
        self.calls: list[tuple[int, ...]] = []
        self.fail = fail

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(hidden.shape))
        if self.fail:
            raise RuntimeError("head broke")
        return hidden @ self.weight.T  # [B, T, V]


def rows(n: int) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(1, 1, H) for _ in range(n)]


def test_a_generation_alone_runs_its_head_at_once_as_decoder_accept_does():
    head = FakeHead()
    batcher = HeadBatcher(head)
    batcher.active = 1
    row = rows(1)[0]

    async def main():
        return await batcher.logits(row)

    out = asyncio.run(main())
    assert head.calls == [(1, 1, H)]
    assert torch.equal(out, head.logits(row)[0, -1])  # the same call, the same bits


def test_rows_of_one_loop_turn_go_through_the_head_once_each_getting_its_own():
    head = FakeHead()
    batcher = HeadBatcher(head)
    batcher.active = 3
    xs = rows(3)

    async def main():
        return await asyncio.gather(*(batcher.logits(x) for x in xs))

    outs = asyncio.run(main())
    assert head.calls == [(3, 1, H)]
    assert batcher.batches == 1
    assert batcher.seconds > 0
    for x, out in zip(xs, outs):
        assert out.shape == (V,)
        assert torch.allclose(out, (x @ head.weight.T)[0, -1], atol=1e-5)


def test_rows_of_different_turns_are_separate_calls_and_a_lone_row_runs_solo():
    head = FakeHead()
    batcher = HeadBatcher(head)
    batcher.active = 2
    a, b = rows(2)

    async def main():
        first = await batcher.logits(a)
        second = await batcher.logits(b)
        return first, second

    first, second = asyncio.run(main())
    assert head.calls == [(1, 1, H), (1, 1, H)]
    assert batcher.batches == 0
    assert torch.equal(first, head.logits(a)[0, -1])


def test_a_failing_head_fails_every_waiting_generation():
    batcher = HeadBatcher(FakeHead(fail=True))
    batcher.active = 2

    async def main():
        return await asyncio.gather(*(batcher.logits(x) for x in rows(2)),
                                    return_exceptions=True)

    outs = asyncio.run(main())
    assert [str(e) for e in outs] == ["head broke", "head broke"]


def test_a_cancelled_waiter_is_left_out_of_the_batch():
    head = FakeHead()
    batcher = HeadBatcher(head)
    batcher.active = 3
    xs = rows(3)

    async def main():
        tasks = [asyncio.ensure_future(batcher.logits(x)) for x in xs]
        await asyncio.sleep(0)  # all three rows queued, the flush not run yet
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return done

    outs = asyncio.run(main())
    assert isinstance(outs[1], asyncio.CancelledError)
    assert head.calls == [(2, 1, H)]
    assert torch.allclose(outs[2], (xs[2] @ head.weight.T)[0, -1], atol=1e-5)


@pytest.mark.slow  # the default model's head (the spec is shared with other slow tests)
def test_a_real_head_batched_gives_the_solo_greedy_tokens(smollm2_spec, batch=8):
    from layerchain.model import load_head

    head = load_head(smollm2_spec)
    torch.manual_seed(2)
    xs = [torch.randn(1, 1, smollm2_spec.hidden_size) * 5 for _ in range(batch)]
    batcher = HeadBatcher(head)
    batcher.active = batch

    async def main():
        return await asyncio.gather(*(batcher.logits(x) for x in xs))

    outs = asyncio.run(main())
    assert batcher.batches == 1
    for x, out in zip(xs, outs):
        solo = head.logits(x)[0, -1]
        assert int(out.argmax()) == int(solo.argmax())
        assert torch.allclose(out, solo, atol=1e-3, rtol=1e-4)

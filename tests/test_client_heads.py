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


def test_rows_of_nearby_turns_share_a_call_within_the_window():
    """The replies of a node's batch reach the client one after another: a row waits up to
    ``window_s`` for the other active generations' rows."""
    head = FakeHead()
    batcher = HeadBatcher(head, window_share=0.5, max_window_s=5.0)
    batcher.solo_s = 2.0  # a one-row head call's time: the window is 1 s
    batcher.active = 3
    xs = rows(3)

    async def late(x, turns):
        for _ in range(turns):
            await asyncio.sleep(0)
        return await batcher.logits(x)

    async def main():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        outs = await asyncio.wait_for(asyncio.gather(*(late(x, 3 * i) for i, x in enumerate(xs))), 5)
        return outs, loop.time() - t0

    outs, took = asyncio.run(main())
    assert head.calls == [(3, 1, H)] and batcher.batches == 1
    assert took < 0.5  # the third row completed the set: no window spent
    for x, out in zip(xs, outs):
        assert torch.allclose(out, (x @ head.weight.T)[0, -1], atol=1e-5)


def test_a_row_waits_at_most_the_window_then_runs_alone():
    head = FakeHead()
    batcher = HeadBatcher(head, window_share=0.5, max_window_s=0.02)
    batcher.solo_s = 1.0  # half of it is 0.5 s, but max_window_s caps the wait
    assert batcher.window_s == pytest.approx(0.02)
    batcher.active = 2
    row = rows(1)[0]

    async def main():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await asyncio.wait_for(batcher.logits(row), 5)
        return out, loop.time() - t0

    out, took = asyncio.run(main())
    assert 0.015 <= took < 1.0 and head.calls == [(1, 1, H)]
    assert torch.equal(out, head.logits(row)[0, -1])
    assert batcher.solo_s < 1.0  # the moving average took this call's time


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

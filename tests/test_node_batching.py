"""Batched decode on a node (``node.batching``): concurrent sessions' one-token steps run as
one forward, with each session's result its own.

Unit tests drive a ``DecodeBatcher`` over a tiny random llama (milliseconds): the adaptive
window (alone: at once; with others expected: together), a session that closes, fails or
is cancelled while batched. The slow tests run a real node (SmolLM2, all 30 blocks) in this
event loop over the memory transport: 8 sessions of different prompt lengths and start
times decode the same greedy tokens as each alone, and one closing or failing mid-batch
leaves the others' answers unchanged.
"""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest
import torch

from layerchain.errors import LayerchainError, SpanError, UnknownSession
from layerchain.model import load_head, load_span, resolve_model
from layerchain.node.batching import BatchConfig, DecodeBatcher
from layerchain.node.sessions import Session

ATOL = 1e-5  # a batched row vs the solo row (differently blocked matmuls)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    spec = resolve_model(tiny_model_dir("llama"))
    return spec, load_span(spec, 0, spec.num_blocks)


def session(span, sid: str, prompt_len: int, *, start: int = 0, end: int = 0,
            seed: int = 0) -> tuple[Session, object]:
    """An open session with ``prompt_len`` tokens in its cache, and a twin cache for its solo
    reference (same tokens)."""
    end = end or span.end
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(1, prompt_len, span.config.hidden_size, generator=g)
    cache, twin = span.new_cache(start, end), span.new_cache(start, end)
    span.forward(prompt, cache)
    span.forward(prompt, twin)
    s = Session(sid, 64, cache, start, end)
    s.span = span
    return s, twin


async def warm(batcher: DecodeBatcher, span, sessions) -> None:
    """One step of each session (so each is expected from now on), run at once."""
    tasks = [asyncio.create_task(batcher.step(s, token(span, 9))) for s in sessions]
    await asyncio.sleep(0)
    batcher.flush()
    await asyncio.gather(*tasks)


def token(span, seed: int) -> torch.Tensor:
    return torch.randn(1, 1, span.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def test_a_session_alone_runs_at_once_with_the_solo_bits(tiny):
    _, span = tiny
    # a wait would time the test out
    batcher = DecodeBatcher(BatchConfig(window_ms=10_000, window_share=0))
    a, twin = session(span, "a", 3)

    async def main():
        return [await asyncio.wait_for(batcher.step(a, token(span, i)), 5) for i in range(3)]

    outs = asyncio.run(main())
    for i, out in enumerate(outs):
        assert out.batch == 1 and torch.equal(out.hidden, span.forward(token(span, i), twin))
    assert batcher.batched_steps == 0 and a.cache.length == 6


def test_sessions_expected_are_waited_for_and_computed_together(tiny):
    """Three sessions that stepped recently: the first two arrivals wait, the third completes
    the batch at once (no window spent); rows agree with each session alone."""
    _, span = tiny
    clock = Clock()
    batcher = DecodeBatcher(BatchConfig(window_ms=10_000, window_share=0), clock=clock)
    sessions = [session(span, f"s{i}", 2 + 3 * i, seed=i) for i in range(3)]

    async def main():
        await warm(batcher, span, [s for s, _ in sessions])  # now all three are expected
        tasks = [asyncio.create_task(batcher.step(s, token(span, i))) for i, (s, _) in
                 enumerate(sessions)]
        return await asyncio.wait_for(asyncio.gather(*tasks), 5)

    outs = asyncio.run(main())
    for i, ((_, twin), out) in enumerate(zip(sessions, outs, strict=True)):
        span.forward(token(span, 9), twin)
        assert out.batch == 3
        torch.testing.assert_close(out.hidden, span.forward(token(span, i), twin),
                                   atol=ATOL, rtol=0)
    assert batcher.batched_steps == 2 + 3 and batcher.largest_batch == 3


def test_a_session_expected_that_does_not_come_costs_one_window_and_then_is_forgotten(tiny):
    _, span = tiny
    clock = Clock()
    batcher = DecodeBatcher(BatchConfig(window_ms=30, window_share=0, recent_s=1.0), clock=clock)
    a, _ = session(span, "a", 2)
    b, _ = session(span, "b", 2, seed=1)

    async def main():
        await batcher.step(b, token(span, 0))  # b stepped: expected for a second
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await asyncio.wait_for(batcher.step(a, token(span, 1)), 5)
        waited = loop.time() - t0
        clock.now += 1.5  # b is quiet for longer than recent_s: a no longer waits for it
        t1 = loop.time()
        again = await batcher.step(a, token(span, 2))
        return out, waited, again, loop.time() - t1

    out, waited, again, at_once = asyncio.run(main())
    assert out.batch == 1 and waited >= 0.025  # the window, then alone
    assert again.batch == 1 and at_once < waited


def test_a_session_closed_while_waiting_gets_unknown_session_and_the_others_their_rows(tiny):
    _, span = tiny
    batcher = DecodeBatcher(BatchConfig(window_ms=50, window_share=0))
    a, twin = session(span, "a", 2)
    b, _ = session(span, "b", 4, seed=1)
    c, _ = session(span, "c", 3, seed=2)

    async def main():
        await warm(batcher, span, [a, b, c])
        ta = asyncio.create_task(batcher.step(a, token(span, 1)))
        tb = asyncio.create_task(batcher.step(b, token(span, 2)))
        await asyncio.sleep(0)  # both waiting for c, which never comes
        b.cache = None  # SessionTable.close
        return await asyncio.wait_for(asyncio.gather(ta, tb, return_exceptions=True), 5)

    out_a, out_b = asyncio.run(main())
    assert isinstance(out_b, UnknownSession)
    span.forward(token(span, 9), twin)
    assert out_a.batch == 1 and torch.equal(out_a.hidden, span.forward(token(span, 1), twin))


def test_a_step_failing_in_a_batch_fails_alone_and_the_others_run_one_by_one(
    tiny, monkeypatch
):
    """A cache that raises mid-forward fails the batch; each step then runs alone: the
    faulty session gets its error, the others their solo rows, no cache advanced twice."""
    _, span = tiny
    # the fault is injected into the cache's update, which only the Python path calls (a
    # solo step would otherwise go native: tests/test_native_step.py)
    monkeypatch.setattr(span, "native_decode", False)
    batcher = DecodeBatcher(BatchConfig(window_ms=10_000, window_share=0))
    sessions = [session(span, f"s{i}", 2 + i, seed=i) for i in range(3)]
    bad = sessions[1][0]

    async def main():
        await warm(batcher, span, [s for s, _ in sessions])
        with mock.patch.object(bad.cache, "update", side_effect=SpanError("disk on fire")):
            tasks = [asyncio.create_task(batcher.step(s, token(span, i)))
                     for i, (s, _) in enumerate(sessions)]
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)

    outs = asyncio.run(main())
    assert isinstance(outs[1], SpanError) and bad.cache.length == 3 + 1  # prompt, warm-up
    for i in (0, 2):
        s, twin = sessions[i]
        span.forward(token(span, 9), twin)
        assert outs[i].batch == 1  # (the warm-up batched some: their caches differ in bits)
        torch.testing.assert_close(outs[i].hidden, span.forward(token(span, i), twin),
                                   atol=ATOL, rtol=0)
        assert s.cache.length == twin.length


def test_a_cancelled_step_is_not_computed_and_sessions_on_other_blocks_run_apart(tiny):
    _, span = tiny
    batcher = DecodeBatcher(BatchConfig(window_ms=10_000, window_share=0))
    a, _ = session(span, "a", 2)
    b, _ = session(span, "b", 3, seed=1)
    c, _ = session(span, "c", 3, start=1, end=3, seed=2)  # another block range
    d, _ = session(span, "d", 3, seed=3)

    async def main():
        await warm(batcher, span, [a, b, c, d])
        ta = asyncio.create_task(batcher.step(a, token(span, 1)))
        await asyncio.sleep(0)
        ta.cancel()
        await asyncio.sleep(0)
        rest = [asyncio.create_task(batcher.step(s, token(span, 2))) for s in (b, c, d)]
        await asyncio.sleep(0)
        batcher.flush()  # a is cancelled: no one else is expected
        return await asyncio.wait_for(asyncio.gather(*rest), 5)

    out_b, out_c, out_d = asyncio.run(main())
    assert a.cache.length == 3  # prompt + the step before: the cancelled one did not run
    assert (out_b.batch, out_c.batch, out_d.batch) == (2, 1, 2)
    assert (b.cache.length, c.cache.length, d.cache.length) == (5, 5, 5)


def test_a_session_that_ran_its_prompt_is_expected_by_the_others(tiny):
    _, span = tiny
    batcher = DecodeBatcher(BatchConfig(window_ms=10_000, window_share=0))
    a, _ = session(span, "a", 2)
    b, _ = session(span, "b", 5, seed=1)

    async def main():
        batcher.expect(a)  # a's prompt ran (node.server): b's first decode step waits for a
        tb = asyncio.create_task(batcher.step(b, token(span, 1)))
        await asyncio.sleep(0.01)
        assert not tb.done()
        out_a = await asyncio.wait_for(batcher.step(a, token(span, 2)), 5)
        return out_a, await tb

    out_a, out_b = asyncio.run(main())
    assert out_a.batch == out_b.batch == 2


def test_a_session_stepping_slowly_stays_expected_for_twice_its_interval(tiny):
    """On a loaded machine a stream steps seconds apart (more than recent_s): it is still
    expected for gap_factor x its last interval, then forgotten."""
    _, span = tiny
    clock = Clock()
    batcher = DecodeBatcher(BatchConfig(window_ms=30, window_share=0, recent_s=1.0,
                                        gap_factor=2.0), clock=clock)
    a, _ = session(span, "a", 2)
    b, _ = session(span, "b", 2, seed=1)

    async def main():
        await batcher.step(b, token(span, 0))
        clock.now += 3.0  # b's next step, 3 s later: its interval
        await batcher.step(b, token(span, 1))
        clock.now += 5.0  # within 2 x 3 s: still expected
        assert batcher.batching(a) and batcher._expected(clock.now) == {"b"}
        clock.now += 1.5  # 6.5 s since b's last step: forgotten
        assert not batcher.batching(a) and batcher._expected(clock.now) == set()

    asyncio.run(main())


def test_batching_says_whether_another_session_is_expected(tiny):
    """What node.server asks before running a slow span's decode step in slices alone."""
    _, span = tiny
    clock = Clock()
    batcher = DecodeBatcher(BatchConfig(window_ms=30, window_share=0), clock=clock)
    a, _ = session(span, "a", 2)
    b, _ = session(span, "b", 2, seed=1)
    assert not batcher.batching(a)  # nobody stepped
    batcher.expect(a)  # a stepped alone (its prompt, or a step outside the batcher)
    assert not batcher.batching(a) and batcher.batching(b)
    b.cache = None  # closed: not expected by anyone
    batcher.expect(b)
    assert not batcher.batching(a)
    assert not DecodeBatcher(BatchConfig(window_ms=0)).batching(a)  # batching off


def test_the_window_follows_the_recent_forwards_time_within_its_bounds():
    batcher = DecodeBatcher(BatchConfig(window_ms=20, window_share=0.5, min_window_ms=2))
    assert batcher.window_s == pytest.approx(0.020)  # no forward yet: the longest
    for forward_s, window_s in ((0.010, 0.005), (0.100, 0.020), (0.001, 0.002)):
        batcher.forward_s = forward_s
        assert batcher.window_s == pytest.approx(window_s)
    batcher._ran(0.010)  # a moving average of the forwards' seconds
    assert batcher.forward_s == pytest.approx(0.7 * 0.001 + 0.3 * 0.010)
    assert DecodeBatcher(BatchConfig(window_ms=7, window_share=0)).window_s == pytest.approx(0.007)


def test_the_window_zero_turns_batching_off(tiny):
    _, span = tiny
    batcher = DecodeBatcher(BatchConfig(window_ms=0, window_share=0))
    a, _ = session(span, "a", 2)
    b, _ = session(span, "b", 2, seed=1)

    async def main():
        for s in (a, b, a, b):
            assert (await batcher.step(s, token(span, 0))).batch == 1

    asyncio.run(main())
    assert batcher.batched_steps == 0


# ---------------------------------------------------------------- a real node, SmolLM2

PROMPTS = (  # different lengths (raw text: 2..18 tokens)
    "Hi!",
    "What is the capital of France?",
    "Name three rivers in Europe.",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "Why is the sky blue? Answer in one sentence.",
    "List the planets of the solar system in order from the sun, please.",
    "2+2=",
    "Translate 'good morning' into German, French and Spanish, with a short note.",
)


@pytest.fixture(scope="module")
def smol(smollm2_spec, smollm2_tokenizer):
    from layerchain.model import encode_prompt

    spec = smollm2_spec
    span = load_span(spec, 0, spec.num_blocks)
    prompts = [encode_prompt(smollm2_tokenizer, p, raw=True) for p in PROMPTS]
    return spec, span, load_head(spec), prompts


async def start_node(spec, span, tmp_path, window_ms: float):
    from layerchain.discovery import Identity, MemoryDHT, MemoryDiscovery
    from layerchain.node import Node, NodeConfig
    from layerchain.wire import MemoryNetwork, MemoryTransport

    network, identity = MemoryNetwork(), Identity.generate()
    node = Node(
        NodeConfig(start=0, end=spec.num_blocks, data_dir=tmp_path),
        spec=spec, span=span, transport=MemoryTransport(network),
        listen_at=f"mem://{identity.peer_id}", discovery=MemoryDiscovery(MemoryDHT(), identity),
        identity=identity, ms_per_block=1.0,  # not measured: a decode step is then "short"
    )
    # every session that stepped is expected (recent_s): a test's load makes steps slow
    node.batcher = DecodeBatcher(BatchConfig(window_ms=window_ms, window_share=0, recent_s=600))
    await node.start()
    return node, network


async def connect(node, network):
    from layerchain.wire import MemoryTransport, RpcClient

    return RpcClient(await MemoryTransport(network).connect(node.endpoint))


def solo_greedy(span, head, ids: list[int], new: int) -> list[int]:
    """The session alone: its prompt then ``new`` one-token steps through the whole span."""
    cache = span.new_cache()
    hidden, tokens = head.embed(torch.tensor([ids])), []
    for _ in range(new + 1):
        tokens.append(int(head.logits(span.forward(hidden, cache)[:, -1:])[0, -1].argmax()))
        hidden = head.embed(torch.tensor([[tokens[-1]]]))
    return tokens


async def greedy(rpc, spec, head, sid: str, ids: list[int], new: int, *, before=None,
                 at_step=None) -> list[int]:
    """Open ``sid`` and run its prompt and ``new`` decode steps; ``before(step)`` is awaited
    before each step (a test's hook), ``at_step`` is the step that may fail."""
    from layerchain.wire import OpenSession, Step

    await rpc.call(OpenSession(0, sid, spec.model_id, 0, spec.num_blocks, 128), 30)
    hidden, tokens = head.embed(torch.tensor([ids])), []
    for step in range(new + 1):
        if before is not None:
            await before(step)
        result = await rpc.call(Step(0, sid, step, hidden), 120)
        tokens.append(int(head.logits(result.hidden[:, -1:])[0, -1].argmax()))
        hidden = head.embed(torch.tensor([[tokens[-1]]]))
    return tokens


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_eight_concurrent_sessions_decode_the_tokens_each_decodes_alone(smol, tmp_path):
    """8 sessions (prompts of 2..18 tokens) start 0..0.35 s apart and decode 2..5 tokens,
    so batches gain and lose members; every session's greedy tokens are those it gets
    alone. (A wide window: under a test's load the in-process clients, which compute their
    head on the node's loop, arrive far apart; the adaptive window is tested above.)"""
    spec, span, head, prompts = smol
    new = [2 + i % 4 for i in range(len(prompts))]

    async def main():
        node, network = await start_node(spec, span, tmp_path, window_ms=200)
        clients = [await connect(node, network) for _ in prompts]

        async def one(i):
            await asyncio.sleep(0.05 * i)
            return await greedy(clients[i], spec, head, f"s{i}", prompts[i], new[i])

        try:
            got = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            await node.stop(drain_s=0)
        return got, node.batcher

    got, batcher = asyncio.run(asyncio.wait_for(main(), 200))
    want = [solo_greedy(span, head, ids, n) for ids, n in zip(prompts, new, strict=True)]
    print(f"batches {batcher.batches}, batched steps {batcher.batched_steps}, "
          f"largest {batcher.largest_batch}")
    assert got == want
    assert batcher.largest_batch >= 4 and batcher.batched_steps >= 16


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_session_closing_or_failing_mid_batch_leaves_the_others_answers_alone(
    smol, tmp_path, monkeypatch
):
    """At step 2 (their second decode step) of five sessions: one closes while its step waits in the batch (it gets
    unknown_session), one's cache fails inside the batched forward (its step fails, the
    batch reruns one by one), one's receipt fails after it (only its step fails). The other
    two decode what they decode alone."""
    from layerchain.wire import CloseSession, Step

    spec, span, head, prompts = smol
    monkeypatch.setattr(span, "native_decode", False)  # the cache fault is in its update
    new, k = 3, 2

    async def main():
        node, network = await start_node(spec, span, tmp_path, window_ms=3_000)
        clients = [await connect(node, network) for _ in range(5)]
        quitter_waiting, others_ready, ready = asyncio.Event(), asyncio.Event(), []
        errors = {}

        async def quit_then_others(step):  # the others step k once the quitter's step waits
            if step == k:
                ready.append(step)
                if len(ready) == 4:
                    others_ready.set()
                await quitter_waiting.wait()

        async def quitter(step):
            if step != k:
                return
            await others_ready.wait()  # all four stepped k - 1: the quitter's step waits
            hidden = torch.zeros(1, 1, spec.hidden_size)
            call = asyncio.create_task(clients[0].call(Step(0, "quit", k, hidden), 60))
            while not call.done() and not any(
                    p.session.session_id == "quit" for p in node.batcher._pending):
                await asyncio.sleep(0.005)
            await clients[0].call(CloseSession(0, "quit"), 10)
            quitter_waiting.set()
            try:
                await call
            except LayerchainError as error:
                errors["quit"] = error
            raise asyncio.CancelledError  # the quitter is done

        async def failing(sid, patch):
            async def before(step):
                await quit_then_others(step)
                if step == k:
                    patch(node.sessions.get(sid))
            return before

        def broken_cache(session):
            session.cache.update = mock.Mock(side_effect=SpanError("cache lost"))

        receipt = node.payments.receipt

        def broken_receipt(session):
            def sign(payment, *args):
                if payment is session.payment:
                    raise SpanError("signer lost")
                return receipt(payment, *args)
            node.payments.receipt = sign

        async def run(i, sid, before):
            try:
                return await greedy(clients[i], spec, head, sid, prompts[i], new, before=before)
            except asyncio.CancelledError:
                return None
            except LayerchainError as error:
                errors[sid] = error
                return None

        try:
            got = await asyncio.gather(
                run(0, "quit", quitter),
                run(1, "cache", await failing("cache", broken_cache)),
                run(2, "receipt", await failing("receipt", broken_receipt)),
                run(3, "a", quit_then_others),
                run(4, "b", quit_then_others),
            )
        finally:
            await node.stop(drain_s=0)
        return got, errors

    got, errors = asyncio.run(asyncio.wait_for(main(), 200))
    assert set(errors) == {"quit", "cache", "receipt"}, errors
    assert isinstance(errors["quit"], UnknownSession)
    assert "cache lost" in str(errors["cache"]) and "signer lost" in str(errors["receipt"])
    assert got[3] == solo_greedy(span, head, prompts[3], new)
    assert got[4] == solo_greedy(span, head, prompts[4], new)


def test_the_batcher_does_not_keep_a_closed_session_or_its_span_alive(tiny):
    """A node that moved frees the span it left once its sessions close (node.rebalance):
    the batcher remembers recent sessions only weakly."""
    import gc
    import weakref

    _, span = tiny
    batcher = DecodeBatcher(BatchConfig(window_ms=0))
    a, _ = session(span, "a", 2)

    async def main(s):
        await batcher.step(s, token(span, 0))
        batcher.expect(s)

    asyncio.run(main(a))
    gone = weakref.ref(a)
    del a
    gc.collect()
    assert gone() is None


# ---------------------------------------------------------------- phase alignment (fake clock)


class Stub:
    """What the batcher's bookkeeping reads of a session (no model needed)."""

    def __init__(self, sid: str) -> None:
        self.session_id = sid
        self.cache = object()


def stepped(batcher: DecodeBatcher, clock: Clock, sid: str, *times: float) -> Stub:
    """A session whose steps arrived at ``times`` (the batcher's bookkeeping only)."""
    s = Stub(sid)
    now = clock.now
    for t in times:
        clock.now = t
        batcher.expect(s)  # type: ignore[arg-type]
    clock.now = now
    return s


def test_a_step_waits_for_the_sessions_due_within_the_horizon_and_a_window_for_others():
    """Each session is due one interval after its last step; a step waits until the last
    session due within phase_share x the forwards' time is due, plus the window; for one due
    later (or not known, or late) only the window."""
    clock = Clock()  # now = 100
    batcher = DecodeBatcher(BatchConfig(window_ms=10, window_share=0, phase_share=1.5,
                                        phase_ms=250), clock=clock)
    batcher.forward_s = 0.100  # horizon: 150 ms
    assert batcher.horizon_s == pytest.approx(0.150) and batcher.window_s == pytest.approx(0.010)
    keep = [stepped(batcher, clock, "soon", 97.05, 98.05, 99.05),  # due at 100.05
            stepped(batcher, clock, "later", 97.90, 98.90, 99.90)]  # due at 100.90: far
    assert batcher._awaited(100.0) == {"soon": pytest.approx(100.05), "later": 100.0}
    assert batcher.wait_s(100.0) == pytest.approx(0.05 + 0.010)  # due, plus the window
    keep.append(stepped(batcher, clock, "late", 96.9, 97.9, 98.9))  # due at 99.9: late
    keep.append(stepped(batcher, clock, "new", 99.0, 99.99))  # one interval: not known
    keep.append(stepped(batcher, clock, "odd", 97.04, 97.05, 99.05))  # 0.01 s then 2 s
    assert batcher._awaited(100.0) == {"soon": pytest.approx(100.05), "later": 100.0,
                                       "late": 100.0, "new": 100.0, "odd": 100.0}
    only = DecodeBatcher(batcher.config, clock=clock)
    only.forward_s = 0.100
    keep.append(stepped(only, clock, "far", 97.9, 98.9, 99.9))  # due in 900 ms: far
    keep.append(stepped(only, clock, "irregular", 96.0, 98.0, 99.05))  # 2 s then 1.05 s
    assert only.wait_s(100.0) == pytest.approx(0.010)  # the window
    keep.append(stepped(batcher, clock, "edge", 97.149, 98.149, 99.149))  # due at 100.149
    assert batcher.wait_s(100.0) == pytest.approx(0.150)  # never more than the horizon
    assert len(keep) == 8


def test_the_horizon_follows_the_forwards_within_its_bounds_and_phase_zero_is_the_window():
    clock = Clock()
    batcher = DecodeBatcher(BatchConfig(window_ms=20, window_share=0.5, min_window_ms=2,
                                        phase_share=1.5, phase_ms=250), clock=clock)
    for forward_s, horizon_s in ((0.0, 0.020), (0.001, 0.002), (0.040, 0.060), (1.0, 0.250)):
        batcher.forward_s = forward_s
        assert batcher.horizon_s == pytest.approx(horizon_s)
    off = DecodeBatcher(BatchConfig(window_ms=10, window_share=0, phase_share=0), clock=clock)
    off.forward_s = 0.100
    s = stepped(off, clock, "later", 97.9, 98.9, 99.9)  # due in 0.9 s: waited for a window
    assert off._awaited(100.0) == {"later": 100.0} and off.wait_s(100.0) == pytest.approx(0.010)
    assert s.session_id == "later"
    assert DecodeBatcher(clock=clock).wait_s(100.0) == 0.0  # nobody expected


def test_a_group_one_forward_behind_joins_the_batch_and_a_session_a_round_away_does_not(tiny):
    """Streams out of phase: a arrives, b is due 50 ms later (queued behind a forward on the
    previous hop: more than the window), c a whole round later. a waits for b, b completes
    the batch and it runs (a window for c, not c's round); then c alone."""
    _, span = tiny
    clock = Clock()
    batcher = DecodeBatcher(BatchConfig(window_ms=10, window_share=0, phase_share=1.5,
                                        phase_ms=10_000), clock=clock)
    (a, _), (b, _), (c, _) = (session(span, sid, 2, seed=i) for i, sid in enumerate("abc"))

    async def main():
        for t, s in ((97.05, b), (97.5, c), (98.0, a), (98.05, b), (98.5, c), (99.0, a),
                     (99.05, b), (99.5, c)):  # every interval 1 s: a due at 100, b at
            clock.now = t  # 100.05, c at 100.5
            batcher.expect(s)
        batcher.forward_s = 0.1  # horizon 150 ms
        clock.now = 100.0
        assert batcher.wait_s(100.0) == pytest.approx(0.06)  # b due in 50 ms, + window
        ta = asyncio.create_task(batcher.step(a, token(span, 1)))
        await asyncio.sleep(0.03)
        assert not ta.done()  # waiting for b: longer than the window
        clock.now = 100.05
        out_b = await asyncio.wait_for(batcher.step(b, token(span, 2)), 5)
        out_a = await ta
        clock.now = 100.5
        assert batcher.wait_s(100.5) == pytest.approx(0.010)  # a, b due a round away
        # (a: intervals 1 s then 1 s; b: 1 s then 1 s)
        out_c = await asyncio.wait_for(batcher.step(c, token(span, 3)), 5)
        return out_a, out_b, out_c

    out_a, out_b, out_c = asyncio.run(main())
    assert out_a.batch == out_b.batch == 2 and out_c.batch == 1
    assert batcher.sizes == {2: 1, 1: 1}

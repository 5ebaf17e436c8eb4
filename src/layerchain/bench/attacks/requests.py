"""Requests as attacks: one that no node can hold (ban poisoning), and an honest long
prompt that must neither fail nor stall the nodes (issue 12, items 5 and 10).

Both go through ``stage.client``, the client the honest load shares, as requests of
several users share a gateway's client.
"""

from __future__ import annotations

import asyncio
import time

from layerchain.bench.attacks.base import Outcome, Stage, Stopwatch, banned_now
from layerchain.bench.attacks.nodes import _probe_ping
from layerchain.model import SamplingParams
from layerchain.wire import Info, InfoReply, RpcClient, TcpTransport


def prompt_of(tokenizer: object, tokens: int, seed_text: str) -> str:
    """A raw prompt of about ``tokens`` tokens (repeated prose, cut at a token boundary)."""
    ids = tokenizer.encode(seed_text)  # type: ignore[attr-defined]
    reps = tokens // max(1, len(ids)) + 1
    whole = tokenizer.encode(" ".join([seed_text] * reps))  # type: ignore[attr-defined]
    return tokenizer.decode(whole[:tokens])  # type: ignore[attr-defined]


PROSE = ("The harbour wakes before the town does: gulls argue over the nets, a bell rings on "
         "the breakwater, and the first boats slide out past the lighthouse into grey water.")


async def ban_poisoning(stage: Stage) -> Outcome:
    """Through the shared client, a request whose prompt is longer than any node admits
    for one session (yet, where they admit less than the model's context, within it),
    twice; the honest load goes on meanwhile.

    Observed: the request was answered (an error, as it must be). Held: it banned no
    honest node, and failed with a request error, not a peer error."""
    window = Stopwatch(stage.duration_s)
    admitted = await asyncio.gather(*(_admissible(n.endpoint) for n in stage.honest_nodes))
    tokens = max(admitted) + 256
    prompt = prompt_of(stage.client.core.tokenizer, tokens, PROSE)
    outcomes: list[str] = []
    banned_honest: set[str] = set()
    for _ in range(2):
        try:
            await asyncio.to_thread(stage.client.generate, prompt, SamplingParams(max_new_tokens=2),
                                    raw=True)
            outcomes.append("served")
        except Exception as error:  # noqa: BLE001 - its type is the finding
            outcomes.append(f"{type(error).__name__}: {error}"[:200])
        banned_honest |= banned_now(stage.client) & stage.honest_ids
        await asyncio.sleep(min(2.0, window.remaining()))
    while window:
        banned_honest |= banned_now(stage.client) & stage.honest_ids
        await asyncio.sleep(0.25)
    request_errors = [o for o in outcomes if o.split(":")[0] in _REQUEST_ERRORS]
    details: dict[str, object] = {
        "prompt_tokens": tokens,
        "nodes_admit_tokens": admitted,
        "outcomes": outcomes,
        "honest_nodes_banned": len(banned_honest),
    }
    return Outcome(observed=len(outcomes) == 2,
                   held=not banned_honest and len(request_errors) == len(outcomes), details=details)


async def _admissible(endpoint: str) -> int:
    """The cache tokens a node says one new session may have (its Info reply)."""
    rpc = RpcClient(await TcpTransport().connect(endpoint))
    try:
        reply = await rpc.call(Info(0), 5.0)
        return reply.free_cache_tokens if isinstance(reply, InfoReply) else 0
    finally:
        await rpc.close()


_REQUEST_ERRORS = {"RequestTooLarge", "LimitExceeded", "UserError"}  # the request's own fault


async def long_prompt(stage: Stage) -> Outcome:
    """An honest prompt of ``stage.long_prompt_tokens`` tokens through the shared client,
    while the short honest load goes on and every honest node is pinged twice a second.

    Observed: the request was made (always). Held: it completed with the one-process
    model's greedy tokens, banned no honest node, and every ping was answered within the
    client's ping timeout (the nodes kept answering while the prefill ran)."""
    done = asyncio.Event()
    latencies: list[float | None] = []

    async def pinger() -> None:
        while not done.is_set():
            found = await asyncio.gather(*(_probe_ping(n.endpoint) for n in stage.honest_nodes))
            latencies.extend(found)
            await asyncio.sleep(0.5)

    pings = asyncio.create_task(pinger())
    t0 = time.perf_counter()
    error, tokens = "", []
    try:
        result = await asyncio.to_thread(stage.client.generate, stage.long_prompt,
                                         stage.long_params, raw=True)
        tokens = list(result.token_ids)
    except Exception as exc:  # noqa: BLE001 - its type is the finding
        error = f"{type(exc).__name__}: {exc}"[:300]
    seconds = time.perf_counter() - t0
    done.set()
    await pings
    banned_honest = banned_now(stage.client) & stage.honest_ids
    answered = [t for t in latencies if t is not None]
    exact = not error and tuple(tokens) == stage.long_reference
    details: dict[str, object] = {
        "prompt_tokens": stage.long_prompt_tokens,
        "seconds": round(seconds, 2),
        "error": error,
        "exact": exact,
        "honest_nodes_banned": len(banned_honest),
        "pings": len(latencies),
        "pings_answered": len(answered),
        "ping_s_max": round(max(answered), 3) if answered else None,
    }
    held = exact and not banned_honest and len(answered) == len(latencies)
    return Outcome(observed=True, held=held, details=details)

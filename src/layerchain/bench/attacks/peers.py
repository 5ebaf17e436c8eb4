"""Lying peers: one that claims to be fast and is slow, ones that answer error codes that are
not theirs to give, and one that fails and comes back under a new endpoint or a new peer id
(issue 12, items 3, 4 and 6).

Each liar announces itself through the attacker's DHT peer with a real identity and a
record the validator has no reason to refuse, so the client's own judgement is what is
under test.
"""

from __future__ import annotations

import asyncio

from layerchain.bench.attacks.base import (
    Outcome,
    Stage,
    Stopwatch,
    after_generations,
    banned_now,
    known_peers,
)
from layerchain.bench.attacks.fakes import (
    FakePeer,
    RelayPeer,
    error_codes,
    hang_up_on_step,
)
from layerchain.bench.attacks.forgery import (
    AttackerDHT,
    accepted_claim,
    record_template,
)
from layerchain.discovery import Identity
from layerchain.market import Wallet
from layerchain.types import Span

CLAIMS_MS_PER_BLOCK = (0.0, 1e-3, 0.01, 0.1)  # the fastest claim the validator accepts is used
RELAY_DELAY_S = 0.25  # each step through the slow liar takes this much longer: ~17 ms per
# block of its 15, against ~2 for an honest node of this machine


async def slow_liar(stage: Stage) -> Outcome:
    """A relay to the spare node that announces the spare's span, claims (almost) zero
    ms per block and delays every step result by ``RELAY_DELAY_S``: correct but slow.

    Observed: the client sent steps through it. Held: of the honest generations that
    started after it was announced, the last two route around it (the client learnt
    what the liar delivers)."""
    window = Stopwatch(stage.duration_s)
    relay = RelayPeer(stage.spare.endpoint, RELAY_DELAY_S)
    endpoint = await relay.listen()
    dht = await AttackerDHT.start(stage.initial_peers, stage.model_id)
    identity = Identity.generate()
    span = Span(stage.spare.start, stage.spare.end)
    # the spare's wallet: the receipts it signs then match the liar's record
    template = record_template(identity, stage.model_id, span, endpoint, 1.0, stage.spare.wallet,
                               stage.duration_s + 30)
    try:
        claim = accepted_claim(identity, template, "ms_per_block", CLAIMS_MS_PER_BLOCK)
        await dht.publish("slow_liar", identity, template, {"ms_per_block": claim})
        first = len(stage.honest.generations)  # the one in flight may not know the liar yet
        waiting = asyncio.create_task(after_generations(stage, 4))  # learn, then two to judge
        while window or not waiting.done():
            await asyncio.sleep(0.25)
        routes = stage.honest.routes_since(first)
        through = [identity.peer_id in r for r in routes]
        # a step reaches a hop as a Step (pull mode) or a PushStep (push mode, client.push)
        steps_relayed = sum(relay.seen.requests.get(kind, 0) for kind in ("Step", "PushStep"))
        details: dict[str, object] = {
            "claimed_ms_per_block": claim,
            "steps_relayed": steps_relayed,
            "generations": len(routes),
            "through_liar": through,
            "read_by_client": identity.peer_id in known_peers(stage.client),
        }
        return Outcome(observed=steps_relayed > 0, held=not any(through[-2:]), details=details)
    finally:
        await dht.withdraw_all()
        await dht.close()
        await relay.close()


LIES = (  # (on OpenSession, on Step): error codes a client must not take from a peer
    ("insufficient_funds", ""),
    ("", "invalid_api_key"),
    ("", "no_route"),
    ("request_too_large", ""),
)


async def error_code_liars(stage: Stage) -> Outcome:
    """Liars claiming the whole model at the fastest speed, each answering one error code
    that only the client (or its user) may decide: ``insufficient_funds``,
    ``invalid_api_key``, ``no_route``, ``request_too_large``.

    Observed: the liars were asked for sessions. Held: every liar ends up banned (so every
    one was tried), and no honest generation failed (the bench checks the latter)."""
    window = Stopwatch(stage.duration_s)
    dht = await AttackerDHT.start(stage.initial_peers, stage.model_id)
    fakes, liars = [], {}
    try:
        for on_open, on_step in LIES:
            fake = FakePeer(error_codes(on_open, on_step))
            endpoint = await fake.listen()
            identity = Identity.generate()
            # each its own wallet: a ban following one liar's wallet must not hide the others
            template = record_template(identity, stage.model_id, Span(0, stage.num_blocks),
                                       endpoint, 1.0, Wallet.generate().address,
                                       stage.duration_s + 30)
            claim = accepted_claim(identity, template, "ms_per_block", CLAIMS_MS_PER_BLOCK)
            await dht.publish(on_open or on_step, identity, template, {"ms_per_block": claim})
            fakes.append(fake)
            liars[identity.peer_id] = (on_open or on_step, fake)
        banned: set[str] = set()
        waiting = asyncio.create_task(after_generations(stage, 3))
        while window or not waiting.done():
            banned |= banned_now(stage.client) & set(liars)
            await asyncio.sleep(0.25)
        banned |= banned_now(stage.client) & set(liars)
        asked = {code: sum(fake.total().requests.get(k, 0) for k in ("OpenSession", "Step"))
                 for code, fake in liars.values()}
        details: dict[str, object] = {
            "requests_per_code": asked,
            "banned": sorted(liars[p][0] for p in banned),
        }
        return Outcome(observed=any(asked.values()), held=len(banned) == len(liars), details=details)
    finally:
        await dht.withdraw_all()
        await dht.close()
        for fake in fakes:
            await fake.close()


async def ban_evasion(stage: Stage) -> Outcome:
    """A liar that opens sessions and hangs up at the first step. Each time it is used it
    comes back: first under the same peer id at a new endpoint, then under a new peer id
    with the same wallet, each time as the fastest peer of the whole model.

    Observed: its first incarnation was sent a step. Held: no later incarnation is asked
    for a session or a step (the ban stuck to its peer id and wallet)."""
    window = Stopwatch(stage.duration_s)
    dht = await AttackerDHT.start(stage.initial_peers, stage.model_id)
    fake = FakePeer(hang_up_on_step)
    wallet = Wallet.generate().address
    identity = Identity.generate()
    incarnations: list[tuple[str, str]] = []  # (how it came back, endpoint)
    try:
        for how in ("first", "new_endpoint", "new_peer_id_same_wallet"):
            if how == "new_peer_id_same_wallet":
                identity = Identity.generate()
            endpoint = await fake.listen()
            template = record_template(identity, stage.model_id, Span(0, stage.num_blocks),
                                       endpoint, 1.0, wallet, stage.duration_s + 30)
            claim = accepted_claim(identity, template, "ms_per_block", CLAIMS_MS_PER_BLOCK)
            await dht.publish(how, identity, template, {"ms_per_block": claim})
            incarnations.append((how, endpoint))
            # until it is used (and so fails, and is banned), or two honest generations
            # (one started after it was announced) passed it by
            turn = asyncio.create_task(after_generations(stage, 2))
            while not turn.done() and not fake.seen[endpoint].requests.get("Step", 0):
                await asyncio.sleep(0.2)
            turn.cancel()
            if incarnations[:-1]:
                await fake.close_port(incarnations[-2][1])
        while window:
            await asyncio.sleep(0.25)
        used = {how: sum(fake.seen[e].requests.get(k, 0) for k in ("OpenSession", "Step"))
                for how, e in incarnations}
        details: dict[str, object] = {"sessions_and_steps_per_incarnation": used}
        later = [n for how, n in used.items() if how != "first"]
        return Outcome(observed=used["first"] > 0, held=not any(later), details=details)
    finally:
        await dht.withdraw_all()
        await dht.close()
        await fake.close()

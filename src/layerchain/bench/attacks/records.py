"""Attacks through the DHT: forged records, and fake peers at endpoints that keep changing.

Both publish with real identities (each forged record is correctly signed by the key whose
peer id it claims), so only range checks on the fields, at the DHT validator and in the
client, can refuse them (issue 12, items 1, 2 and 7).
"""

from __future__ import annotations

import asyncio
import time

from layerchain.bench.attacks.base import Outcome, Stage, Stopwatch, after_generations, known_peers
from layerchain.bench.attacks.fakes import (
    FakePeer,
    pong_only,
)
from layerchain.bench.attacks.forgery import (
    REGULAR_VALUE,
    AttackerDHT,
    held_by_honest_nodes,
    record_template,
)
from layerchain.discovery import Identity
from layerchain.market import Wallet
from layerchain.types import Span

FIFTY_YEARS_S = 50 * 365.25 * 86400


async def forged_records(stage: Stage) -> Outcome:
    """Publish records with out-of-range fields, each under its own real identity, and junk
    that is no record (a regular value on a block key, a sub-key that is no peer id, an
    oversized blob), plus one well-formed *control* record through the same DHT peer.

    Observed: the control record is held by the honest DHT nodes and read by the honest
    client (so the attacker's channel works). Held: no forged record or junk is held by an
    honest DHT node, and no forged record is read by the client."""
    window = Stopwatch(stage.duration_s)
    fake = FakePeer(pong_only)
    endpoint = await fake.listen()
    dht = await AttackerDHT.start(stage.initial_peers, stage.model_id)
    ttl = stage.duration_s + 30
    whole = Span(0, stage.num_blocks)
    wallet = Wallet.generate().address
    # label -> (span, forged fields); every one claims the whole model, the planner's favourite
    forgeries: dict[str, tuple[Span, dict[str, object]]] = {
        "ms_per_block_0": (whole, {"ms_per_block": 0.0}),
        "ms_per_block_1e308": (whole, {"ms_per_block": 1e308}),
        "endpoint_empty_host": (whole, {"endpoints": ["tcp://:31337"]}),
        "endpoint_port_0": (whole, {"endpoints": ["tcp://127.0.0.1:0"]}),
        "endpoint_port_99999": (whole, {"endpoints": ["tcp://127.0.0.1:99999"]}),
        "endpoint_not_tcp": (whole, {"endpoints": ["[link=http://x]x[/link]"]}),
        "price_2_63": (whole, {"price_per_block": 2**63 - 1}),
        "free_cache_2_63": (whole, {"free_cache_tokens": 2**63 - 1}),
        "wallet_not_an_address": (whole, {"wallet": "0xnot-an-address"}),
        # unattractive otherwise (slow, one block): only its life is wrong
        "expires_in_50_years": (Span(0, 1), {"expires_at": time.time() + FIFTY_YEARS_S,
                                             "ms_per_block": 1000.0}),
    }
    try:
        control_id = Identity.generate()
        control = await dht.publish(
            "control", control_id,
            record_template(control_id, stage.model_id, Span(0, 1), endpoint, 1000.0, wallet, ttl),
        )
        published = await asyncio.gather(*(
            dht.publish(label, identity, record_template(identity, stage.model_id, span, endpoint,
                                                         1.0, wallet, ttl), fields)
            for (label, (span, fields)), identity in zip(
                forgeries.items(), (Identity.generate() for _ in forgeries))))
        # junk that is no record at all: a regular value on block 0's key, a sub-key that is
        # no peer id, an oversized blob under a peer id's sub-key
        junk_id = Identity.generate().peer_id
        stores = await asyncio.gather(
            dht.store_junk(0, b"junk", time.time() + ttl),
            dht.store_junk(0, b"junk", time.time() + ttl, "not a peer"),
            dht.store_junk(0, bytes(64 * 1024), time.time() + ttl, junk_id),
            return_exceptions=True)  # a store that timed out is read back below all the same
        junk = dict(zip(("regular_value_on_a_block_key", "sub_key_not_a_peer_id", "oversized_blob"),
                        (s if isinstance(s, bool) else repr(s) for s in stores)))
        reading = asyncio.create_task(
            held_by_honest_nodes(stage.initial_peers, stage.model_id, range(stage.num_blocks)))
        seen: set[str] = set()
        waiting = asyncio.create_task(after_generations(stage, 2))  # the client re-read the DHT
        while window or not waiting.done():  # what the client reads, while it keeps refreshing
            seen |= known_peers(stage.client)
            await asyncio.sleep(0.25)
        seen |= known_peers(stage.client)
        held = await reading
        per_forgery = {
            p.label: {"stored_blocks": p.stored, "held_by_dht": p.peer_id in held,
                      "read_by_client": p.peer_id in seen}
            for p in published
        }
        junk_held = {"regular_value_on_a_block_key": REGULAR_VALUE in held,
                     "sub_key_not_a_peer_id": "not a peer" in held,
                     "oversized_blob": junk_id in held}
        accepted = [k for k, v in per_forgery.items() if v["held_by_dht"] or v["read_by_client"]]
        accepted += [k for k, v in junk_held.items() if v]
        observed = control.peer_id in held and control.peer_id in seen
        details: dict[str, object] = {
            "control_held_by_dht": control.peer_id in held,
            "control_read_by_client": control.peer_id in seen,
            "forgeries": per_forgery,
            "junk_stored": junk,
            "junk_held_by_dht": junk_held,
            "accepted": accepted,
        }
        return Outcome(observed=observed, held=not accepted, details=details)
    finally:
        await dht.withdraw_all()
        await dht.close()
        await fake.close()


async def rotating_endpoints(stage: Stage) -> Outcome:
    """Every round, ``per_round`` new identities announce block 0 at new live endpoints (each
    answers pings and refuses sessions), stay until the client has read them, and leave
    (tombstones) as the next round's come; then the attacker goes quiet.

    Observed: the client pinged the fake peers. Held: the client never holds
    more than two rounds' worth of connections to them (they do not grow with the
    endpoints ever seen), and none once every fake record has expired and it refreshed."""
    rounds, per_round = (3, 20) if stage.duration_s < 15 else (6, 40)
    round_s = stage.duration_s / (rounds + 1)
    fake = FakePeer(pong_only)
    dht = await AttackerDHT.start(stage.initial_peers, stage.model_id)
    wallet = Wallet.generate().address
    peaks: list[int] = []
    try:
        for _ in range(rounds):
            t0 = time.monotonic()
            endpoints = [await fake.listen() for _ in range(per_round)]
            waiting = asyncio.create_task(after_generations(stage, 2))
            await asyncio.gather(*(
                _announce_once(dht, stage, e, wallet, ttl_s=30.0) for e in endpoints))
            await waiting  # the client re-read the records (and pinged the new peers) since
            await asyncio.sleep(max(0.0, round_s - (time.monotonic() - t0)))
            peaks.append(fake.total().open)
            await dht.withdraw_all()  # this round's peers leave; the next round's come
        # every fake record is withdrawn now; the client notices at its next refreshes
        waiting = asyncio.create_task(after_generations(stage, 2))
        while not waiting.done() and fake.total().open > 0:
            await asyncio.sleep(0.25)
        waiting.cancel()
        total = fake.total()
        details: dict[str, object] = {
            "fake_endpoints": rounds * per_round,
            "open_per_round": peaks,
            "peak_open": max(peaks) if peaks else 0,
            "open_at_end": total.open,
            "connections_accepted": total.accepted,
            "pings": total.requests.get("Ping", 0),
        }
        bounded = max(peaks, default=0) <= 2 * per_round  # does not grow with the rounds
        return Outcome(observed=total.requests.get("Ping", 0) > 0,
                       held=bounded and total.open == 0, details=details)
    finally:
        await dht.withdraw_all()
        await dht.close()
        await fake.close()


async def _announce_once(dht: AttackerDHT, stage: Stage, endpoint: str, wallet: str, ttl_s: float) -> None:
    identity = Identity.generate()
    template = record_template(identity, stage.model_id, Span(0, 1), endpoint, 1000.0, wallet, ttl_s)
    await dht.publish("rotating", identity, template)

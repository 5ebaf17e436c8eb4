"""The model catalog (issue 20.2): signed entries bound to their model id, coverage, listing.

Fast: literal manifests (no model is loaded), the in-memory DHT, and pure calls of the
hivemind validator. The attacks: an entry naming another model's id with other block hashes,
a forged signature, another peer's sub-key, an oversized or non-printable entry, an entry
living too long; each is refused by DHT nodes and, through a malicious replica, by readers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import warnings

import msgpack
import pytest

from layerchain.discovery import Identity, MemoryDHT, MemoryDiscovery
from layerchain.discovery.catalog import (
    CATALOG_KEY,
    MAX_CATALOG_BYTES,
    MAX_MANIFEST_BYTES,
    CatalogAnnouncer,
    CatalogEntry,
    canonical_manifest,
    check_stored_entry,
    coverage,
    list_models,
    open_entry,
    read_catalog,
    sign_entry,
)
from layerchain.discovery.announcer import AnnounceConfig
from layerchain.errors import ProtocolError
from layerchain.model.digest import digest_of
from layerchain.model.spec import form_model_id

with warnings.catch_warnings():  # importing hivemind runs torch.jit.script, deprecated in torch
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer as S

    from layerchain.discovery.validator import entry_is_valid


def manifest(name: str = "tiny", num_blocks: int = 4, seed: int = 0, **extra: object) -> dict:
    """A shard manifest (model.shards format) with made-up hashes; ``seed`` varies them."""
    body = {
        "format": "layerchain-shards", "version": 1, "name": name, "family": "llama",
        "num_blocks": num_blocks, "config": {"model_type": "llama", "hidden_size": 64},
        "blocks": {str(i): {"file": f"block_{i:03d}.safetensors", "bytes": 100,
                            "sha256": f"{seed:032x}{i:032x}"} for i in range(num_blocks)},
        "head": {"file": "head.safetensors", "bytes": 10, "sha256": "ab" * 32},
        "files": {"tokenizer.json": "cd" * 32}, **extra,
    }
    body["model_id"] = digest_of(body)  # as model.shards.manifest_id computes it
    return body


def entry_of(identity: Identity, body: dict, dtype: str = "fp32",
             expires_at: float | None = None) -> CatalogEntry:
    return CatalogEntry.create(identity, model_id=form_model_id(body["model_id"], dtype),
                               dtype=dtype, manifest=body,
                               expires_at=time.time() + 60 if expires_at is None else expires_at)


def forged_blob(identity: Identity, **fields: object) -> bytes:
    """A blob signed by ``identity`` whose fields need not pass CatalogEntry's checks."""
    body = {"format": "layerchain/catalog-entry/1", "peer_id": identity.peer_id,
            "public_key": identity.public_key, "expires_at": time.time() + 60, **fields}
    payload = msgpack.packb({k: body[k] for k in sorted(body)}, use_bin_type=True)
    return msgpack.packb([payload, identity.sign(payload)], use_bin_type=True)


def test_an_entry_round_trips_and_summarizes_its_manifest():
    me, body = Identity.generate(), manifest(num_blocks=3)
    entry = entry_of(me, body)
    assert open_entry(sign_entry(me, entry)) == entry
    summary = entry.summary
    assert summary is not None and summary.weights_id == entry.model_id == body["model_id"]
    assert (summary.name, summary.family, summary.num_blocks, summary.hidden_size) == \
        ("tiny", "llama", 3, 64)
    assert summary.block_sha256 == tuple(body["blocks"][str(i)]["sha256"] for i in range(3))
    # another form of the same weights: its own id, the same summary
    int8 = entry_of(me, body, dtype="int8")
    assert int8.model_id != entry.model_id and int8.summary == summary


def test_a_version_2_name_is_a_label_the_listing_takes_from_most_peers(record_for):
    """Version 2 manifests leave ``name`` out of the id: the same weights under two names are
    one model, listed once, under the name most of its peers announce."""
    v2 = manifest("tiny", version=2)
    v2["model_id"] = digest_of({k: v for k, v in v2.items() if k not in ("model_id", "name")})
    hub = MemoryDHT()

    async def run() -> list:
        for name in ("tiny", "tiny", "gpt-9000"):
            me = Identity.generate()
            entry = entry_of(me, {**v2, "name": name})
            assert entry.model_id == v2["model_id"]
            await MemoryDiscovery(hub, me).put_entry(CATALOG_KEY, sign_entry(me, entry),
                                                     entry.expires_at)
        return await list_models(MemoryDiscovery(hub))

    (listed,) = asyncio.run(run())
    assert (listed.name, listed.announced_by) == ("tiny", 3)


def test_another_models_id_with_other_hashes_is_refused_everywhere():
    """The attack: announce an honest model's id with a manifest of other blocks."""
    honest, attacker, now = Identity.generate(), Identity.generate(), time.time()
    real = manifest(seed=1)
    fake = {**manifest(seed=2), "model_id": real["model_id"]}  # other hashes, claimed id
    with pytest.raises(ProtocolError, match="an id must be its manifest's hash"):
        CatalogEntry.create(attacker, model_id=real["model_id"], dtype="fp32", manifest=fake)
    blob = forged_blob(attacker, model_id=real["model_id"], dtype="fp32",
                       manifest=canonical_manifest(fake), expires_at=now + 60)
    with pytest.raises(ProtocolError, match="manifest's hash"):
        open_entry(blob)
    # a DHT node stores the honest entry and refuses the forged one; a lying form likewise
    good = entry_of(honest, real, expires_at=now + 60)
    assert entry_is_valid(DHTRecord(b"k" * 20, S.dumps(honest.peer_id),
                                    S.dumps(sign_entry(honest, good)), now + 60), now)
    assert not entry_is_valid(DHTRecord(b"k" * 20, S.dumps(attacker.peer_id), S.dumps(blob),
                                        now + 60), now)
    wrong_form = forged_blob(attacker, model_id=real["model_id"], dtype="int8",
                             manifest=canonical_manifest(real), expires_at=now + 60)
    with pytest.raises(ProtocolError):
        open_entry(wrong_form)

    async def listing() -> list:
        hub = MemoryDHT(validate=False)  # a malicious replica stores anything
        ours = MemoryDiscovery(hub, honest)
        good = entry_of(honest, real, expires_at=now + 60)
        await ours.put_entry(CATALOG_KEY, sign_entry(honest, good), good.expires_at)
        await MemoryDiscovery(hub, attacker).put_entry(CATALOG_KEY, blob, now + 60)
        reader = MemoryDiscovery(hub)
        listed = await list_models(reader)
        return [listed, reader.stats.invalid]

    listed, invalid = asyncio.run(listing())
    assert invalid == 1 and len(listed) == 1  # readers drop it too: nothing mixes
    assert listed[0].announced_by == 1 and listed[0].model_id == real["model_id"]


def test_forged_or_misplaced_entries_are_refused():
    me, other, now = Identity.generate(), Identity.generate(), time.time()
    entry = entry_of(me, manifest())
    blob = sign_entry(me, entry)
    payload, signature = msgpack.unpackb(blob)
    tampered = msgpack.packb([payload.replace(b"tiny", b"tinz"), signature])
    with pytest.raises(ProtocolError, match="bad signature"):
        open_entry(tampered)
    with pytest.raises(ProtocolError, match="stored under sub-key"):  # another's sub-key
        check_stored_entry(other.peer_id, blob, entry.expires_at, now)
    with pytest.raises(ProtocolError, match="expires at"):  # replayed with a longer life
        check_stored_entry(me.peer_id, blob, entry.expires_at + 30, now)
    with pytest.raises(ProtocolError):
        sign_entry(other, entry)  # nobody signs another peer's entry
    late = entry_of(me, manifest(), expires_at=now + 3600)  # would outlive every refresh
    with pytest.raises(ProtocolError, match="at most"):
        check_stored_entry(me.peer_id, sign_entry(me, late), late.expires_at, now)
    assert check_stored_entry(me.peer_id, blob, entry.expires_at, now) == entry


@pytest.mark.parametrize("bad, reason", [
    (manifest(name="tiny\x1b[2J"), "printable"),  # terminal escapes in a listing
    (manifest(name="x" * 200), "printable"),
    ({**manifest(), "num_blocks": 5}, "list 5 blocks"),  # a block count its hashes do not back
    ({**manifest(), "config": {"hidden_size": -1}}, "hidden_size"),
    ({**manifest(), "blocks": {str(i): {"sha256": "zz"} for i in range(4)}}, "hex sha256"),
    (manifest(padding="x" * MAX_MANIFEST_BYTES), "bytes"),  # oversized
])
def test_malformed_manifests_are_refused(bad, reason):
    me = Identity.generate()
    bad = {**bad, "model_id": digest_of({k: v for k, v in bad.items() if k != "model_id"})}
    with pytest.raises(ProtocolError, match=reason):
        entry_of(me, bad)
    blob = forged_blob(me, model_id=bad["model_id"], dtype="fp32",
                       manifest=canonical_manifest(bad))
    with pytest.raises(ProtocolError):
        open_entry(blob)


def test_junk_blobs_are_refused_by_name():
    me = Identity.generate()
    deep = b"[" * 100_000 + b"]" * 100_000  # nesting json would recurse into
    for blob, reason in [
        (b"x" * (MAX_CATALOG_BYTES + 1), "<= 65536"),
        (b"\xc1", "malformed"),
        (forged_blob(me, model_id="m", dtype="fp32", manifest=deep[:50_000]), "not JSON"),
        (forged_blob(me, model_id="m", dtype="fp32"), "fields"),
    ]:
        with pytest.raises(ProtocolError, match=reason):
            open_entry(blob)


def test_coverage_counts_replicas_and_the_least_served_block(record_for):
    a, b, c = (Identity.generate() for _ in range(3))
    records = [record_for(a, 0, 4, ms_per_block=2.0),  # 1000 / (2 * 4) = 125 tokens/s per block
               record_for(b, 0, 2, ms_per_block=1.0),  # + 500 on blocks 0, 1
               record_for(c, 2, 3, ms_per_block=4.0)]  # + 250 on block 2
    cov = coverage(5, records)
    assert cov.servers == 3 and cov.replicas == (2, 2, 2, 1, 0) and cov.blocks_served == 4
    assert cov.throughput_tokens_per_s == 0.0  # block 4 has no server
    cov = coverage(4, records)
    assert cov.throughput_tokens_per_s == pytest.approx(125.0)  # block 3: a alone
    older = dataclasses.replace(records[1], start=2, end=4, expires_at=records[1].expires_at - 1)
    assert coverage(4, [older, *records]).replicas == (2, 2, 2, 1)  # one record per peer


def test_list_models_joins_two_models_with_their_records(record_for):
    hub = MemoryDHT()
    first, second = manifest("alpha", 4, seed=1), manifest("beta", 2, seed=2)

    async def run() -> list:
        peers = [Identity.generate() for _ in range(3)]
        for identity, body, span in ((peers[0], first, (0, 2)), (peers[1], first, (2, 4)),
                                     (peers[2], second, (0, 2))):
            discovery = MemoryDiscovery(hub, identity)
            entry = entry_of(identity, body)
            assert await discovery.put_entry(CATALOG_KEY, sign_entry(identity, entry),
                                             entry.expires_at)
            record = record_for(identity, *span, model_id=body["model_id"], ms_per_block=1.0)
            await discovery.announce(record)
        return await list_models(MemoryDiscovery(hub))

    listed = {m.name: m.to_json() for m in asyncio.run(run())}
    assert listed["alpha"] == {
        "model_id": first["model_id"], "name": "alpha", "family": "llama", "num_blocks": 4,
        "hidden_size": 64, "dtype": "fp32", "servers": 2, "blocks_served": 4,
        "replicas": [1, 1, 1, 1], "throughput_tokens_per_s": 500.0}
    assert (listed["beta"]["servers"], listed["beta"]["replicas"]) == (1, [1, 1])


def test_the_announcer_refreshes_and_withdraws():
    hub = MemoryDHT()
    me, body = Identity.generate(), manifest()

    async def run() -> tuple[list, list, float]:
        discovery = MemoryDiscovery(hub, me)
        announcer = CatalogAnnouncer(discovery, me, body["model_id"], "fp32", lambda: body,
                                     AnnounceConfig(refresh_s=0.05, ttl_s=30))
        announcer.start()
        await asyncio.wait_for(announcer.announced.wait(), 5)
        first = announcer.last_expiry
        await asyncio.sleep(0.2)  # a few refreshes, each expiring later
        refreshed = announcer.last_expiry
        live = await read_catalog(MemoryDiscovery(hub))
        await announcer.stop()
        return live, await read_catalog(MemoryDiscovery(hub)), refreshed - first

    live, after, later = asyncio.run(run())
    assert [e.peer_id for e in live] == [me.peer_id] and later > 0
    assert after == []  # the tombstone hides it at once


def test_an_announcer_whose_id_is_not_its_manifests_stays_out(caplog):
    hub, me = MemoryDHT(), Identity.generate()

    async def run() -> list:
        announcer = CatalogAnnouncer(MemoryDiscovery(hub, me), me, "f" * 64, "fp32",
                                     lambda: manifest(), AnnounceConfig(refresh_s=0.05, ttl_s=30))
        announcer.start()
        await asyncio.sleep(0.1)
        await announcer.stop()
        return await read_catalog(MemoryDiscovery(hub))

    assert asyncio.run(run()) == []
    assert "not listed in the swarm's catalog" in caplog.text

"""Model files fetched from peers (issue 20.3), in process: real nodes seeding over the
memory transport and memory DHT; the rules (pieces, manifests, rate limits) with literals."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
import torch

from layerchain.discovery import Identity, MemoryDiscovery
from layerchain.errors import (
    ConfigError,
    InvalidOutput,
    LimitExceeded,
    ModelFileError,
    PeerBusy,
    ShardHashMismatch,
)
from layerchain.fetch import FetchConfig, check_manifest, check_piece, fetch_model, find_seeders
from layerchain.fetch.pieces import check_file_name, part_path, piece_queries
from layerchain.model import convert_to_shards, load_span, resolve_model
from layerchain.model.manifest import file_bytes, manifest_of
from layerchain.model.shards import HEAD_FILE, block_file
from layerchain.node.config import NodeConfig
from layerchain.node.seeding import SeedConfig, Seeder, TokenBucket
from layerchain.types import Span
from layerchain.wire import MemoryTransport
from layerchain.wire import messages as m
from memswarm import MemorySwarm

MODEL = "test-model"


def run(coro):
    return asyncio.run(coro)


async def _swarm(model, tmp_path, *nodes):
    """A memory swarm of ``nodes``: (start, end, node config overrides) each."""
    swarm = MemorySwarm(str(model))
    for i, (start, end, config) in enumerate(nodes):
        await swarm.add_node(start, end, tmp_path / f"node-{i}", **config)
    return swarm


def _fetch(swarm, out, **options):
    return fetch_model(MemoryDiscovery(swarm.hub), MemoryTransport(swarm.wire),
                       swarm.spec.model_id, out, **options)


def test_a_span_fetched_from_two_seeders_one_lying_loads_like_the_source(tiny_model_dir,
                                                                        tmp_path):
    """The lying seeder (blocks 0:4, first in the records: its workers take the first files)
    corrupts every piece: each file it sent is refused by name, fetched from the honest
    one, and the fetched directory is the model, bit for bit."""

    async def scenario():
        swarm = await _swarm(tiny_model_dir("llama"), tmp_path,
                             (0, 4, {"seed_misbehave": "corrupt"}), (1, 4, {}))
        liar, honest = (n.peer_id for n in swarm.nodes)
        try:
            report = await _fetch(swarm, tmp_path / "out", blocks=Span(1, 3), client=True)
        finally:
            await swarm.close()
        return swarm.spec, report, liar, honest

    spec, report, liar, honest = run(scenario())
    out = tmp_path / "out"
    assert sorted(report.fetched) == sorted([block_file(1), block_file(2), HEAD_FILE])
    assert report.refused and {r.peer_id for r in report.refused} == {liar}
    assert all("sha256" in r.reason for r in report.refused)  # named, refused, re-fetched
    assert report.peers == (honest,)
    for name in report.fetched:
        assert (out / name).read_bytes() == file_bytes(spec, name)
    assert not list(out.glob("*.part"))
    fetched = resolve_model(out)
    assert fetched.kind == "shards" and fetched.model_id == spec.model_id
    x = torch.randn(1, 5, spec.hidden_size)
    with torch.inference_mode():
        theirs, ours = load_span(spec, 1, 3), load_span(fetched, 1, 3)
        assert torch.equal(theirs.forward(x, theirs.new_cache()), ours.forward(x, ours.new_cache()))


def test_a_fetch_resumes_a_partial_file_and_keeps_verified_ones(tiny_model_dir, tmp_path):
    async def scenario():
        swarm = await _swarm(tiny_model_dir("mistral"), tmp_path, (0, 4, {}))
        out = tmp_path / "out"
        out.mkdir()
        spec = swarm.spec
        block0, block1 = file_bytes(spec, block_file(0)), file_bytes(spec, block_file(1))
        (out / block_file(0)).write_bytes(block0)  # there and verified: not fetched
        part_path(out, block_file(1)).write_bytes(block1[:1000])  # an interrupted fetch
        part_path(out, block_file(2)).write_bytes(b"garbage" * 100)  # a bad leftover
        try:
            report = await _fetch(swarm, out, blocks=Span(0, 3))
        finally:
            await swarm.close()
        return spec, report, len(block1)

    spec, report, size1 = run(scenario())
    assert report.present == (block_file(0),)
    assert sorted(report.fetched) == [block_file(1), block_file(2)]
    size2 = len(file_bytes(spec, block_file(2)))
    # block 1 continued from byte 1000; block 2's leftover did not verify: fetched whole,
    # once more (its first attempt resumed from the garbage's end); nobody was blamed
    assert report.bytes == (size1 - 1000) + (size2 - 700) + size2
    assert not report.refused
    for i in range(3):
        assert (tmp_path / "out" / block_file(i)).read_bytes() == file_bytes(spec, block_file(i))


def test_fetch_fails_by_name_when_only_liars_seed_and_no_seeder_has_the_model(tiny_model_dir,
                                                                             tmp_path):
    async def scenario():
        swarm = await _swarm(tiny_model_dir("qwen2"), tmp_path,
                             (0, 4, {"seed_misbehave": "corrupt"}), (0, 2, {"seed": False}))
        try:
            with pytest.raises(ModelFileError, match=block_file(3)) as info:
                await _fetch(swarm, tmp_path / "out", blocks=Span(3, 4))
            other = MemoryDiscovery(swarm.hub)
            assert await find_seeders(other, "f" * 64) == []
        finally:
            await swarm.close()
        return str(info.value)

    message = run(scenario())
    assert "sha256" in message  # why: the refusal, by name


def test_seeders_are_found_past_the_first_probe(tiny_model_dir, record_for):
    """Records are per block and a reader names the block count: a model whose only peer
    serves blocks 40:50 is found by doubling the keys read (32, then 64)."""

    async def scenario():
        from layerchain.discovery import MemoryDHT

        hub = MemoryDHT()
        identity = Identity.generate()
        await MemoryDiscovery(hub, identity).announce(record_for(identity, 40, 50))
        return await find_seeders(MemoryDiscovery(hub), MODEL)

    assert [(r.start, r.end) for r in run(scenario())] == [(40, 50)]


def test_a_seeder_serves_only_its_files_in_bounded_pieces(tiny_model_dir, tmp_path):
    spec = resolve_model(tiny_model_dir("gemma"))
    seeder = Seeder(spec, Span(1, 3), SeedConfig())
    mid = spec.model_id

    def ask(msg):
        return run(seeder.answer(msg, owner=1, now=0.0))

    reply = ask(m.ManifestQuery(1, mid))
    assert (reply.start, reply.end, reply.client_files) == (1, 3, 1)
    assert check_manifest(mid, reply.manifest) == {**manifest_of(spec), "name": spec.name}
    piece = ask(m.PieceQuery(2, mid, block_file(2), 100, 50))
    assert piece.data == file_bytes(spec, block_file(2))[100:150]
    assert piece.size == len(file_bytes(spec, block_file(2)))
    for bad, why in (
        (m.PieceQuery(3, "0" * 64, block_file(1), 0, 10), "seeds model"),
        (m.PieceQuery(3, mid, block_file(0), 0, 10), "does not seed"),  # outside its span
        (m.PieceQuery(3, mid, "../manifest.json", 0, 10), "does not seed"),
        (m.PieceQuery(3, mid, block_file(1), 0, m.MAX_PIECE_BYTES + 1), "a piece is"),
        (m.PieceQuery(3, mid, block_file(1), 0, 0), "a piece is"),
        (m.PieceQuery(3, mid, block_file(1), -1, 10), "outside"),
        (m.PieceQuery(3, mid, block_file(1), 10**9, 10), "outside"),
    ):
        with pytest.raises(LimitExceeded, match=why):
            ask(bad)
    # a shard directory holding only its span (as a node that fetched it) seeds no head
    shards = tmp_path / "shards"
    convert_to_shards(spec, shards, blocks=Span(1, 3))
    (shards / HEAD_FILE).unlink()
    partial = Seeder(resolve_model(shards), Span(1, 3), SeedConfig())
    assert run(partial.answer(m.ManifestQuery(1, mid), owner=1, now=0.0)).client_files == 0
    with pytest.raises(LimitExceeded, match="no head"):
        run(partial.answer(m.PieceQuery(2, mid, HEAD_FILE, 0, 10), owner=1, now=0.0))


def test_rate_limits_queue_pieces_and_refuse_past_the_wait():
    bucket = TokenBucket(rate=1000.0, burst=1000.0, now=0.0)
    assert bucket.reserve(600, now=0.0) == 0.0
    assert bucket.reserve(600, now=0.0) == pytest.approx(0.2)  # queued behind the first
    assert bucket.reserve(100, now=0.5) == pytest.approx(0.0)  # refilled 500 meanwhile
    assert bucket.reserve(1000, now=0.5) == pytest.approx(0.8)  # 200 left: 800 owed

    class Spec:  # what the metering needs of a seeder; no files are built
        weights_id = "a" * 64

    slow = Seeder(Spec(), Span(0, 1), SeedConfig(max_mbps=100.0, connection_mbps=0.01))  # type: ignore[arg-type]

    async def meter(nbytes, owner, now):
        await slow._meter(nbytes, owner, now)

    run(meter(1250, owner=1, now=0.0))  # one second's worth at 0.01 Mbit/s: the burst
    with pytest.raises(PeerBusy, match="rate limit"):  # 16 s of waiting: refused
        run(meter(20_000, owner=1, now=0.0))
    run(meter(1250, owner=2, now=0.0))  # another connection has its own bucket
    assert slow.connections[1].tokens == pytest.approx(0.0)  # the refused bytes came back


def test_pieces_and_manifests_are_checked_before_use():
    query = m.PieceQuery(1, "a" * 64, "block_000.safetensors", 0, 100)

    def reply(**fields):
        base = dict(rid=1, model_id="a" * 64, file=query.file, offset=0, size=150, data=b"x" * 100)
        return m.PieceReply(**{**base, **fields})

    check_piece(query, reply(), 150)
    for bad, why in ((reply(data=b"x" * 99), "truncated"), (reply(data=b"x" * 101), "padded"),
                     (reply(offset=100), "another piece"), (reply(file="head.safetensors"),
                                                            "another piece"),
                     (reply(size=151), "manifest 150"), (reply(size=10**12), "out of bounds")):
        with pytest.raises(InvalidOutput, match=why):
            check_piece(query, bad, 150 if "manifest" in why else None)
    tail = m.PieceQuery(1, "a" * 64, query.file, 100, 100)
    check_piece(tail, reply(offset=100, data=b"x" * 50), 150)  # the file's end: shorter
    assert [(q.offset, q.length) for q in piece_queries("a", "f", 1000, 2 * m.MAX_PIECE_BYTES)] \
        == [(1000, m.MAX_PIECE_BYTES), (1000 + m.MAX_PIECE_BYTES, m.MAX_PIECE_BYTES - 1000)]

    manifest = {"format": "layerchain-shards", "version": 2, "num_blocks": 1, "name": "x"}
    from layerchain.model.shards import manifest_id

    manifest["model_id"] = manifest_id(manifest)
    data = json.dumps(manifest).encode()
    assert check_manifest(manifest["model_id"], data)["num_blocks"] == 1
    for model_id, blob in ((hashlib.sha256(b"other").hexdigest(), data), (manifest["model_id"],
                           data.replace(b'"num_blocks": 1', b'"num_blocks": 2')),
                           (manifest["model_id"], b"not json"),
                           (manifest["model_id"], b" " * (m.MAX_MANIFEST_BYTES + 1))):
        with pytest.raises(ShardHashMismatch):
            check_manifest(model_id, blob)
    for name in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ShardHashMismatch):
            check_file_name(name)


def test_seeding_settings_are_checked():
    assert NodeConfig().seed and NodeConfig(seed=False).seed is False
    for bad in ({"seed_max_mbps": 0}, {"seed_connection_mbps": -1.0},
                {"seed_misbehave": "noise"}):
        with pytest.raises(ConfigError):
            NodeConfig(**bad)
    with pytest.raises(ConfigError):
        SeedConfig(misbehave="noise")
    assert FetchConfig().pipeline >= 1


def test_shard_fetch_and_node_start_name_what_is_wrong_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from layerchain.cli.main import app
    from layerchain.node.runner import fetch_span

    result = CliRunner().invoke(app, ["shard", "fetch", "not-an-id", "--out", str(tmp_path),
                                      "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and "not a model id" in lines[0]
    with pytest.raises(ConfigError, match="initial-peers"):  # nothing here, nowhere to ask
        run(fetch_span(NodeConfig(model="e" * 64, start=0, end=2, new_swarm=True)))

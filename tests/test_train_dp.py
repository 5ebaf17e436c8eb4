"""train.dp's pure parts and its DHT seam, in-process: config checks, shards from the roster,
checkpoints, batches, the trainable model, the training-entry validator and ``SharedDHT``
(hivemind.DHT's interface served by a layerchain DHT node). The multi-process run is
``test_train_dp_e2e.py``."""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

from layerchain.errors import ConfigError
from layerchain.train.data import IGNORE_INDEX, Example
from layerchain.train.dp import (
    DPConfig,
    batches,
    checkpoint_name,
    collate,
    latest_checkpoint,
    load_trainable,
    shard_from_roster,
)

with warnings.catch_warnings():  # importing hivemind runs torch.jit.script, deprecated in torch
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer as S

    from layerchain.train.dp_dht import (
        MAX_TRAINING_VALUE_BYTES,
        TrainingEntryValidator,
        training_entry_is_valid,
    )

KEY = b"k" * 20  # hivemind hands validators hashed keys
PEER = b"\x00$\x08\x01\x12 " + b"p" * 32  # the bytes of a libp2p (ed25519) peer id


def _config(**changes) -> DPConfig:
    return DPConfig(data=Path("d.jsonl"), initial_peers=("/ip4/127.0.0.1/tcp/1/p2p/X",),
                    **changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"parallelism": "tensor"}, "unknown parallelism 'tensor'"),
    ({"shard_strategy": "semantic"}, "unknown shard strategy"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"batch_size": 64, "target_batch_size": 8}, "larger than --target-batch-size"),
    ({"lr": 0.0}, "--lr must be positive"),
    ({"shard": (2, 2)}, "outside 0..1"),
    ({"run_id": "a/b"}, "bad run id"),
    ({"min_peers": 0}, "--min-peers must be at least 1"),
])
def test_bad_config_is_a_config_error(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**changes)


def test_kind_and_checkpoint_directory(tmp_path: Path) -> None:
    assert _config().kind == "dp" and _config(parallelism="federated").kind == "federated"
    assert _config(checkpoint_dir=tmp_path, run_id="r1").checkpoints == tmp_path / "r1"


def test_shard_from_roster_ranks_by_join_time_then_peer_id() -> None:
    roster = {"b": 2.0, "a": 2.0, "c": 1.0}
    assert [shard_from_roster(roster, p) for p in ("c", "a", "b")] == [(0, 3), (1, 3), (2, 3)]
    assert shard_from_roster({"x": 1.0}, "x", min_peers=2) == (0, 2)
    with pytest.raises(ValueError):
        shard_from_roster(roster, "zz")


def test_latest_checkpoint_is_the_highest_epoch(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "none") is None
    for epoch, peer in [(3, "peerAAAAAAAA"), (12, "peerBBBBBBBB"), (7, "peerCCCCCCCC")]:
        (tmp_path / checkpoint_name(epoch, peer)).write_bytes(b"x")
    (tmp_path / "step-999999-x.pt.tmp").write_bytes(b"x")  # a half-written one: ignored
    (tmp_path / "notes.txt").write_text("x")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000012-BBBBBBBB.pt"


def test_batches_cover_every_example_once_per_pass_and_are_seeded() -> None:
    first = batches(10, 3, seed=1)
    taken = [next(first) for _ in range(10)]  # 30 indices: 3 passes over 10 examples
    flat = [i for batch in taken for i in batch]
    for start in (0, 10, 20):
        assert sorted(flat[start:start + 10]) == list(range(10))
    again = batches(10, 3, seed=1)
    assert [next(again) for _ in range(10)] == taken
    other = batches(10, 3, seed=2)
    assert [next(other) for _ in range(10)] != taken


def test_collate_pads_right_and_masks_the_padding() -> None:
    out = collate([Example((5, 6, 7), (IGNORE_INDEX, 6, 7)), Example((8,), (8,))], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_load_trainable_is_the_saved_model(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    from layerchain.model.resolve import resolve_model

    path = tiny_model_dir("llama")
    ours = load_trainable(resolve_model(os.fspath(path)))
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    assert ours.training and all(p.requires_grad for p in ours.parameters())
    with torch.no_grad():
        assert torch.equal(ours.eval()(ids).logits, theirs.eval()(ids).logits)


def _entry(subkey: object, value: object, expiration: float) -> DHTRecord:
    return DHTRecord(KEY, S.dumps(subkey), S.dumps(value), expiration)


def test_training_entries_are_accepted_within_their_caps() -> None:
    now = time.time()
    good = [
        _entry(PEER, True, now + 5),  # matchmaking: looking for a group
        _entry(PEER, 1.0, now + 30),  # state sharing priority; roster join time
        _entry(b"[owner:" + b"k" * 400 + b"]", b"v" * 300, now + 60),  # signed progress
    ]
    for record in good:
        assert training_entry_is_valid(record, now), record
        assert TrainingEntryValidator().validate(record)


def test_what_a_training_entry_may_not_be() -> None:
    now = time.time()
    bad = [
        DHTRecord(KEY, S.dumps(None), S.dumps("plain"), now + 5),  # a regular value: could
        # replace a block key's dictionary of peer records
        _entry("a-string-subkey", 1.0, now + 5),  # str sub-keys are layerchain peer ids
        _entry(PEER, b"v" * (MAX_TRAINING_VALUE_BYTES + 1), now + 5),  # oversized
        _entry(b"s" * 2000, 1.0, now + 5),  # oversized sub-key
        _entry(PEER, 1.0, now + 3600),  # lives too long
        DHTRecord(KEY, b"\xc1", S.dumps(1.0), now + 5),  # a sub-key msgpack cannot decode
    ]
    for record in bad:
        assert not training_entry_is_valid(record, now), record
        assert not TrainingEntryValidator().validate(record)


def test_the_trainer_validator_still_accepts_peer_records(record_for) -> None:
    from layerchain.discovery import Identity, sign_record

    me = Identity.generate()
    record = record_for(me, 0, 4)
    blob = sign_record(me, record)
    assert TrainingEntryValidator().validate(_entry(me.peer_id, blob, record.expires_at))


def test_shared_dht_serves_hivemind_calls_from_this_process_and_a_fork() -> None:
    """hivemind.DHT's get/store/run_coroutine through a layerchain DHT node: from this
    process (handed to the DHT thread) and from a forked child (through the pipe, as
    hivemind's averagers call), and the node now keeps training entries."""
    import multiprocessing as mp

    from hivemind.utils import get_dht_time

    from layerchain.discovery.dht import HivemindDiscovery
    from layerchain.train.dp_dht import SharedDHT

    discovery = asyncio.run(HivemindDiscovery.create(new_swarm=True))
    dht = asyncio.run(SharedDHT.attach(discovery))
    try:
        peer = dht.peer_id.to_bytes()
        assert dht.store("run_roster", 1.5, get_dht_time() + 30, subkey=peer)
        found = dht.get("run_roster", latest=True)
        assert found.value[peer].value == 1.5
        assert dht.is_alive() and not dht.client_mode

        def child(queue) -> None:  # what a forked averager does
            maddr = dht.run_coroutine(_daemon_maddr)
            ok = dht.store("run_roster", 2.5, get_dht_time() + 30, subkey=b"child")
            queue.put((str(maddr), ok))

        queue = mp.get_context("fork").SimpleQueue()
        proc = mp.get_context("fork").Process(target=child, args=(queue,))
        proc.start()
        proc.join(30)
        assert proc.exitcode == 0
        maddr, ok = queue.get()
        assert ok and maddr == str(dht.run_coroutine(_daemon_maddr))
        assert dht.get("run_roster", latest=True).value[b"child"].value == 2.5
    finally:
        dht.shutdown()
        asyncio.run(discovery.close())
    assert not dht.is_alive() or _eventually(lambda: not dht.is_alive())


async def _daemon_maddr(_dht, node):
    return node.p2p.daemon_listen_maddr


def _eventually(check, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False

"""train.sharding: balance, determinism (also across processes), hash stability, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from layerchain.errors import ConfigError
from layerchain.train.sharding import STRATEGIES, assign, hash_shard, parse_shard

KEYS = [f"record {i}: the quick brown fox {i * 7919 % 1000}" for i in range(103)]


def _flat(shards: list[list[int]]) -> list[int]:
    return sorted(i for shard in shards for i in shard)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 200])
def test_every_key_lands_in_exactly_one_shard(strategy: str, num_shards: int) -> None:
    shards = assign(KEYS, num_shards, strategy, seed=5)
    assert len(shards) == num_shards
    assert _flat(shards) == list(range(len(KEYS)))
    assert all(shard == sorted(shard) for shard in shards)


@pytest.mark.parametrize("strategy", ["round_robin", "random"])
@pytest.mark.parametrize("num_shards", [2, 3, 7, 10])
def test_round_robin_and_random_sizes_differ_by_at_most_one(strategy: str, num_shards: int) -> None:
    sizes = [len(shard) for shard in assign(KEYS, num_shards, strategy, seed=1)]
    assert max(sizes) - min(sizes) <= 1


def test_hash_is_balanced_in_expectation() -> None:
    keys = [f"k{i}" for i in range(4000)]
    sizes = [len(shard) for shard in assign(keys, 4, "hash")]
    assert all(900 <= size <= 1100 for size in sizes), sizes  # 1000 +- ~5 sigma


def test_round_robin_is_positional() -> None:
    assert assign(["a", "b", "c", "d", "e"], 2, "round_robin") == [[0, 2, 4], [1, 3]]


def test_random_depends_on_the_seed_and_only_on_it() -> None:
    first = assign(KEYS, 3, "random", seed=1)
    assert assign(KEYS, 3, "random", seed=1) == first
    assert assign(KEYS, 3, "random", seed=2) != first
    assert first != assign(KEYS, 3, "round_robin")  # it does shuffle


def test_assignment_is_the_same_in_another_process() -> None:
    """No per-process state (Python's salted str hash, a global RNG) leaks into shards."""
    code = (
        "import json; from layerchain.train.sharding import assign, STRATEGIES;"
        f"keys = {KEYS!r};"
        "print(json.dumps({s: assign(keys, 3, s, seed=9) for s in STRATEGIES}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
    ).stdout
    assert json.loads(out) == {s: assign(KEYS, 3, s, seed=9) for s in STRATEGIES}


def test_hash_is_stable_under_reordering() -> None:
    shards = assign(KEYS, 4, "hash", seed=3)
    shard_of = {KEYS[i]: s for s, shard in enumerate(shards) for i in shard}
    reordered = list(reversed(KEYS))
    for s, shard in enumerate(assign(reordered, 4, "hash", seed=3)):
        assert all(shard_of[reordered[i]] == s for i in shard)


def test_hash_adding_keys_only_places_the_new_ones() -> None:
    old = assign(KEYS, 4, "hash")
    more = KEYS + [f"new key {i}" for i in range(40)]
    new = assign(more, 4, "hash")
    # the old keys keep their shards: each new shard, cut to old indices, is the old shard
    assert [[i for i in shard if i < len(KEYS)] for shard in new] == old


def test_hash_adding_a_shard_moves_only_keys_the_new_shard_takes() -> None:
    """Rendezvous hashing: from N to N + 1 shards (a peer joins), a key either stays or moves
    to the new shard, and ~1/(N + 1) of them move."""
    keys = [f"k{i}" for i in range(2000)]
    before = [hash_shard(k, 4, seed=7) for k in keys]
    after = [hash_shard(k, 5, seed=7) for k in keys]
    moved = [b != a for b, a in zip(before, after)]
    assert all(a == 4 for a, m in zip(after, moved) if m)
    assert 0.15 < sum(moved) / len(keys) < 0.25  # 1/5 expected


def test_hash_depends_on_the_seed() -> None:
    assert assign(KEYS, 4, "hash", seed=0) != assign(KEYS, 4, "hash", seed=1)


def test_more_shards_than_keys_and_no_keys() -> None:
    assert assign(["a", "b"], 4, "round_robin") == [[0], [1], [], []]
    assert assign([], 3, "hash") == [[], [], []]


@pytest.mark.parametrize(
    ("keys", "num_shards", "strategy", "seed", "message"),
    [
        (KEYS, 2, "semantic", 0, "unknown shard strategy 'semantic'"),
        (KEYS, 0, "hash", 0, "must be in 1.."),
        (KEYS, -1, "round_robin", 0, "must be in 1.."),
        (KEYS, 2.0, "round_robin", 0, "must be an integer"),
        (KEYS, True, "round_robin", 0, "must be an integer"),
        ("abc", 2, "hash", 0, "sequence of strings"),
        ([1, 2], 2, "hash", 0, "sequence of strings"),
        (KEYS, 2, "random", "x", "seed must be an integer"),
    ],
)
def test_bad_input_is_a_config_error(keys, num_shards, strategy, seed, message) -> None:
    with pytest.raises(ConfigError, match=message):
        assign(keys, num_shards, strategy, seed=seed)


def test_parse_shard() -> None:
    assert parse_shard("0/2") == (0, 2)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("2", "2/2", "-1/2", "a/b", "1/0", ""):
        with pytest.raises(ConfigError):
            parse_shard(bad)

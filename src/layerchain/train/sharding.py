"""Which training samples each peer takes: a pure assignment of sample keys to shards.

``assign(keys, num_shards, strategy, seed)`` returns, for each shard ``0..num_shards-1``,
the indices (ascending) of the keys it holds. Every index lands in exactly one shard. The
strategies (seed 003's):

* ``round_robin`` - index ``i`` goes to shard ``i % num_shards``. Sizes differ by at most
  one; depends on the order of the keys.
* ``random`` - a seeded shuffle of the indices dealt round-robin. Sizes differ by at most
  one; the same ``(len(keys), num_shards, seed)`` gives the same shards in every process
  (``random.Random`` with an int seed is specified to be reproducible across platforms).
* ``hash`` - rendezvous (highest-random-weight) hashing: a key goes to the shard ``s``
  maximizing ``blake2b(seed, s, key)``. A key's shard depends only on ``(key, num_shards,
  seed)``, not on its position or on the other keys, so reordering the data or appending
  to it moves nothing; and growing from ``N`` to ``N + 1`` shards (a peer joining) moves
  only the ~``1/(N + 1)`` keys the new shard wins. Sizes are balanced in expectation only.

A sample's key is ``train.data.record_key(record)``; this module knows nothing of records,
peers or the network. Used by ``train dp`` (each peer trains on its shard), the MCP tool
``llm_data_shard`` and, optionally, fine-tuning.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from layerchain.errors import ConfigError

STRATEGIES = ("round_robin", "hash", "random")
MAX_SHARDS = 4096  # more shards than any run has peers; bounds hash's O(keys x shards) work


def assign(keys: Sequence[str], num_shards: int, strategy: str, seed: int = 0) -> list[list[int]]:
    """Indices of ``keys`` per shard (``num_shards`` lists, each ascending), deterministic.

    ConfigError on an unknown strategy, a shard count outside ``1..MAX_SHARDS`` or a key that
    is not a string. More shards than keys is allowed (some shards are then empty).
    """
    check_shards(num_shards)
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"unknown shard strategy {strategy!r}", hint=f"use one of {', '.join(STRATEGIES)}"
        )
    if isinstance(keys, str) or not all(isinstance(key, str) for key in keys):
        raise ConfigError("shard keys must be a sequence of strings (train.data.record_key)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"shard seed must be an integer, not {seed!r}")
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    if strategy == "round_robin":
        for index in range(len(keys)):
            shards[index % num_shards].append(index)
    elif strategy == "random":
        order = list(range(len(keys)))
        random.Random(seed).shuffle(order)
        for position, index in enumerate(order):
            shards[position % num_shards].append(index)
        for shard in shards:
            shard.sort()
    else:
        for index, key in enumerate(keys):
            shards[hash_shard(key, num_shards, seed)].append(index)
    return shards


def hash_shard(key: str, num_shards: int, seed: int = 0) -> int:
    """The shard of ``key`` under the ``hash`` strategy (rendezvous hashing; see above)."""
    check_shards(num_shards)
    data = key.encode("utf-8")
    best, best_score = 0, b""
    for shard in range(num_shards):
        # 8-byte digests compared as bytes: a uniform order over shards, one per (seed, shard)
        salt = (seed % 2**64).to_bytes(8, "little") + shard.to_bytes(4, "little")
        score = hashlib.blake2b(data, digest_size=8, salt=salt).digest()
        if score > best_score:
            best, best_score = shard, score
    return best


def check_shards(num_shards: int) -> None:
    """ConfigError unless ``num_shards`` is an int in ``1..MAX_SHARDS``."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int):
        raise ConfigError(f"the number of shards must be an integer, not {num_shards!r}")
    if not 1 <= num_shards <= MAX_SHARDS:
        raise ConfigError(f"the number of shards must be in 1..{MAX_SHARDS}, not {num_shards}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (this peer's shard ``I`` of ``N``, 0-based) as ``(I, N)``; ConfigError if bad."""
    index_text, sep, count_text = text.partition("/")
    try:
        if not sep:
            raise ValueError
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ConfigError(f"bad shard {text!r}", hint="give I/N, e.g. 0/2 for the first of two") from None
    check_shards(count)
    if not 0 <= index < count:
        raise ConfigError(f"shard index {index} is outside 0..{count - 1}")
    return index, count

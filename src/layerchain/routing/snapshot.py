"""A swarm snapshot as data: what ``layerchain route --snapshot FILE.json`` reads.

Format (JSON object)::

    {"num_blocks": 30,
     "peers": [{"id": "a", "start": 0, "end": 10, "ms_per_block": 0.5,
                "price_per_block": 1.0, "rtt_ms": 2.0,
                "queue_ms": 0.0}, ...],                                     # queue_ms optional
     "peer_rtts": [{"a": "a", "b": "c", "rtt_ms": 1.5}, ...]}     # optional, push mode

Parsing is pure (the caller reads the file); anything malformed raises one ConfigError line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layerchain.errors import ConfigError
from layerchain.routing.route import RoutePeer

_PEER_FIELDS = ("id", "start", "end", "ms_per_block", "price_per_block", "rtt_ms")


@dataclass(frozen=True)
class Snapshot:
    """The planner's inputs read from a snapshot."""

    num_blocks: int
    peers: tuple[RoutePeer, ...]
    peer_rtts: dict[tuple[str, str], float]  # {(peer_a, peer_b): rtt ms}, may be empty


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"snapshot: {where} must be a number, not {value!r}")
    return float(value)


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"snapshot: {where} must be an integer, not {value!r}")
    return value


def parse_snapshot(data: Any) -> Snapshot:
    """A Snapshot from decoded JSON; ConfigError naming the first bad field."""
    if not isinstance(data, dict):
        raise ConfigError("snapshot: expected a JSON object with num_blocks and peers")
    if "num_blocks" not in data or "peers" not in data:
        raise ConfigError("snapshot: missing num_blocks or peers")
    num_blocks = _integer(data["num_blocks"], "num_blocks")
    if num_blocks < 1:
        raise ConfigError(f"snapshot: num_blocks must be >= 1, not {num_blocks}")
    if not isinstance(data["peers"], list):
        raise ConfigError("snapshot: peers must be a list")
    peers = []
    for i, item in enumerate(data["peers"]):
        if not isinstance(item, dict):
            raise ConfigError(f"snapshot: peers[{i}] must be an object")
        missing = [name for name in _PEER_FIELDS if name not in item]
        if missing:
            raise ConfigError(f"snapshot: peers[{i}] lacks {', '.join(missing)}")
        if not isinstance(item["id"], str):
            raise ConfigError(f"snapshot: peers[{i}].id must be a string")
        peers.append(RoutePeer(
            id=item["id"],
            start=_integer(item["start"], f"peers[{i}].start"),
            end=_integer(item["end"], f"peers[{i}].end"),
            ms_per_block=_number(item["ms_per_block"], f"peers[{i}].ms_per_block"),
            price_per_block=_number(item["price_per_block"], f"peers[{i}].price_per_block"),
            rtt_ms=_number(item["rtt_ms"], f"peers[{i}].rtt_ms"),
            queue_ms=_number(item.get("queue_ms", 0.0), f"peers[{i}].queue_ms"),
        ))
    peer_rtts: dict[tuple[str, str], float] = {}
    raw = data.get("peer_rtts", [])
    if not isinstance(raw, list):
        raise ConfigError("snapshot: peer_rtts must be a list of {a, b, rtt_ms}")
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not {"a", "b", "rtt_ms"} <= set(item):
            raise ConfigError(f"snapshot: peer_rtts[{i}] must be an object with a, b, rtt_ms")
        rtt = _number(item["rtt_ms"], f"peer_rtts[{i}].rtt_ms")
        if rtt < 0:
            raise ConfigError(f"snapshot: peer_rtts[{i}].rtt_ms must be >= 0")
        peer_rtts[(str(item["a"]), str(item["b"]))] = rtt
    return Snapshot(num_blocks, tuple(peers), peer_rtts)

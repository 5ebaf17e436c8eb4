"""What the dashboard shows: the swarm's nodes and coverage, and the gateway's recent requests.

``swarm_json`` is a pure function of the client's peer view (records, RTTs, bans): it knows
nothing of HTTP. ``RequestLog`` keeps the last N requests in memory (never on disk, and
never the prompts or answers: the dashboard is for operators, not for reading users' text),
updated as each request runs, so the dashboard sees running requests and their routes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from layerchain.discovery import PeerRecord


def nodes_json(
    records: Iterable[PeerRecord], rtt_ms: Mapping[str, float], banned: set[str]
) -> list[dict[str, Any]]:
    """One row per node, sorted by span: span, throughput, price, latency, free cache."""
    rows = []
    for r in sorted(records, key=lambda r: (r.start, r.end, r.peer_id)):
        blocks = r.end - r.start
        ms_per_token = r.ms_per_block * blocks  # compute time of the whole span per token
        rows.append({
            "peer_id": r.peer_id,
            "start": r.start,
            "end": r.end,
            "endpoint": r.endpoint,
            "ms_per_block": round(r.ms_per_block, 3),
            "tokens_per_s": round(1000.0 / ms_per_token, 1) if ms_per_token > 0 else None,
            "price_per_block": r.price_per_block,
            "rtt_ms": round(rtt_ms[r.peer_id], 2) if r.peer_id in rtt_ms else None,
            "free_cache_tokens": r.free_cache_tokens,
            "wallet": r.wallet,
            "version": r.version,
            "banned": r.peer_id in banned,
        })
    return rows


def coverage(records: Iterable[PeerRecord], num_blocks: int) -> list[int]:
    """How many nodes serve each block ``0..num_blocks-1`` (0 = a gap: no route exists)."""
    counts = [0] * num_blocks
    for r in records:
        for b in range(r.start, min(r.end, num_blocks)):
            counts[b] += 1
    return counts


@dataclass
class RequestRecord:
    """One request as the dashboard shows it; filled in as the request runs."""

    id: str
    kind: str  # "chat" | "text"
    stream: bool
    created: float  # unix time, s
    user: str | None = None  # the request's ``user`` field
    key_id: str | None = None  # the API key's public id, when keys are on
    status: str = "running"  # "running" | "done" | "error" | "cancelled" (caller went away)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    route: list[dict[str, Any]] = field(default_factory=list)  # [{peer_id, start, end}]
    cost: int = 0  # credits the swarm charged
    tokens_per_s: float = 0.0
    ttft_s: float = 0.0
    duration_s: float = 0.0
    finish_reason: str | None = None
    error: str | None = None  # the error's one line, when status is "error"
    limits: dict[str, Any] = field(default_factory=dict)  # routing extensions the caller gave

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RequestLog:
    """The last ``size`` requests, newest first, and running totals since the gateway started."""

    def __init__(self, size: int = 50) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=size)
        self.totals = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
                       "cost": 0}

    def start(self, record: RequestRecord) -> RequestRecord:
        self._records.appendleft(record)
        self.totals["requests"] += 1
        return record

    def finish(self, record: RequestRecord, result: Any) -> None:
        record.status = "done"
        record.prompt_tokens = result.prompt_tokens
        record.completion_tokens = len(result.token_ids)
        record.route = [{"peer_id": h.peer_id, "start": h.start, "end": h.end} for h in result.route]
        record.cost = int(getattr(result, "cost", 0))
        record.tokens_per_s = round(result.tokens_per_s, 3)
        record.ttft_s = round(result.ttft_s, 3)
        record.finish_reason = result.finish_reason
        record.duration_s = round(time.time() - record.created, 3)
        self.totals["prompt_tokens"] += record.prompt_tokens
        self.totals["completion_tokens"] += record.completion_tokens
        self.totals["cost"] += record.cost

    def fail(self, record: RequestRecord, message: str, status: str = "error") -> None:
        record.status = status
        record.error = message
        record.duration_s = round(time.time() - record.created, 3)
        self.totals["errors"] += status == "error"

    def recent(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self._records]

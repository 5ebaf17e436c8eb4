"""What the dashboard shows: the swarm's nodes and coverage, and the gateway's recent requests.

``nodes_json`` is a pure function of the client's ``SwarmState`` snapshot: it knows nothing
of HTTP. ``RequestLog`` keeps the last N requests in memory (never on disk, and
never the prompts or answers: the dashboard is for operators, not for reading users' text),
updated as each request runs, so the dashboard sees running requests and their routes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from layerchain.client.state import NodeState


def nodes_json(nodes: Iterable[NodeState]) -> list[dict[str, Any]]:
    """One row per node, in the snapshot's order (by span): span, throughput, price,
    latency, free cache."""
    rows = []
    for n in nodes:
        ms_per_token = n.ms_per_block * (n.end - n.start)  # compute time of the whole span per token
        rows.append({
            "peer_id": n.peer_id,
            "start": n.start,
            "end": n.end,
            "endpoint": n.endpoint,
            "ms_per_block": round(n.ms_per_block, 3),
            "tokens_per_s": round(1000.0 / ms_per_token, 1) if ms_per_token > 0 else None,
            "price_per_block": n.price_per_block,
            "rtt_ms": round(n.rtt_ms, 2) if n.rtt_ms is not None else None,
            "free_cache_tokens": n.free_cache_tokens,
            "wallet": n.wallet,
            "version": n.version,
            "banned": n.banned,
        })
    return rows


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
    """The last ``size`` requests, newest first, and running totals since the gateway started
    (in all, and per API key, so a key's holder can be shown only its own)."""

    def __init__(self, size: int = 50) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=size)
        self.totals = _zero_totals()
        self._key_totals: dict[str, dict[str, int]] = {}  # key_id -> totals of its requests

    def _add(self, record: RequestRecord, name: str, value: int) -> None:
        self.totals[name] += value
        if record.key_id is not None:
            self._key_totals.setdefault(record.key_id, _zero_totals())[name] += value

    def start(self, record: RequestRecord) -> RequestRecord:
        self._records.appendleft(record)
        self._add(record, "requests", 1)
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
        self._add(record, "prompt_tokens", record.prompt_tokens)
        self._add(record, "completion_tokens", record.completion_tokens)
        self._add(record, "cost", record.cost)

    def fail(self, record: RequestRecord, message: str, status: str = "error") -> None:
        record.status = status
        record.error = message
        record.duration_s = round(time.time() - record.created, 3)
        self._add(record, "errors", int(status == "error"))

    def recent(self, key_id: str | None = None) -> list[dict[str, Any]]:
        """The recent requests: all, or only those made with ``key_id``."""
        return [r.to_json() for r in self._records if key_id is None or r.key_id == key_id]

    def totals_of(self, key_id: str | None = None) -> dict[str, int]:
        """Totals since the start: of every request, or of those made with ``key_id``."""
        return dict(self.totals if key_id is None else self._key_totals.get(key_id, _zero_totals()))


def _zero_totals() -> dict[str, int]:
    return {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0}

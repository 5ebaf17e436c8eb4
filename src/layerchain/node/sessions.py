"""Inference sessions on a node: one KV cache per session, admitted against a token budget.

A session reserves ``max_length`` cache tokens when it opens and frees them when it closes
or idles out. Steps of one session run strictly in order (``step`` numbers 0, 1, 2, ...);
different sessions run concurrently. Knows nothing of the wire: the server maps its errors.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from layerchain.errors import LimitExceeded, PeerBusy, UnknownSession


@dataclass
class Session:
    session_id: str
    max_length: int  # cache tokens reserved for this session
    cache: Any  # the span's KVCache for blocks [start, end)
    start: int = 0  # first block this session runs (a sub-range of the node's span)
    end: int = 0  # one past its last block
    next_step: int = 0  # step number expected next
    tokens: int = 0  # tokens processed so far (cache length)
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    payment: Any = None  # the node's receipt chain and channel for this session


class SessionTable:
    """Open sessions of one node, with cache-token admission and idle expiry."""

    def __init__(self, max_cache_tokens: int, max_sessions: int, idle_timeout_s: float) -> None:
        self.max_cache_tokens = max_cache_tokens
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, Session] = {}
        self._reserved = 0

    @property
    def free_cache_tokens(self) -> int:
        return self.max_cache_tokens - self._reserved

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session_id: str, max_length: int, cache: Any, start: int = 0, end: int = 0) -> Session:
        if session_id in self._sessions:
            raise LimitExceeded(f"session {session_id} is already open")
        if max_length <= 0:
            raise LimitExceeded(f"max_length must be positive, got {max_length}")
        if len(self._sessions) >= self.max_sessions:
            raise PeerBusy(f"node has {len(self._sessions)} sessions open, its limit")
        if max_length > self.free_cache_tokens:
            raise PeerBusy(
                f"session needs {max_length} cache tokens, {self.free_cache_tokens} are free"
            )
        session = Session(session_id, max_length, cache, start, end)
        self._sessions[session_id] = session
        self._reserved += max_length
        return session

    def get(self, session_id: str) -> Session:
        try:
            session = self._sessions[session_id]
        except KeyError:
            raise UnknownSession(f"no session {session_id} on this node") from None
        session.last_used = time.monotonic()
        return session

    def close(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        self._reserved -= session.max_length
        session.cache = None  # drop the KV tensors now, not when the last reference dies
        return True

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Close sessions idle longer than the timeout; return their ids."""
        now = time.monotonic() if now is None else now
        idle = [
            sid
            for sid, s in self._sessions.items()
            if now - s.last_used > self.idle_timeout_s and not s.lock.locked()
        ]
        for sid in idle:
            self.close(sid)
        return idle

    def close_all(self) -> None:
        for sid in list(self._sessions):
            self.close(sid)

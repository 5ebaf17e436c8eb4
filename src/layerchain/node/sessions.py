"""Inference sessions on a node: one KV cache per session, admitted against a token budget.

A session reserves ``max_length`` cache tokens when it opens and frees them when it closes
or expires. Steps of one session run strictly in order (``step`` numbers 0, 1, 2, ...);
different sessions run concurrently. Knows nothing of the wire: the server maps its errors.

Admission is not free, so what one client can hold is bounded (``Admission``):
* one session reserves at most ``max_session_tokens`` (a bigger ``max_length`` is
  ``LimitExceeded``: the node announces ``admissible_tokens``, never more than that cap);
* the open sessions of one owner (the server passes one per connection) reserve at most
  ``max_owner_tokens`` together (more is ``PeerBusy`` until some close);
* a session that runs no step within ``first_step_timeout_s`` of opening is closed (a
  reservation nobody uses), one whose last step is ``idle_timeout_s`` old too.
So a squatter needs several connections and must keep stepping to hold most of the cache;
a priced node also makes it pay for what it reserves (``node.payments``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from layerchain.errors import ConfigError, LimitExceeded, PeerBusy, UnknownSession


@dataclass(frozen=True)
class Admission:
    """What the sessions of one node may reserve, in cache tokens, and for how long."""

    max_cache_tokens: int  # the sum of max_length over all open sessions
    max_sessions: int  # sessions open at once, whatever their size
    idle_timeout_s: float  # a session without a step for this long is closed
    max_session_tokens: int = 0  # one session's max_length; 0: all of max_cache_tokens
    max_owner_tokens: int = 0  # the sum over one owner's sessions; 0: all of max_cache_tokens
    first_step_timeout_s: float = 0.0  # a session with no step this long after opening is
    # closed; 0: idle_timeout_s

    def __post_init__(self) -> None:
        for name in ("max_cache_tokens", "max_sessions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_session_tokens", "max_owner_tokens"):
            if not 0 <= getattr(self, name) <= self.max_cache_tokens:
                raise ConfigError(
                    f"{name} must be in 0..max_cache_tokens ({self.max_cache_tokens}), "
                    f"got {getattr(self, name)}"
                )
        if self.idle_timeout_s <= 0 or self.first_step_timeout_s < 0:
            raise ConfigError("session timeouts must be positive")

    @property
    def session_cap(self) -> int:
        return self.max_session_tokens or self.max_cache_tokens

    @property
    def owner_cap(self) -> int:
        return self.max_owner_tokens or self.max_cache_tokens

    @property
    def first_step_s(self) -> float:
        return self.first_step_timeout_s or self.idle_timeout_s


@dataclass
class Session:
    session_id: str
    max_length: int  # cache tokens reserved for this session
    cache: Any  # the span's KVCache for blocks [start, end); None once closed
    start: int = 0  # first block this session runs (a sub-range of the node's span)
    end: int = 0  # one past its last block
    owner: int = 0  # who opened it (the server's id of the connection)
    next_step: int = 0  # step number expected next
    tokens: int = 0  # tokens processed so far (cache length)
    last_used: float = field(default_factory=time.monotonic)  # opened, or its last step ran
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    payment: Any = None  # the node's receipt chain and channel for this session
    span: Any = None  # the SpanModel its cache belongs to (a node that moved keeps serving
    # its open sessions on the span they opened on; node.server.Node.swap_span)
    wire: str = ""  # the form its hidden states travel in (OpenSession.wire, wire.compress)

    def stepped(self, tokens: int) -> None:
        """Record a step that ran: ``tokens`` more in the cache, the next step expected."""
        self.tokens += tokens
        self.next_step += 1
        self.last_used = time.monotonic()


class SessionTable:
    """Open sessions of one node, with cache-token admission and expiry (see the module)."""

    def __init__(
        self,
        max_cache_tokens: int,
        max_sessions: int,
        idle_timeout_s: float,
        *,
        max_session_tokens: int = 0,
        max_owner_tokens: int = 0,
        first_step_timeout_s: float = 0.0,
    ) -> None:
        self.admission = Admission(
            max_cache_tokens, max_sessions, idle_timeout_s,
            max_session_tokens, max_owner_tokens, first_step_timeout_s,
        )
        self._sessions: dict[str, Session] = {}
        self._reserved = 0
        self._by_owner: dict[int, int] = {}  # owner -> tokens its open sessions reserve

    @property
    def max_cache_tokens(self) -> int:
        return self.admission.max_cache_tokens

    @property
    def free_cache_tokens(self) -> int:
        """Cache tokens not reserved by any session."""
        return self.admission.max_cache_tokens - self._reserved

    @property
    def admissible_tokens(self) -> int:
        """The largest ``max_length`` a new session could get now (what the node announces)."""
        return min(self.free_cache_tokens, self.admission.session_cap)

    def __len__(self) -> int:
        return len(self._sessions)

    def open(
        self,
        session_id: str,
        max_length: int,
        cache: Any,
        start: int = 0,
        end: int = 0,
        owner: int = 0,
    ) -> Session:
        """Admit a session reserving ``max_length`` tokens, or raise LimitExceeded (a request
        this node never admits) or PeerBusy (no room now)."""
        rules = self.admission
        if session_id in self._sessions:
            raise LimitExceeded(f"session {session_id} is already open")
        if max_length <= 0:
            raise LimitExceeded(f"max_length must be positive, got {max_length}")
        if max_length > rules.session_cap:
            raise LimitExceeded(
                f"max_length {max_length} exceeds the {rules.session_cap} cache tokens one "
                "session may reserve on this node"
            )
        if len(self._sessions) >= rules.max_sessions:
            raise PeerBusy(f"node has {len(self._sessions)} sessions open, its limit")
        if max_length > self.free_cache_tokens:
            raise PeerBusy(
                f"session needs {max_length} cache tokens, {self.free_cache_tokens} are free"
            )
        held = self._by_owner.get(owner, 0)
        if held + max_length > rules.owner_cap:
            raise PeerBusy(
                f"this connection's sessions reserve {held} cache tokens; {max_length} more "
                f"would pass the {rules.owner_cap} one connection may hold"
            )
        session = Session(session_id, max_length, cache, start, end, owner)
        self._sessions[session_id] = session
        self._reserved += max_length
        self._by_owner[owner] = held + max_length
        return session

    def get(self, session_id: str, owner: int | None = None) -> Session:
        """The open session ``session_id`` of ``owner`` (None: of anyone); UnknownSession if
        there is none, or it is another owner's (a session belongs to its connection). Only
        a step it ran (``Session.stepped``) keeps it from expiring, not a request that failed."""
        session = self._sessions.get(session_id)
        if session is None or (owner is not None and session.owner != owner):
            raise UnknownSession(f"no session {session_id} on this node")
        return session

    def close(self, session_id: str, owner: int | None = None) -> bool:
        """Close the session (only if it is ``owner``'s, unless None); whether it was open."""
        session = self._sessions.get(session_id)
        if session is None or (owner is not None and session.owner != owner):
            return False
        del self._sessions[session_id]
        self._reserved -= session.max_length
        left = self._by_owner.pop(session.owner) - session.max_length
        if left:
            self._by_owner[session.owner] = left
        session.cache = None  # drop the KV tensors now, not when the last reference dies
        return True

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Close sessions with no step ``first_step_timeout_s`` after opening, or none for
        ``idle_timeout_s`` since their last one (never one running a step); their ids."""
        now = time.monotonic() if now is None else now
        rules = self.admission
        idle = [
            sid
            for sid, s in self._sessions.items()
            if now - s.last_used > (rules.first_step_s if s.next_step == 0 else rules.idle_timeout_s)
            and not s.lock.locked()
        ]
        for sid in idle:
            self.close(sid)
        return idle

    def open_sessions(self) -> list[Session]:
        """The sessions open now (a snapshot)."""
        return list(self._sessions.values())

    def close_all(self) -> None:
        for sid in list(self._sessions):
            self.close(sid)

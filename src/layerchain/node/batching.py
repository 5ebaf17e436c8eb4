"""Batched decode on a node: one-token steps of concurrent sessions run as one forward.

A node's step handler hands each one-token step that ``model.batched.batchable`` admits to
its ``DecodeBatcher`` (``step``) and awaits the output row. The batcher collects such steps
and runs them as one ``decode_batch`` over the span (weights read once for all of them;
each session's own cache and positions), in the spirit of Petals' step pooling and
transformers' continuous batching. The window adapts, so one session pays nothing:

* a step runs at once when no other session is expected: none ran a decode step (or its
  prompt, ``expect``) in the last ``recent_s`` (or, for a session that stepped before, in
  ``gap_factor`` times its last interval between steps), or all that did are waiting with it;
* else it waits for the sessions expected, then the batch runs with whoever came, at once
  when all are in. How long at most (``wait_s``): a window (``window_share`` of the recent
  forwards' time, within ``min_window_ms``..``window_ms``: a slow span's clients answer
  each batch later, and a step waiting half a forward for its batch still gains); and
  phase alignment: a session that steps regularly (its last two intervals between steps
  differ by at most ``horizon_s``) is due one interval after its last step (on a loaded
  machine, where intervals vary by seconds, no session is), and the step waits until the last session due
  within a ``horizon_s`` (``phase_share`` of the recent forwards' time, at most
  ``phase_ms``) is due, plus the window. Streams drift out of phase, and a group of
  sessions one forward behind another (it queued behind that forward on the previous
  hop) stays one forward behind on every hop, two small batches for ever, if nobody waits
  longer than a window; waiting up to a forward for it makes one batch of the two.
  Steps arriving while a batch computes join the next one (all torch work is
  on the event loop thread, node.server's OpenMP note: a batch computes between two turns
  of the loop, as a prefill's slices do, so decode batches interleave with a prefill's
  slices and a long prompt does not stall other sessions).

A batch of one runs ``span.forward`` itself: a session alone gets today's bits exactly. A
bigger one groups steps by span and block range (a node that moved serves old sessions on
their old span); if its forward fails, its steps run one by one, so an error stays with the
session that caused it. A session closed while its step waited gets ``UnknownSession``;
one whose waiter was cancelled is left out (or, if already computed, its cache is rolled
back), so its cache never runs ahead of its step count. Everything per session (order,
checks, payments, receipts) stays in the step handler; the batcher only computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from layerchain.errors import UnknownSession
from layerchain.model.batched import decode_batch
from layerchain.node.sessions import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    """How long decode steps wait for each other."""

    window_ms: float = 20.0  # longest a step waits for the other sessions expected, ms;
    # 0: every step runs alone as it arrives (no batching)
    window_share: float = 0.5  # the wait: this share of the recent forwards' time (a moving
    # average), within min_window_ms..window_ms; 0: always window_ms
    min_window_ms: float = 2.0  # the shortest wait for sessions expected, ms
    recent_s: float = 1.0  # a session whose last decode step is this recent is expected,
    # or more recent than gap_factor x the time between its last two steps (a loaded
    # machine's streams step seconds apart: they are still expected)
    gap_factor: float = 2.0
    max_batch: int = 32  # steps in one forward at most (more: several forwards)
    phase_share: float = 1.5  # wait for the sessions due within this many recent forwards'
    # time (horizon_s), at most phase_ms; 0: only the window (sessions expected, not due)
    phase_ms: float = 250.0


@dataclass(frozen=True)
class Decoded:
    """A session's output row and the batch it was computed in."""

    hidden: torch.Tensor  # [1, 1, H] in CPU memory, in the span's compute dtype
    batch: int  # sessions in the forward that computed it (1: ``span.forward`` alone)
    seconds: float  # that forward's time (with the copy of its output to CPU memory)


@dataclass(frozen=True)
class _Recent:
    """A session's last steps, as the batcher saw them."""

    session: weakref.ref[Session]  # weakly: a closed one and its span are freed (e.g. the
    # span a node moved from)
    last: float  # when it last decoded or ran its prompt
    until: float  # until when it is expected
    gap: float  # its last interval between two steps (0: not known yet)
    jitter: float  # how much that interval differs from the one before (inf: not known)


@dataclass
class _Pending:
    session: Session
    x: torch.Tensor  # [1, 1, H] as received
    future: asyncio.Future[Decoded] = field(repr=False)


class DecodeBatcher:
    """Collects one node's one-token decode steps and runs them in batches (see module)."""

    def __init__(
        self, config: BatchConfig = BatchConfig(), clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.clock = clock
        self._pending: list[_Pending] = []
        self._recent: dict[str, _Recent] = {}  # session id -> its last steps
        self._timer: asyncio.TimerHandle | None = None
        self.sizes: Counter[int] = Counter()  # forwards run by their number of steps
        self.batches = 0  # forwards run (statistics)
        self.batched_steps = 0  # steps computed in a forward of more than one
        self.largest_batch = 0  # the most steps one forward computed
        self.forward_s = 0.0  # moving average of a forward's seconds (0: none yet)

    async def step(self, session: Session, x: torch.Tensor) -> Decoded:
        """``session``'s one-token step over ``x`` [1, 1, H] through its blocks, appending to
        its cache, batched with other sessions' steps. Raises UnknownSession if the session
        closes meanwhile, and what its own forward raises."""
        loop = asyncio.get_running_loop()
        now = self.clock()
        self._stepped(session, now)
        entry = _Pending(session, x, loop.create_future())
        self._pending.append(entry)
        awaited = self._awaited(now) if self.config.window_ms > 0 else {}
        if not awaited:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._wait_for(awaited, now), self.flush)
        try:
            return await entry.future
        except asyncio.CancelledError:
            done = entry.future.done() and not entry.future.cancelled()
            cache = session.cache
            if done and entry.future.exception() is None and cache is not None:
                cache.truncate(cache.length - 1)  # computed, but its step will not count
            raise

    def expect(self, session: Session) -> None:
        """``session`` will send decode steps soon (it just ran its prompt, or a step alone
        outside the batcher): steps of others wait for its next as for those of sessions
        that decoded recently."""
        self._stepped(session, self.clock())

    def _stepped(self, session: Session, now: float) -> None:
        last = self._recent.get(session.session_id)
        gap = now - last.last if last is not None else 0.0
        jitter = abs(gap - last.gap) if last is not None and last.gap > 0 else float("inf")
        until = now + max(self.config.recent_s, self.config.gap_factor * gap)
        self._recent[session.session_id] = _Recent(weakref.ref(session), now, until, gap, jitter)

    def batching(self, session: Session) -> bool:
        """Whether a decode step of ``session`` now could share a forward: batching is on and
        another session stepped recently or waits (the node runs a slow span's step alone in
        slices otherwise, node.server)."""
        if self.config.window_ms <= 0:
            return False
        self._expected(self.clock())  # forgets sessions neither recent nor open
        return any(sid != session.session_id for sid in self._recent)

    @property
    def window_s(self) -> float:
        """How long a step waits for the sessions expected now, seconds."""
        config = self.config
        if config.window_share <= 0 or not self.forward_s:
            return config.window_ms / 1000.0
        wait = config.window_share * self.forward_s
        return min(config.window_ms, max(config.min_window_ms, 1000.0 * wait)) / 1000.0

    @property
    def horizon_s(self) -> float:
        """Sessions due within this time from now are waited for, seconds (at least the
        window)."""
        config = self.config
        phase = min(config.phase_ms / 1000.0, config.phase_share * self.forward_s)
        return max(self.window_s, phase)

    def _awaited(self, now: float) -> dict[str, float]:
        """Sessions a step arriving at ``now`` waits for (expected, not waiting yet) -> until
        when: when it is due if that is within ``horizon_s``, else ``now`` (due time unknown,
        its intervals irregular, late, or a round away: the window only)."""
        expected = self._expected(now)
        if self.config.phase_share <= 0:  # the window alone, for every session expected
            return dict.fromkeys(expected, now)
        horizon_s = self.horizon_s
        horizon = now + horizon_s
        awaited = {}
        for sid in expected:
            recent = self._recent[sid]
            if recent.jitter <= horizon_s:  # it steps regularly: due one interval on
                due = recent.last + recent.gap
                awaited[sid] = max(due, now) if due <= horizon else now
            else:
                awaited[sid] = now
        return awaited

    def wait_s(self, now: float) -> float:
        """How long a step arriving at ``now`` waits for the sessions it awaits, seconds: until
        the last of them is due plus a window, within the horizon (0: none awaited)."""
        return self._wait_for(self._awaited(now), now)

    def _wait_for(self, awaited: dict[str, float], now: float) -> float:
        """``wait_s`` for the sessions ``_awaited(now)`` gave."""
        if not awaited:
            return 0.0
        return min(max(awaited.values()) + self.window_s - now, self.horizon_s)

    def _ran(self, seconds: float) -> None:
        self.batches += 1
        self.forward_s = seconds if not self.forward_s else 0.7 * self.forward_s + 0.3 * seconds

    def _expected(self, now: float) -> set[str]:
        """Ids of sessions that stepped recently and are not waiting yet (forgetting those
        neither recent nor open)."""
        waiting = {p.session.session_id for p in self._pending}
        for sid, recent in list(self._recent.items()):
            session = recent.session()
            if recent.until < now or session is None or session.cache is None:
                del self._recent[sid]
        return {sid for sid in self._recent if sid not in waiting}

    def flush(self) -> None:
        """Run every waiting step now (in batches where they can share a forward)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        groups: dict[tuple[int, int, int], list[_Pending]] = {}
        for entry in pending:
            if entry.future.done():  # its waiter was cancelled: not computed
                continue
            session = entry.session
            if session.cache is None:
                entry.future.set_exception(
                    UnknownSession(f"session {session.session_id} closed during its step")
                )
                continue
            key = (id(session.span), session.start, session.end)
            groups.setdefault(key, []).append(entry)
        size = max(1, self.config.max_batch)
        for group in groups.values():
            for i in range(0, len(group), size):
                self._run(group[i : i + size])

    def _run(self, group: list[_Pending]) -> None:
        if len(group) == 1:
            self._alone(group[0])
            return
        span = group[0].session.span
        t0 = time.perf_counter()
        try:
            rows = torch.cat([e.x for e in group])  # [B, 1, H] (the span casts it, once)
            with torch.inference_mode():
                out = decode_batch(span, rows, [e.session.cache for e in group]).to("cpu")
        except Exception as error:  # each alone: the error stays with its session
            log.info("a batch of %d decode steps failed (%s): one by one", len(group), error)
            for entry in group:
                self._alone(entry)
            return
        seconds = time.perf_counter() - t0
        self._ran(seconds)
        self.sizes[len(group)] += 1
        self.batched_steps += len(group)
        self.largest_batch = max(self.largest_batch, len(group))
        for i, entry in enumerate(group):  # a copy: a row does not hold the whole batch
            entry.future.set_result(Decoded(out[i : i + 1].clone(), len(group), seconds))

    def _alone(self, entry: _Pending) -> None:
        session = entry.session
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = session.span.forward(
                    entry.x, session.cache, start=session.start, end=session.end
                ).to("cpu")
        except Exception as error:
            entry.future.set_exception(error)
            return
        seconds = time.perf_counter() - t0
        self._ran(seconds)
        self.sizes[1] += 1
        self.largest_batch = max(self.largest_batch, 1)
        entry.future.set_result(Decoded(out, 1, seconds))

"""A node's load as it announces it (issue 16.2): steps in flight and recent step time.

``LoadMeter`` is fed by the node's step handler (``begin`` when a step arrives, ``end``
when it is answered) and read when the record is built (``PeerLoad``). Time is an
argument (monotonic seconds), so the arithmetic is testable with literals; O(1) per call,
a few float operations: it runs once per step.

* ``queued_steps``: the number of steps in flight (waiting for the node or computing),
  averaged over time with an exponential window of ``tau_s`` seconds. By Little's law a
  step arriving at a random moment finds that many ahead of it, so a client estimates its
  wait as ``queued_steps * step_ms`` (``routing.load.expected_queue_ms``).
* ``step_ms``: a moving average of one-token steps' compute time, scaled to the node's
  whole span (a step over part of it is measured per block), ms.

``worth_announcing`` says when the load moved enough since the last announcement to
re-announce before the periodic refresh (rate-limited), so clients starting a moment
later already see a node that just got busy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from layerchain.discovery.records import PeerLoad

LOAD_TAU_S = 2.0  # time constant of the steps-in-flight average, seconds
STEP_SMOOTHING = 0.2  # weight of a new step time in its moving average
LOAD_ANNOUNCE_S = 1.0  # re-announce a changed load at most this often, seconds
QUEUE_CHANGE = 0.25  # steps in flight: a change this large (or a session more or less) is
# worth an announcement before the periodic refresh


class LoadMeter:
    """Steps in flight over time and the recent one-token step time of one node."""

    def __init__(self, span_blocks: int, now: float, tau_s: float = LOAD_TAU_S) -> None:
        self.span_blocks = span_blocks  # blocks of the node's span
        self.tau_s = tau_s
        self.in_flight = 0  # steps begun and not ended
        self.average = 0.0  # time-averaged steps in flight
        self.step_ms = 0.0  # recent one-token step over the whole span, ms (0: none yet)
        self._at = now  # monotonic s the average is up to date at

    def _advance(self, now: float) -> None:
        dt = now - self._at
        if dt > 0:
            keep = math.exp(-dt / self.tau_s)
            self.average = keep * self.average + (1.0 - keep) * self.in_flight
            self._at = now

    def begin(self, now: float) -> None:
        """A step arrived (it waits for the node, then computes)."""
        self._advance(now)
        self.in_flight += 1

    def end(self, now: float) -> None:
        """A step was answered (or failed)."""
        self._advance(now)
        self.in_flight = max(0, self.in_flight - 1)

    def sample(self, per_block_ms: float) -> None:
        """A one-token step computed in ``per_block_ms`` per block."""
        if math.isfinite(per_block_ms) and per_block_ms >= 0:
            sample = per_block_ms * self.span_blocks
            self.step_ms = sample if self.step_ms == 0.0 else (
                (1 - STEP_SMOOTHING) * self.step_ms + STEP_SMOOTHING * sample)

    def load(self, now: float, sessions: int) -> PeerLoad:
        """The ``PeerLoad`` to announce now, with ``sessions`` open."""
        self._advance(now)
        return PeerLoad(sessions=sessions, queued_steps=round(self.average, 3),
                        step_ms=round(self.step_ms, 3))


@dataclass(frozen=True)
class Announced:
    """The load last announced and when (monotonic s)."""

    load: PeerLoad
    at: float


def worth_announcing(last: Announced | None, now_load: PeerLoad, now: float,
                     every_s: float = LOAD_ANNOUNCE_S) -> bool:
    """Pure: whether ``now_load`` should be announced before the periodic refresh: at most
    once per ``every_s``, and only when sessions changed or the steps in flight moved by
    ``QUEUE_CHANGE`` (or by a quarter of what was announced, when more)."""
    if last is None:
        return True
    if now - last.at < every_s:
        return False
    if now_load.sessions != last.load.sessions:
        return True
    moved = abs(now_load.queued_steps - last.load.queued_steps)
    return moved >= max(QUEUE_CHANGE, 0.25 * last.load.queued_steps)

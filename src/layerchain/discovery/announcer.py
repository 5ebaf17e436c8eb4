"""Keeping a node's records alive: re-announce every ``refresh_s``, withdraw on stop.

The ``Announcer`` owns one asyncio task. It knows nothing of what a record says: a callable
from the node builds the current record (span, measured speed, free cache, ...) and the
announcer only stamps ``expires_at = now + ttl_s`` and hands it to a ``Discovery``. A record
that is not refreshed disappears from readers ``ttl_s`` after its last announcement, so a
crashed node vanishes within ``ttl_s`` without anyone withdrawing it.

When the built record's span shrinks or moves, the blocks it no longer covers are withdrawn
right after the new record is announced (the new one first, so no block is ever empty).

``announce_now`` may be called at any time besides the refresh (a node announces a freed
cache or a moved load at once); calls run one at a time, so each announcement is built
after the previous one was stamped and expires strictly later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from layerchain.discovery.base import TOMBSTONE_MARGIN_S, Discovery
from layerchain.discovery.records import MAX_RECORD_TTL_S, PeerRecord
from layerchain.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnounceConfig:
    refresh_s: float = 15.0  # re-announce every this many seconds
    ttl_s: float = 60.0  # each announcement expires this many seconds after it is made;
    # at most half of records.MAX_RECORD_TTL_S, the other half absorbs clock skew
    withdraw_timeout_s: float = 5.0  # give up withdrawing on stop after this many seconds

    def __post_init__(self) -> None:
        if not 0 < self.refresh_s < self.ttl_s:
            raise ConfigError(
                f"refresh period {self.refresh_s} s must be positive and below ttl {self.ttl_s} s"
            )
        if self.ttl_s > MAX_RECORD_TTL_S / 2:
            raise ConfigError(
                f"record ttl {self.ttl_s:g} s is too long: DHT nodes refuse records living "
                f"longer than {MAX_RECORD_TTL_S:g} s",
                hint=f"use --record-ttl {MAX_RECORD_TTL_S / 2:g} or less",
            )


def uncovered(old: PeerRecord, new: PeerRecord) -> list[tuple[int, int]]:
    """Pure: the block ranges of ``old`` that ``new`` no longer announces."""
    if old.model_id != new.model_id:
        return [(old.start, old.end)]
    gaps = []
    if old.start < new.start:
        gaps.append((old.start, min(old.end, new.start)))
    if old.end > new.end:
        gaps.append((max(old.start, new.end), old.end))
    return gaps


class Announcer:
    """Announces ``build_record()`` now and every ``refresh_s``; withdraws it on ``stop()``."""

    def __init__(
        self,
        discovery: Discovery,
        build_record: Callable[[], PeerRecord],
        config: AnnounceConfig = AnnounceConfig(),
        clock: Callable[[], float] = time.time,  # unix seconds, as record expiry uses
    ) -> None:
        self.discovery = discovery
        self.build_record = build_record
        self.config = config
        self.clock = clock
        self.last: PeerRecord | None = None  # the record most recently announced
        self.failures = 0  # refreshes that raised
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one announcement at a time (module docstring)

    async def start(self) -> PeerRecord:
        """Announce once (errors propagate), then keep refreshing in the background."""
        record = await self.announce_now()
        self._task = asyncio.create_task(self._refresh_forever(), name="layerchain-announcer")
        return record

    async def announce_now(self) -> PeerRecord:
        """Build, stamp and announce the current record; withdraw blocks it dropped."""
        async with self._lock:
            return await self._announce()

    async def _announce(self) -> PeerRecord:
        expires_at = self.clock() + self.config.ttl_s
        if self.last is not None:
            # Stores keep the entry expiring last: each announcement must expire strictly
            # later than the previous one, even if the clock stalled or stepped back.
            expires_at = max(expires_at, self.last.expires_at + TOMBSTONE_MARGIN_S)
        record = dataclasses.replace(self.build_record(), expires_at=expires_at)
        await self.discovery.announce(record)
        previous, self.last = self.last, record
        if previous is not None:
            for start, end in uncovered(previous, record):
                await self.discovery.withdraw(previous.model_id, previous.peer_id, start, end)
        return record

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_s)
            try:
                await self.announce_now()
            except Exception as e:  # a DHT hiccup must not stop the node; retry next period
                self.failures += 1
                logger.warning("re-announcing failed (%s); retrying in %s s", e, self.config.refresh_s)

    async def stop(self, withdraw: bool = True) -> None:
        """Stop refreshing and, if ``withdraw``, tombstone the last announced span. Idempotent."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        last, self.last = self.last, None
        if withdraw and last is not None:
            try:
                await asyncio.wait_for(
                    self.discovery.withdraw(last.model_id, last.peer_id, last.start, last.end),
                    timeout=self.config.withdraw_timeout_s,
                )
            except Exception as e:  # the records will expire on their own within ttl_s
                logger.warning("withdrawing %s failed: %s", last.span, e)

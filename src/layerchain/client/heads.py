"""The LM head of one client's concurrent generations, computed for all of them at once.

A client decoding N streams at once (N tasks on one ``AsyncSwarm``) runs N LM heads per
round of tokens on its one event-loop thread. The head is the biggest matmul of a small
model (SmolLM2: 49,152 x 576, 113 MB in fp32) and memory bound, so one ``[N, 1, H]`` head
costs little more than one ``[1, 1, H]``. ``HeadBatcher.logits`` collects the rows of the
generations whose hidden states came back together (a node that batches decode steps
answers them one after another: a row waits for the others' at most half a one-row head
call, ``window_s``, and not at all once every active generation brought its row) and runs
the head once for them.

A generation alone pays nothing: while at most one generation is ``active`` its row goes
through the head at once, exactly as ``Decoder.accept`` would (the same call, the same
bits; the exactness tests rely on it). So does a row alone in its turn. Rows batched
together may differ from their solo logits in the last bits (matmul blocking), as the
nodes' batched decode may; greedy tokens are checked equal in the tests. Knows nothing of
sessions or networks; all torch work stays on the loop's thread.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import torch


class Logits(Protocol):
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] -> logits [B, T, V] float32 in CPU memory."""
        ...


class HeadBatcher:
    """Batches the LM-head rows of one client's concurrent generations (see module)."""

    def __init__(self, head: Logits, window_share: float = 0.5, max_window_s: float = 0.01) -> None:
        self.head = head
        self.active = 0  # generations decoding now (``_generate`` counts itself in and out)
        self._rows: list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]] = []
        self._flush: asyncio.Handle | None = None
        # rows wait for the other active generations' at most this share of a one-row head
        # call's time (a moving average), at most max_window_s; 0: only their loop turn
        self.window_share = window_share
        self.max_window_s = max_window_s
        self.solo_s = 0.0  # moving average of a one-row head call, s (0: none yet)
        self.batches = 0  # head calls made for more than one row (statistics)
        self.seconds = 0.0  # time spent in head calls, all generations (statistics), s

    def solo(self, row: torch.Tensor) -> torch.Tensor:
        """Logits [V] of ``row`` [1, 1, H] alone: ``Decoder.accept``'s own call."""
        t0 = time.perf_counter()
        try:
            return self.head.logits(row)[0, -1]
        finally:
            took = time.perf_counter() - t0
            self.seconds += took
            self.solo_s = took if not self.solo_s else 0.7 * self.solo_s + 0.3 * took

    async def logits(self, row: torch.Tensor) -> torch.Tensor:
        """Logits [V] of ``row`` [1, 1, H] (the last position of a step's output); with
        other generations active, computed with the rows the others bring meanwhile: at once
        when every active generation brought one, else after a window (``window_s``: the
        replies of a node's batch reach the client one after another, each checked before
        its row comes; waiting half a head call for a row saves a whole one)."""
        if self.active <= 1:
            return self.solo(row)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        self._rows.append((row, future))
        if len(self._rows) >= self.active:  # everyone is here: no reason to wait
            if self._flush is not None:
                self._flush.cancel()
            self._flush = loop.call_soon(self._run)
        elif self._flush is None:
            wait = self.window_s
            self._flush = loop.call_later(wait, self._run) if wait > 0 else \
                loop.call_soon(self._run)
        return await future

    @property
    def window_s(self) -> float:
        """How long a row waits for the other generations' rows, s."""
        return min(self.max_window_s, self.window_share * self.solo_s)

    def _run(self) -> None:
        rows, self._rows, self._flush = self._rows, [], None
        rows = [(row, f) for row, f in rows if not f.done()]  # a waiter cancelled: left out
        if not rows:
            return
        try:
            if len(rows) == 1:
                out = [self.solo(rows[0][0])]
            else:
                self.batches += 1
                t0 = time.perf_counter()
                try:
                    out = list(self.head.logits(torch.cat([row for row, _ in rows]))[:, -1])
                finally:
                    self.seconds += time.perf_counter() - t0
        except Exception as error:  # each waiter gets it: its generation fails, as it would alone
            for _, f in rows:
                f.set_exception(error)
            return
        for (_, f), logits in zip(rows, out):
            f.set_result(logits)

"""The LM head of one client's concurrent generations, computed for all of them at once.

A client decoding N streams at once (N tasks on one ``AsyncSwarm``) runs N LM heads per
round of tokens on its one event-loop thread. The head is the biggest matmul of a small
model (SmolLM2: 49,152 x 576, 113 MB in fp32) and memory bound, so one ``[N, 1, H]`` head
costs little more than one ``[1, 1, H]``. ``HeadBatcher.logits`` collects the rows of the
generations whose hidden states came back in the same turn of the event loop (a node that
batches decode steps answers them together) and runs the head once for them, at the end
of that turn.

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

    def __init__(self, head: Logits) -> None:
        self.head = head
        self.active = 0  # generations decoding now (``_generate`` counts itself in and out)
        self._rows: list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]] = []
        self._flush: asyncio.Handle | None = None
        self.batches = 0  # head calls made for more than one row (statistics)
        self.seconds = 0.0  # time spent in head calls, all generations (statistics), s

    def solo(self, row: torch.Tensor) -> torch.Tensor:
        """Logits [V] of ``row`` [1, 1, H] alone: ``Decoder.accept``'s own call."""
        t0 = time.perf_counter()
        try:
            return self.head.logits(row)[0, -1]
        finally:
            self.seconds += time.perf_counter() - t0

    async def logits(self, row: torch.Tensor) -> torch.Tensor:
        """Logits [V] of ``row`` [1, 1, H] (the last position of a step's output); with
        other generations active, computed at the end of this loop turn with the rows the
        others bring meanwhile."""
        if self.active <= 1:
            return self.solo(row)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        self._rows.append((row, future))
        if self._flush is None:
            self._flush = loop.call_soon(self._run)
        return await future

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

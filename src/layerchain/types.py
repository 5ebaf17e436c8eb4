"""The shared vocabulary: small frozen records that cross module boundaries.

Words mean the same everywhere: a *block* is one transformer decoder layer; a *span* is a
half-open range ``[start, end)`` of blocks; a *peer* is a node known by its ``peer_id``; a
*hop* is one peer serving a sub-range of its span within a *route* that covers ``[0, L)``;
a *session* is one generation's state on a hop; a *step* is one forward call of a session.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerchain.errors import SpanError


@dataclass(frozen=True, order=True)
class Span:
    """Blocks ``[start, end)`` of a model with ``num_blocks`` blocks."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise SpanError(
                f"span {self.start}:{self.end} is empty or negative",
                hint="give START:END with 0 <= START < END",
            )

    @property
    def length(self) -> int:
        return self.end - self.start

    def check_within(self, num_blocks: int) -> Span:
        """Return self, or raise SpanError if the span leaves ``[0, num_blocks)``."""
        if self.end > num_blocks:
            raise SpanError(
                f"span {self} is out of range: the model has {num_blocks} blocks",
                hint=f"give START:END with 0 <= START < END <= {num_blocks}",
            )
        return self

    def contains(self, other: Span) -> bool:
        return self.start <= other.start and other.end <= self.end

    @classmethod
    def parse(cls, text: str) -> Span:
        """Parse ``"A:B"``; raise SpanError on anything else."""
        parts = text.strip().split(":")
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise SpanError(f"cannot read span {text!r}", hint="write it as START:END, e.g. 0:10")
        return cls(int(parts[0]), int(parts[1]))

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


def even_spans(num_blocks: int, parts: int) -> list[Span]:
    """Split ``[0, num_blocks)`` into ``parts`` contiguous spans, sizes differing by at most 1."""
    if parts < 1 or parts > num_blocks:
        raise SpanError(f"cannot split {num_blocks} blocks into {parts} spans")
    base, extra = divmod(num_blocks, parts)
    spans, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        spans.append(Span(start, end))
        start = end
    return spans


@dataclass(frozen=True)
class Hop:
    """One peer computing blocks ``[start, end)`` of a route."""

    peer_id: str
    start: int
    end: int

    @property
    def span(self) -> Span:
        return Span(self.start, self.end)

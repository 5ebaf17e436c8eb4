"""Where a decode token's time goes, as the client sees it: its own compute, the nodes'.

Every decode step of a generation is split into the client's own compute (embedding, the
private blocks if any, LM head, sampling, stop checks), the wall time of the route (every
hop's Step, sent and answered) and, inside that, each hop's own compute as the node reported
it (``StepResult.compute_ms``: informative, never trusted for routing or payment). What is
left of the route's time is the wire: framing, TLS, the sockets, the event loops' turns and
the OS scheduler on both ends. ``token_ms`` is the whole token: from the step's start to the
next step's start, so it also holds what the consumer of the stream did in between (a
``Swarm.stream`` hands every token over to another thread and back).

Pure records and arithmetic: the decode loop (``client.swarm``) stamps, ``token_timings``
builds the records, ``layerchain.bench`` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenTiming:
    """One decode step of a generation (the first is the prompt's), times in ms."""

    token_ms: float  # this step's start to the next one's (the last: to its own end)
    client_ms: float  # the client's compute: embedding (+ private blocks), head, sampling
    route_ms: float  # wall time of the route: every hop's Step out and its result back
    node_ms: tuple[float, ...] = ()  # each hop call's compute_ms, as the nodes reported it

    @property
    def nodes_ms(self) -> float:
        """The nodes' compute on this step, all hops, ms."""
        return sum(self.node_ms)

    def wire_ms(self, hops: int) -> float:
        """What is neither the client's compute nor the nodes', per hop, ms."""
        return (self.token_ms - self.client_ms - self.nodes_ms) / max(1, hops)


@dataclass(frozen=True)
class StepStamp:
    """What the decode loop notes of one step: when it began (``time.perf_counter``, s),
    when it ended, its client compute and route wall time (s), the hops' compute_ms."""

    began: float
    ended: float
    client_s: float
    route_s: float
    node_ms: tuple[float, ...]


def token_timings(stamps: Sequence[StepStamp]) -> tuple[TokenTiming, ...]:
    """The records of ``stamps`` (in step order): a step's token time runs to the next
    step's start, the last one's to its own end."""
    out = []
    for i, s in enumerate(stamps):
        until = stamps[i + 1].began if i + 1 < len(stamps) else s.ended
        out.append(TokenTiming(
            token_ms=round(1000.0 * (until - s.began), 3),
            client_ms=round(1000.0 * s.client_s, 3),
            route_ms=round(1000.0 * s.route_s, 3),
            node_ms=s.node_ms,
        ))
    return tuple(out)

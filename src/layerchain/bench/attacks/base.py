"""What the hostile bench hands each attack, and what an attack hands back.

An attack is ``async def attack(stage: Stage) -> Outcome``: it runs against the local swarm
for a bounded time (about ``stage.duration_s``) while ``stage.honest`` generates through
``stage.client`` on another thread, and it judges itself only from what can be observed
from outside: replies on the wire, what the DHT holds, what the honest client saw and did.

``Outcome.observed`` says the attack reached its target (the forged record was read back,
the sockets were connected, the liar was asked for a session ...): an attack that did not
run proves nothing, so the bench reports it. ``Outcome.held`` says the defence held by the
attack's own criterion; the bench adds the honest side's (every honest answer exact, none
failed) to decide ``blocked``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from layerchain.client import Swarm
from layerchain.client.state import SwarmState
from layerchain.model import SamplingParams


@dataclass(frozen=True)
class NodeInfo:
    """One honest node of the local swarm, as ``swarm.json`` lists it."""

    name: str
    peer_id: str
    endpoint: str  # tcp://HOST:PORT
    pid: int
    start: int
    end: int
    wallet: str  # receipts are signed with it


RETRY_PAUSE_S = 0.5  # the honest load waits this long after a failed generation


@dataclass(frozen=True)
class Generation:
    """One honest generation during an attack."""

    tokens: int  # tokens delivered (a failed generation counts what it delivered)
    seconds: float  # wall time of the whole call, prefill and failovers included
    exact: bool  # the tokens are the reference's (False for a failed one)
    route: tuple[str, ...]  # peer ids of the route at the end
    error: str  # "" if it completed


class HonestLoad:
    """Generates the same greedy prompt back to back through one client, on the calling
    thread, and keeps each ``Generation``; attacks read ``generations`` (append-only)."""

    def __init__(self, client: Swarm, prompt: str, params: SamplingParams, reference: list[int]) -> None:
        self.client = client
        self.prompt = prompt
        self.params = params
        self.reference = reference
        self.generations: list[Generation] = []

    def generate_once(self) -> Generation:
        stream = self.client.stream(self.prompt, self.params)
        tokens, error = 0, ""
        t0 = time.perf_counter()
        try:
            for _ in stream:
                tokens += 1
        except Exception as exc:  # noqa: BLE001 - a failed honest generation is a measurement
            error = f"{type(exc).__name__}: {exc}"[:300]
        seconds = time.perf_counter() - t0
        res = stream.result if stream.done else None
        route = tuple(h.peer_id for h in res.route) if res is not None else ()
        exact = not error and res is not None and list(res.token_ids) == self.reference
        generation = Generation(tokens, seconds, exact, route, error)
        self.generations.append(generation)
        return generation

    def run_while(self, busy: Callable[[], bool], at_least: int = 1) -> None:
        """Generate while ``busy()`` (and at least ``at_least`` times); after a failed
        generation wait ``RETRY_PAUSE_S`` first, as a user would (not counted as its time)."""
        while busy() or len(self.generations) < at_least:
            if self.generate_once().error:
                time.sleep(RETRY_PAUSE_S)

    def tokens_per_s(self) -> float:
        seconds = sum(g.seconds for g in self.generations)
        return sum(g.tokens for g in self.generations) / seconds if seconds else 0.0

    def errors(self) -> list[str]:
        return [g.error for g in self.generations if g.error]

    def all_exact(self) -> bool:
        return bool(self.generations) and all(g.exact for g in self.generations)

    def routes_since(self, index: int) -> list[tuple[str, ...]]:
        return [g.route for g in self.generations[index:]]


@dataclass(frozen=True)
class Stage:
    """The swarm under attack and the honest side, as one attack sees them."""

    initial_peers: tuple[str, ...]  # DHT multiaddrs of the local swarm
    model_id: str
    num_blocks: int
    hidden_size: int
    target: NodeInfo  # serves 0:15; attacked directly by the node-level attacks
    spare: NodeInfo  # also serves 0:15, so the honest client has somewhere to go
    tail: NodeInfo  # serves 15:30
    client: Swarm  # the honest client; ``honest`` generates through it meanwhile
    honest: HonestLoad
    duration_s: float  # how long a timed attack runs, seconds
    max_cache_tokens: int  # every node's KV-cache budget, tokens
    long_prompt: str  # an honest prompt of ``long_prompt_tokens`` tokens
    long_prompt_tokens: int
    long_reference: tuple[int, ...]  # its greedy tokens in one process
    long_params: SamplingParams

    @property
    def honest_nodes(self) -> tuple[NodeInfo, ...]:
        return (self.target, self.spare, self.tail)

    @property
    def honest_ids(self) -> frozenset[str]:
        return frozenset(n.peer_id for n in self.honest_nodes)


@dataclass(frozen=True)
class Outcome:
    """What an attack saw: whether it ran, whether the defence held, and the figures."""

    observed: bool  # the attack reached its target (see details)
    held: bool  # the defence held, by the attack's own observable criterion
    details: dict[str, object] = field(default_factory=dict)  # JSON-able figures


Attack = Callable[[Stage], Awaitable[Outcome]]


def client_view(client: Swarm) -> SwarmState:
    """The honest client's view of the swarm now (``AsyncSwarm.state``), read from another
    thread: retried if the client's loop changed its peers mid-read."""
    for _ in range(20):
        try:
            return client.core.state()
        except RuntimeError:  # dictionary changed size during iteration
            time.sleep(0.01)
    return client.core.state()


def banned_now(client: Swarm) -> set[str]:
    """Peer ids the client leaves out of routes for a failure at this moment."""
    return {n.peer_id for n in client_view(client).nodes if n.banned}


def known_peers(client: Swarm) -> set[str]:
    """Peer ids whose records the client holds now."""
    return {n.peer_id for n in client_view(client).nodes}


async def after_generations(stage: Stage, count: int, timeout_s: float = 90.0) -> int:
    """Wait until the honest load has completed ``count`` more generations than now (so at
    least ``count - 1`` of them started, and re-read the swarm's records, after this call),
    or ``timeout_s``; return how many completed meanwhile."""
    start = len(stage.honest.generations)
    deadline = time.monotonic() + timeout_s
    while len(stage.honest.generations) < start + count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return len(stage.honest.generations) - start


class Stopwatch:
    """``remaining()`` seconds of a window that started when it was made."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def __bool__(self) -> bool:
        return self.remaining() > 0


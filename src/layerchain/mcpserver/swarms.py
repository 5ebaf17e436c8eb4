"""The MCP server's swarm clients: one ``AsyncSwarm`` per model, opened on first use, and
the inference calls run through them.

``SwarmPool.get(model)`` returns the client of ``model`` (a reference such as "smollm2", or
a name or model id of a model already open), opening it through the pool's factory the
first time (joining the DHT and loading the model's head take seconds: ``warm()`` starts
the default model's at server start, so the first call does not wait for it). A client
that failed to open is not kept: the next call tries again (the swarm may have come up
since). At most ``max_models`` clients are open; past that a new model is refused, not
swapped in under a running generation.

``generate(pool, request, log)`` runs one ``InferenceRequest`` through the real client
(the same decode loop as ``Swarm.generate``; greedy unless a temperature is given) and
records its figures in a ``PerformanceLog`` for ``llm://performance``. The log keeps no
prompt nor answer text.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from layerchain.client import AsyncSwarm, GenerationResult
from layerchain.errors import ConfigError, LayerchainError
from layerchain.mcpserver.requests import InferenceRequest

log = logging.getLogger(__name__)

SwarmFactory = Callable[[str], Awaitable[AsyncSwarm]]  # model reference -> a joined client
REFRESH_TIMEOUT_S = 5.0  # a resource read waits this long for the DHT, then shows what it has


def model_names(reference: str, swarm: AsyncSwarm) -> set[str]:
    """The names a call may give for the model ``swarm`` runs (lower case): the reference
    it was opened with, its name and its model id."""
    return {n.lower() for n in (reference, swarm.spec.name, swarm.spec.model_id) if n}


class SwarmPool:
    """Open swarm clients by model reference (see the module's docstring)."""

    def __init__(self, factory: SwarmFactory, default_model: str, max_models: int = 4) -> None:
        self.factory = factory
        self.default_model = default_model
        self.max_models = max_models
        self._opening: dict[str, asyncio.Task[AsyncSwarm]] = {}  # reference -> its opening

    def warm(self) -> None:
        """Start opening the default model's client in the background (errors are logged
        and retried by the first call that needs it)."""
        task = self._open(self.default_model)
        task.add_done_callback(_log_failure)

    async def get(self, model: str | None = None) -> AsyncSwarm:
        """The client of ``model`` (None: the default), opened if needed; the factory's
        error (UnknownModel, a DHT that cannot be joined) as is."""
        reference = self.find(model or self.default_model) or model or self.default_model
        return await asyncio.shield(self._open(reference))

    def find(self, name: str) -> str | None:
        """The reference of an open (or opening) client whose model ``name`` names."""
        wanted = name.lower()
        for reference, task in self._opening.items():
            if reference.lower() == wanted:
                return reference
            if task.done() and not task.cancelled() and task.exception() is None \
                    and wanted in model_names(reference, task.result()):
                return reference
        return None

    def _open(self, reference: str) -> asyncio.Task[AsyncSwarm]:
        task = self._opening.get(reference)
        if task is not None and task.done() and (task.cancelled() or task.exception()):
            del self._opening[reference]  # failed: try again
            task = None
        if task is None:
            if len(self._opening) >= self.max_models:
                raise ConfigError(
                    f"this MCP server already has {len(self._opening)} models open, its limit",
                    hint="use one of the models llm://models lists",
                )
            task = asyncio.ensure_future(self.factory(reference))
            self._opening[reference] = task
        return task

    def open_swarms(self) -> list[tuple[str, AsyncSwarm]]:
        """(reference, client) of every client open now."""
        return [(ref, t.result()) for ref, t in self._opening.items()
                if t.done() and not t.cancelled() and t.exception() is None]

    async def close(self) -> None:
        tasks, self._opening = list(self._opening.values()), {}
        for task in tasks:
            if not task.done():
                task.cancel()
            try:
                swarm = await task
            except BaseException:  # noqa: BLE001 - a failed or cancelled opening holds nothing
                continue
            try:
                await swarm.close()
            except Exception as error:  # noqa: BLE001 - close the others anyway
                log.warning("could not close the swarm client of %s: %s", swarm.spec.name, error)


def _log_failure(task: asyncio.Task[AsyncSwarm]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not join the swarm yet (a tool call will try again): %s",
                    task.exception())


async def refresh(swarm: AsyncSwarm) -> None:
    """Re-read the swarm's records when stale; a slow or failing DHT keeps the old ones."""
    try:
        await asyncio.wait_for(swarm.refresh(), REFRESH_TIMEOUT_S)
    except (LayerchainError, OSError, asyncio.TimeoutError) as error:
        log.warning("could not refresh the swarm's records: %s", error)


def excluded_peers(swarm: AsyncSwarm, nodes: tuple[str, ...]) -> frozenset[str]:
    """The peers a route must leave out so that it uses only ``nodes`` (peer ids or
    endpoints of peers serving the model); ConfigError naming a node the swarm does not
    know."""
    if not nodes:
        return frozenset()
    known = swarm.state().nodes
    allowed: set[str] = set()
    for name in nodes:
        match = {n.peer_id for n in known if name in (n.peer_id, n.endpoint)}
        if not match:
            raise ConfigError(f"node {name!r} does not serve {swarm.spec.name} on this swarm",
                              hint="llm://nodes lists the peers by peer_id")
        allowed |= match
    return frozenset(n.peer_id for n in known) - allowed


@dataclass(frozen=True)
class RequestStats:
    """One inference call as ``llm://performance`` shows it (no prompt, no answer)."""

    at: float  # unix time the call ended, s
    model: str
    ok: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_per_s: float = 0.0  # decode tokens per second
    ttft_s: float = 0.0  # time to the first token, s
    duration_s: float = 0.0  # the whole call, s
    hops: int = 0  # peers in the route at the end
    recoveries: int = 0  # failovers during the call
    finish_reason: str = ""
    error: str = ""  # the error's one line, when not ok


class PerformanceLog:
    """The last ``size`` inference calls, newest first."""

    def __init__(self, size: int = 100) -> None:
        self._calls: deque[RequestStats] = deque(maxlen=size)

    def add(self, stats: RequestStats) -> None:
        self._calls.appendleft(stats)

    def to_json(self) -> dict[str, Any]:
        calls = list(self._calls)
        ok = [c for c in calls if c.ok]
        summary: dict[str, Any] = {"requests": len(calls), "errors": len(calls) - len(ok)}
        for name in ("tokens_per_s", "ttft_s", "duration_s"):
            values = [getattr(c, name) for c in ok]
            summary[f"median_{name}"] = round(statistics.median(values), 3) if values else None
        return {"summary": summary, "requests": [asdict(c) for c in calls]}


def result_json(result: GenerationResult, model: str, elapsed_s: float) -> dict[str, Any]:
    """A finished generation as the tool returns it."""
    return {
        "text": result.text,
        "model": model,
        "parallelism": "pipeline",
        "route": [{"peer_id": h.peer_id, "start": h.start, "end": h.end} for h in result.route],
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason,
        "tokens_per_s": round(result.tokens_per_s, 3),
        "ttft_s": round(result.ttft_s, 3),
        "duration_s": round(elapsed_s, 3),
        "cost": result.cost,
        "recoveries": len(result.recoveries),
    }


TokenCallback = Callable[[int, str], Awaitable[None]]  # (tokens so far, the new token's text)


async def generate(pool: SwarmPool, request: InferenceRequest, performance: PerformanceLog,
                   on_token: TokenCallback | None = None) -> dict[str, Any]:
    """Run ``request`` through its model's client (``generate_stream``: the decode loop of
    ``Swarm.generate``), calling ``on_token`` as each token comes; its figures go to
    ``performance``."""
    t0 = time.perf_counter()
    model = request.model or pool.default_model
    try:
        swarm = await pool.get(request.model)
        model = swarm.spec.name
        exclude: frozenset[str] = frozenset()
        if request.nodes:
            await refresh(swarm)
            exclude = excluded_peers(swarm, request.nodes)
        gen = swarm.generate_stream(request.prompt, request.params, raw=request.raw,
                                    exclude=exclude)
        async with gen:
            async for event in gen:
                if on_token is not None:
                    await on_token(event.index + 1, event.text)
        result = gen.result
    except LayerchainError as error:
        performance.add(RequestStats(at=time.time(), model=model, ok=False, error=str(error),
                                     duration_s=round(time.perf_counter() - t0, 3)))
        raise
    elapsed = time.perf_counter() - t0
    performance.add(RequestStats(
        at=time.time(), model=model, ok=True, prompt_tokens=result.prompt_tokens,
        completion_tokens=len(result.token_ids), tokens_per_s=round(result.tokens_per_s, 3),
        ttft_s=round(result.ttft_s, 3), duration_s=round(elapsed, 3), hops=len(result.route),
        recoveries=len(result.recoveries), finish_reason=result.finish_reason,
    ))
    return result_json(result, model, elapsed)

"""Route views: one swarm client, many sets of routing limits.

A request may carry its own ``alpha``, ``max_price`` and ``max_latency_ms``. The planner
reads them from the client's ``PeerView`` config, so each distinct set of limits gets a
*view*: a shallow copy of the gateway's ``AsyncSwarm`` that shares its head, tokenizer,
discovery, transport and payer (so payments go through the same channels), with its own
``ClientConfig`` and ``PeerView`` (connections, RTTs, bans). Up to ``max_views`` views stay
open; past that a view lives for one request. Requests without limits use the client itself.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import AsyncIterator
from dataclasses import replace

from layerchain.client import AsyncSwarm
from layerchain.client.peers import PeerView
from layerchain.gateway.schema import RouteLimits


class RouteViews:
    """The client for each distinct set of routing limits (see the module docstring)."""

    def __init__(self, base: AsyncSwarm, max_views: int) -> None:
        self.base = base
        self.max_views = max_views
        self._views: dict[tuple, AsyncSwarm] = {}

    def _key(self, limits: RouteLimits) -> tuple:
        c = self.base.config
        return (
            c.alpha if limits.alpha is None else limits.alpha,
            c.max_price if limits.max_price is None else limits.max_price,
            c.max_latency_ms if limits.max_latency_ms is None else limits.max_latency_ms,
        )

    def _derive(self, key: tuple) -> AsyncSwarm:
        base = self.base
        view = copy.copy(base)  # same head, tokenizer, discovery, transport, payer
        view.config = replace(base.config, alpha=key[0], max_price=key[1], max_latency_ms=key[2])
        view.peers = PeerView(base.discovery, base.transport, base.spec.model_id,
                              base.spec.num_blocks, view.config)
        view.last_route = ()
        return view

    @contextlib.asynccontextmanager
    async def use(self, limits: RouteLimits) -> AsyncIterator[AsyncSwarm]:
        key = self._key(limits)
        c = self.base.config
        if key == (c.alpha, c.max_price, c.max_latency_ms):
            yield self.base
            return
        view = self._views.get(key)
        transient = view is None and len(self._views) >= self.max_views
        if view is None:
            view = self._derive(key)
            if not transient:
                self._views[key] = view
        try:
            yield view
        finally:
            if transient:  # too many distinct limits: this one's connections go with it
                await view.peers.close()

    async def close(self) -> None:
        for view in self._views.values():
            await view.peers.close()
        self._views.clear()

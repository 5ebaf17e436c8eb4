"""Configuration of a client: one frozen record; the CLI's flags and defaults come from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientConfig:
    alpha: float = 0.0  # route cost weight: 0 = fastest, 1 = cheapest (paper eq. 1)
    max_price: float | None = None  # most a route may cost per token, ledger units
    max_latency_ms: float | None = None  # most a route may take per token, ms
    step_timeout_s: float = 10.0  # a hop that takes longer for one step is failed
    connect_timeout_s: float = 5.0  # a peer that does not accept within this is failed
    ping_timeout_s: float = 2.0  # RTT probes give up after this many seconds
    ban_base_s: float = 15.0  # first ban of a failed peer, seconds; doubles per failure
    ban_max_s: float = 600.0  # longest ban, seconds
    max_recoveries: int = 16  # failovers allowed in one generation before giving up
    refresh_s: float = 10.0  # re-read the swarm's records after this many seconds (at once
    # whenever the unbanned peers leave a block uncovered, and at every generation's start)
    discovery_wait_s: float = 30.0  # how long to wait for peers covering every block
    rtt_smoothing: float = 0.3  # weight of a new RTT sample in the moving average


@dataclass(frozen=True)
class RouteLimits:
    """One generation's routing limits; a None field keeps the client's ``ClientConfig``
    value. Peers, RTTs and bans stay shared between generations with different limits."""

    alpha: float | None = None  # route cost weight, 0 fastest .. 1 cheapest
    max_price: float | None = None  # credits per token
    max_latency_ms: float | None = None  # ms per token

    def resolve(self, config: ClientConfig) -> tuple[float, float | None, float | None]:
        """(alpha, max_price, max_latency_ms) with the client's values filled in."""
        return (
            config.alpha if self.alpha is None else self.alpha,
            config.max_price if self.max_price is None else self.max_price,
            config.max_latency_ms if self.max_latency_ms is None else self.max_latency_ms,
        )

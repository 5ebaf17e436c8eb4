"""Configuration of a client: one frozen record; the CLI's flags and defaults come from it."""

from __future__ import annotations

from dataclasses import dataclass

from layerchain.errors import ConfigError
from layerchain.model.device import check_device_name
from layerchain.model.dtypes import check_dtype
from layerchain.routing import RouteLimits  # the routing limits' one home; re-exported here


# what --wire and ClientConfig.wire accept: wire.compress.WIRE_FORMS, fp32 named (it is ""
# on the wire); kept here, without torch, so the CLI checks it before loading anything
WIRE_NAMES = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class ClientConfig:
    limits: RouteLimits = RouteLimits()  # default routing limits: alpha (0 fastest .. 1
    # cheapest), max_price (credits per token), max_latency_ms (ms per token); a generation
    # may pass its own
    max_cost: int | None = None  # most one generation may pay in all, credits (None: no cap);
    # a generation stops (finish_reason "max_cost") before a step that would pay more
    step_timeout_s: float = 10.0  # a hop may take this long for a one-token step, seconds
    step_timeout_slack: float = 3.0  # and this many times the work its announced speed
    # implies (tokens x blocks x ms_per_block) on top, for long steps (prefill, replay)
    step_timeout_max_s: float = 120.0  # the longest any one step may take, seconds
    connect_timeout_s: float = 5.0  # a peer that does not accept within this is failed
    insecure: bool = False  # also dial peers announcing plaintext tcp:// (a trusted network);
    # by default only tls:// peers that prove the peer id of their record are dialled
    ping_timeout_s: float = 2.0  # RTT probes give up after this many seconds
    ban_base_s: float = 15.0  # first ban of a failed peer, seconds; doubles per failure
    ban_max_s: float = 600.0  # longest ban, seconds
    busy_avoid_s: float = 5.0  # a peer that answered "busy" is left out of routes this long
    max_recoveries: int = 16  # failovers allowed in one generation before giving up
    refresh_s: float = 10.0  # re-read the swarm's records after this many seconds (at once
    # whenever the unbanned peers leave a block uncovered, and at every generation's start)
    discovery_wait_s: float = 30.0  # how long to wait for peers covering every block
    rtt_smoothing: float = 0.3  # weight of a new RTT sample in the moving average
    speed_smoothing: float = 0.3  # weight of a new step in a peer's measured ms per block
    speed_samples: int = 2  # one-token steps measured before routes use the measured speed
    # of a peer instead of the ms_per_block it announces
    speed_memory_s: float = 600.0  # a peer's measured speed is forgotten after this long
    # without a new step (its claim counts again: a slow spell is not a life sentence)
    route_jitter: float = 0.02  # each peer's latency terms are scaled by this client's own
    # fixed factor in [1, 1 + route_jitter), so clients starting together spread over
    # peers within 2% of each other (routing.load); 0: plan on the numbers as they are
    max_price_multiple: float | None = 4.0  # with no max_price, a route may cost at most
    # this many times the swarm's median price per block (None: no default cap)
    max_peers: int = 2048  # peer records kept at most; past it, known peers stay first
    max_connections: int = 64  # open connections at most (least recently used idle first)
    max_pings: int = 64  # new peers pinged per refresh at most (the rest on later refreshes)
    deposit_margin: float = 2.0  # a channel opened for a request holds this many times the
    # most that request can pay the peer (price x blocks x (prompt + max_new_tokens))
    device: str = "cpu"  # where the head (and any private blocks) compute: cpu, cuda[:N],
    # mps or auto (model.device); hidden states still cross the wire from CPU memory
    dtype: str = "fp32"  # form the head's tables (and private blocks) are held in
    # (model.quant.DTYPES); fp32 is the exactness reference
    push: bool | None = None  # push mode (client.push): each hop forwards its output to the
    # next, N+1 transfers per token instead of 2N; None: when the planner's push latency
    # (with the RTTs peers announce) beats pull's; True/False: always/never
    push_min_gain_ms: float = 10.0  # auto pushes only when that saves at least this many ms
    # per token: below it, a LAN's measuring noise would decide, not the network
    private_blocks: int = 0  # the client runs blocks [0, private_blocks) itself and routes
    # only the rest, so no peer sees the embedding rows (which name the token ids); 0: none
    audit_rate: float = 1 / 16  # chance a hop is audited after a decode step, 0..1 (0: no
    # audits; tokens are then shown as computed and peers paid in advance). 1/16 catches a
    # node that always cheats within 64 tokens in 98% of runs (1 - (15/16)^63); an audit
    # checks every step since the last, and one also starts once a hop holds 32 unverified
    # tokens (client/audit.py). With audits, tokens are shown once verified.

    wire: str = "fp32"  # form hidden states cross the wire in, both ways (wire.compress):
    # fp32 (exact, 4 bytes a value), fp16 / bf16 (2), int8 (8-bit blockwise, ~1.1; greedy
    # agreement with fp32 in docs/BENCHMARKS.md "Activation compression")

    @property
    def wire_form(self) -> str:
        """``wire`` as ``OpenSession.wire`` names it ("fp32" is "")."""
        return "" if self.wire == "fp32" else self.wire

    def __post_init__(self) -> None:
        if not 0.0 <= self.route_jitter <= 1.0:  # NaN fails too
            raise ConfigError(f"route_jitter must be in [0, 1], got {self.route_jitter!r}")
        check_device_name(self.device)
        check_dtype(self.dtype)
        if self.wire not in WIRE_NAMES:
            raise ConfigError(
                f"unknown wire form {self.wire!r}", hint=f"use one of {', '.join(WIRE_NAMES)}"
            )
        if not 0.0 <= self.audit_rate <= 1.0:  # NaN fails too
            raise ConfigError(
                f"audit_rate must be a fraction between 0 and 1, got {self.audit_rate!r}",
                hint="pass --audit-rate 0 to turn audits off, 1 to audit after every step",
            )


__all__ = ["WIRE_NAMES", "ClientConfig", "RouteLimits"]

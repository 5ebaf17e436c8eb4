"""Configuration of a node: one frozen record; the CLI's flags and defaults come from it.

``NodeConfig(...)`` checks every field when it is built (``ConfigError``, one line naming
the field), so Python users get the same checks as ``layerchain node start``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from layerchain.discovery.addresses import check_announce_host
from layerchain.errors import ConfigError
from layerchain.model.device import check_device_name
from layerchain.model.dtypes import DTYPES
from layerchain.model.spec import DEFAULT_MODEL

MAX_PORT = 65535
REACHABILITY_MODES = ("auto", "public", "private")  # NodeConfig.reachability
PRICING = ("fixed", "adaptive")  # NodeConfig.pricing: market.pricing.POLICIES (not imported:
# market's package imports the wallet's eth libraries, which the CLI's start-up must not)
_HOST_PORT = re.compile(r"([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([1-9][0-9]{0,4})")


@dataclass(frozen=True)
class NodeConfig:
    model: str = DEFAULT_MODEL  # model reference: a name, a GGUF path, a HF dir or a shard dir
    start: int = 0  # first block served
    end: int = 0  # one past the last block served (0 = to the model's end)
    host: str = "127.0.0.1"  # address the inference server and the DHT listen on
    port: int = 0  # TCP port of the inference server; 0 picks a free one
    insecure: bool = False  # serve plaintext tcp:// instead of TLS (tls://, the node's identity
    # key proving its peer id): only on a network you trust; clients need --insecure too
    dht_port: int = 0  # TCP port of the DHT; 0 picks a free one
    announce_host: str = ""  # the address other machines dial this node at (a port-forwarded
    # router, a container's published address); "": found from the interfaces (--host 0.0.0.0)
    announce_port: int = 0  # the port others dial, if a router forwards another one; 0: the
    # listener's own (the inference server's; the DHT's stays its own)
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs to join through
    new_swarm: bool = False  # start a new DHT instead of joining one
    data_dir: Path = field(default_factory=lambda: Path.home() / ".layerchain" / "node")
    max_cache_tokens: int = 32_768  # KV-cache budget: sum of max_length over open sessions
    max_session_tokens: int = 0  # max_length one session may reserve; 0: a quarter of
    # max_cache_tokens. Announced: free_cache_tokens never exceeds it
    max_connection_tokens: int = 0  # cache tokens the sessions of one client connection may
    # reserve together; 0: half of max_cache_tokens
    max_sessions: int = 1_024  # sessions open at once, whatever their size
    session_idle_timeout_s: float = 300.0  # a session without steps for this long is closed
    first_step_timeout_s: float = 30.0  # a session that runs no step this long after it
    # opened is closed: a reservation nobody uses frees its cache tokens
    max_connections: int = 256  # client connections held at once; at the cap a new one
    # replaces the least recently active (one holding no session if there is one)
    read_timeout_s: float = 30.0  # a frame not complete this long after its first byte, or a
    # reply the client does not read for this long, closes its connection
    drain_s: float = 5.0  # on SIGTERM, open sessions may finish for up to this many seconds
    price_per_block: int = 0  # ledger units per block per token processed
    ledger: str = ""  # ledger spec (a file or evm+http://HOST:PORT[?contract=0x...],
    # layerchain.ledger.open); with one and a price, steps must be paid by voucher
    payout: str = ""  # EVM ledger only: address credited with this node's redeemed vouchers
    # and uptime rewards (the owner's wallet; set on the contract once at start); "": itself
    redeem_interval_s: float = 30.0  # redeem vouchers and claim uptime this often, seconds
    stake: int = 0  # credits staked on the ledger for uptime rewards (0: none)
    emulate_latency_ms: float = 0.0  # testing aid: delay every reply by this many ms
    record_ttl_s: float = 60.0  # DHT records expire after this many seconds
    refresh_s: float = 15.0  # re-announce the DHT records this often, seconds
    threads: int = 0  # torch threads; 0 keeps torch's default
    dtype: str = "fp32"  # form the span's weights are held and computed in (model.quant.DTYPES):
    # fp32 (the exactness reference), bf16, fp16, int8, int4, or auto (fastest that agrees)
    device: str = "cpu"  # where the span and its KV caches compute: cpu, cuda[:N], mps or
    # auto (model.device); checked against the machine when the span loads
    misbehave: str = ""  # testing defences only: cheat in this mode (node.misbehave.MODES);
    # "": honest
    reachability: str = "auto"  # "auto": ask up to 3 peers to dial back, serve through a relay
    # if none can; "public": take it as reachable; "private": serve through a relay at once
    relay_via: str = ""  # HOST:PORT of the relay service to use when private; "": pick one
    # of the peers whose records offer relaying
    relay: bool = False  # relay connections to peers behind NAT (this node must be reachable)
    relay_port: int = 0  # TCP port of the relay service; 0 picks a free one
    relay_max_connections: int = 64  # relayed client<->peer pairs at once
    relay_max_mbps: float = 100.0  # megabits per second in each direction of one relayed pair
    seed: bool = True  # serve the files of this node's span (and the head and tokenizer, when
    # it has them) to peers fetching the model (node.seeding); False: --no-seed
    seed_max_mbps: float = 800.0  # megabits per second sent to all fetchers together
    seed_connection_mbps: float = 400.0  # megabits per second one fetching connection gets
    seed_misbehave: str = ""  # testing defences only: "corrupt" flips a byte of every piece
    # the market (node.rebalance; seed 002 §3.3-3.4)
    pricing: str = "fixed"  # "fixed": price_per_block always; "adaptive": start there and
    # re-price every reprice_every_s by gradient ascent on expected revenue (market.pricing)
    min_price: int = 1  # adaptive pricing's lowest price, credits per block per token (>= 1)
    max_price: int = 1_000_000  # adaptive pricing's highest price, credits per block per token
    reprice_every_s: float = 30.0  # adaptive pricing re-prices this often, seconds
    auto_span: bool = False  # pick the span (market.placement.choose_span over the DHT's
    # records) instead of serving start:end (which must then be 0:0)
    max_blocks: int = 0  # blocks an automatic or moving span holds at most; 0: as many as fit
    # memory_gb (automatic), or the span's length (--blocks given)
    memory_gb: float = 0.0  # GiB of weights an automatic span may hold; 0: half the memory
    # available at start
    rebalance_every_s: float = 0.0  # check this often whether moving pays (plan_move) and
    # move (hot-swap, draining the old span's sessions for drain_s); 0: never
    rebalance_threshold: float = 0.2  # move only for a share of compute this much larger
    batch_window_ms: float = 20.0  # longest a decode step waits for other sessions' steps
    # to run with them as one forward (node.batching); 0: every step runs alone
    emulate_ms_per_block: float = 0.0  # testing aid: announce at least this compute cost, ms
    # per block per token, as a slower machine would (pricing and placement read it)

    def __post_init__(self) -> None:
        positive = ("max_cache_tokens", "max_sessions", "max_connections", "read_timeout_s",
                    "session_idle_timeout_s", "first_step_timeout_s", "redeem_interval_s",
                    "record_ttl_s", "refresh_s")
        not_negative = ("start", "end", "port", "dht_port", "announce_port", "max_session_tokens", "max_connection_tokens",
                        "drain_s", "price_per_block", "stake", "emulate_latency_ms", "threads",
                        "batch_window_ms")
        for name in (*positive, *not_negative):
            value = getattr(self, name)
            _check(name, value, type(value) in (int, float), "must be a number")
        for name in positive:
            _check(name, getattr(self, name), getattr(self, name) > 0, "must be positive")
        for name in not_negative:
            _check(name, getattr(self, name), getattr(self, name) >= 0, "must not be negative")
        _check("end", self.end, self.end == 0 or self.end > self.start,
               f"must be 0 (the model's end) or above start {self.start}")
        for name in ("port", "dht_port", "announce_port"):
            _check(name, getattr(self, name), getattr(self, name) <= MAX_PORT,
                   f"must be in 0..{MAX_PORT}")
        for name in ("max_session_tokens", "max_connection_tokens"):
            _check(name, getattr(self, name), getattr(self, name) <= self.max_cache_tokens,
                   f"must not exceed max_cache_tokens {self.max_cache_tokens}")
        _check("max_connection_tokens", self.max_connection_tokens,
               self.max_connection_tokens == 0 or self.max_connection_tokens >= self.session_tokens,
               f"must be 0 or at least what one session may reserve ({self.session_tokens})")
        _check("refresh_s", self.refresh_s, self.refresh_s < self.record_ttl_s,
               f"must be below record_ttl_s {self.record_ttl_s:g}, or records lapse between"
               " announcements")
        if not self.host:
            raise ConfigError("host must not be empty")
        check_announce_host(self.announce_host)
        if self.misbehave:  # testing only: the cheats' module (torch) loads only for one
            from layerchain.node.misbehave import check_mode

            check_mode(self.misbehave)
        check_device_name(self.device)
        _check("dtype", self.dtype, self.dtype in DTYPES, f"must be one of {', '.join(DTYPES)}")
        _check("reachability", self.reachability, self.reachability in REACHABILITY_MODES,
               f"must be one of {', '.join(REACHABILITY_MODES)}")
        _check("relay_port", self.relay_port, type(self.relay_port) is int
               and 0 <= self.relay_port <= MAX_PORT, f"must be in 0..{MAX_PORT}")
        _check("relay_max_connections", self.relay_max_connections,
               type(self.relay_max_connections) is int and self.relay_max_connections > 0,
               "must be a positive integer")
        _check("relay_max_mbps", self.relay_max_mbps, type(self.relay_max_mbps) in (int, float)
               and self.relay_max_mbps > 0, "must be positive")
        _check("relay_via", self.relay_via, not self.relay_via
               or _HOST_PORT.fullmatch(self.relay_via) is not None, "must be HOST:PORT")
        _check("relay", self.relay, not (self.relay and self.reachability == "private"),
               "needs a reachable node, not --reachability private")
        for name in ("seed_max_mbps", "seed_connection_mbps"):
            value = getattr(self, name)
            _check(name, value, type(value) in (int, float) and value > 0, "must be positive")
        _check("seed_misbehave", self.seed_misbehave, self.seed_misbehave in ("", "corrupt"),
               "must be '' or 'corrupt' (testing only)")
        _check_ledger(self.ledger, self.payout)
        self._check_market()

    def _check_market(self) -> None:
        _check("pricing", self.pricing, self.pricing in PRICING,
               f"must be one of {', '.join(PRICING)}")
        for name in ("min_price", "max_price", "max_blocks"):
            value = getattr(self, name)
            _check(name, value, type(value) is int and value >= 0, "must be an integer >= 0")
        for name in ("reprice_every_s", "memory_gb", "rebalance_every_s", "rebalance_threshold",
                     "emulate_ms_per_block"):
            value = getattr(self, name)
            _check(name, value, type(value) in (int, float) and value >= 0,
                   "must be a number >= 0")
        _check("reprice_every_s", self.reprice_every_s, self.reprice_every_s > 0, "must be positive")
        if self.pricing == "adaptive":
            _check("min_price", self.min_price, self.min_price >= 1,
                   "must be at least 1 with adaptive pricing")
            _check("max_price", self.max_price, self.min_price <= self.max_price <= 10**9,
                   f"must be in min_price ({self.min_price})..1000000000")
        _check("auto_span", self.auto_span, not (self.auto_span and (self.start or self.end)),
               "picks the span itself: give blocks (start, end) or auto_span, not both")

    @property
    def session_tokens(self) -> int:
        """Cache tokens one session may reserve (``max_session_tokens`` resolved)."""
        return self.max_session_tokens or max(1, self.max_cache_tokens // 4)

    @property
    def connection_tokens(self) -> int:
        """Cache tokens one connection's sessions may reserve (``max_connection_tokens``
        resolved; never below what one session may)."""
        return self.max_connection_tokens or max(self.max_cache_tokens // 2, self.session_tokens)


def _check_ledger(ledger: str, payout: str) -> None:
    """A ledger spec that parses, and a payout only with an EVM ledger (ConfigError)."""
    from layerchain.errors import LedgerError
    from layerchain.ledger.open import parse_ledger_spec

    try:
        spec = parse_ledger_spec(ledger) if ledger else None
    except LedgerError as error:
        raise ConfigError(f"node setting ledger: {error}") from None
    if not payout:
        return
    _check("payout", payout, re.fullmatch(r"0x[0-9a-fA-F]{40}", payout) is not None,
           "must be an address (0x followed by 40 hex digits)")
    _check("payout", payout, spec is not None and spec.is_evm,
           "only applies on an EVM ledger (--ledger evm+http://...): on a ledger file the "
           "node's own wallet is paid")


def _check(name: str, value: object, ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigError(f"node setting {name} {rule}, got {value!r}")

"""Configuration of a node: one frozen record; the CLI's flags and defaults come from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class NodeConfig:
    model: str = "smollm2"  # model reference: a name, a GGUF path, a HF dir or a shard dir
    start: int = 0  # first block served
    end: int = 0  # one past the last block served (0 = to the model's end)
    host: str = "127.0.0.1"  # address the inference server and the DHT listen on
    port: int = 0  # TCP port of the inference server; 0 picks a free one
    dht_port: int = 0  # TCP port of the DHT; 0 picks a free one
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs to join through
    new_swarm: bool = False  # start a new DHT instead of joining one
    data_dir: Path = field(default_factory=lambda: Path.home() / ".layerchain" / "node")
    max_cache_tokens: int = 32_768  # KV-cache budget: sum of max_length over open sessions
    max_sessions: int = 1_024  # sessions open at once, whatever their size
    session_idle_timeout_s: float = 300.0  # a session without steps for this long is closed
    max_connections: int = 256  # client connections held at once; at the cap a new one
    # replaces the connection quiet longest that holds no session, or is refused
    read_timeout_s: float = 30.0  # a started frame whose next byte takes longer, or that is
    # not complete this long (+1 s per MiB) after its first byte, closes its connection
    drain_s: float = 5.0  # on SIGTERM, open sessions may finish for up to this many seconds
    price_per_block: int = 0  # ledger units per block per token processed
    ledger: str = ""  # ledger file; with one and a price, steps must be paid by voucher
    redeem_interval_s: float = 30.0  # redeem vouchers and claim uptime this often, seconds
    stake: int = 0  # credits staked on the ledger for uptime rewards (0: none)
    emulate_latency_ms: float = 0.0  # testing aid: delay every reply by this many ms
    record_ttl_s: float = 60.0  # DHT records expire after this many seconds
    refresh_s: float = 15.0  # re-announce the DHT records this often, seconds
    threads: int = 0  # torch threads; 0 keeps torch's default

"""CLI: `layerchain node start` serves a span of blocks to the swarm."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import List, Optional

import typer

from layerchain.node.config import NodeConfig
from layerchain.types import Span

node_app = typer.Typer(help="Serve blocks of a model to the swarm.", no_args_is_help=True)
_D = NodeConfig()


@node_app.command("start")
def start(
    model: str = typer.Option(
        _D.model, help="Model: smollm2, a .gguf path, a HF dir, a shard dir, or a model id "
                       "(64 hex digits: its span's files are fetched from peers if missing).",
    ),
    blocks: Optional[str] = typer.Option(
        None, help="Blocks to serve, START:END (end exclusive); default: the node picks where "
                   "the swarm needs it most (--max-blocks / --memory-gb).",
    ),
    max_blocks: int = typer.Option(
        _D.max_blocks, help="Without --blocks (or when moving): serve at most this many blocks "
                            "(0 = as many as fit --memory-gb).",
    ),
    memory_gb: float = typer.Option(
        _D.memory_gb, help="Without --blocks: GiB of weights the span may hold (0 = half the "
                           "memory available).",
    ),
    pricing: str = typer.Option(
        _D.pricing, metavar="fixed|adaptive",
        help="fixed: always --price; adaptive: start at --price and re-price by gradient "
             "ascent on expected revenue against the peers on the same blocks.",
    ),
    min_price: int = typer.Option(_D.min_price, help="Adaptive pricing's lowest price."),
    max_price: int = typer.Option(_D.max_price, help="Adaptive pricing's highest price."),
    reprice_every: float = typer.Option(
        _D.reprice_every_s, help="Adaptive pricing re-prices every this many seconds."
    ),
    rebalance_every: float = typer.Option(
        _D.rebalance_every_s,
        help="Check every this many seconds whether moving to other blocks pays, and move "
             "(0 = never).",
    ),
    rebalance_threshold: float = typer.Option(
        _D.rebalance_threshold, help="Move only for a share of compute this much larger (0.2 = 20%)."
    ),
    emulate_ms_per_block: float = typer.Option(
        _D.emulate_ms_per_block, help="Testing aid: announce at least this compute cost, ms per block."
    ),
    host: str = typer.Option(
        _D.host, help="Address to listen on (0.0.0.0: every interface, for other machines)."
    ),
    port: int = typer.Option(_D.port, help="Inference TCP port (0 = any free port)."),
    insecure: bool = typer.Option(
        _D.insecure, "--insecure",
        help="Serve plaintext tcp:// instead of TLS (trusted networks only; clients need "
             "--insecure too).",
    ),
    announce_host: str = typer.Option(
        _D.announce_host,
        help="Address other machines dial (a port-forwarded router); default: this host's "
             "interfaces, the one routing to the initial peers first.",
    ),
    announce_port: int = typer.Option(
        _D.announce_port, help="Inference port other machines dial, if it differs (0 = --port)."
    ),
    dht_port: int = typer.Option(_D.dht_port, help="DHT TCP port (0 = any free port)."),
    reachability: str = typer.Option(
        _D.reachability, metavar="auto|public|private",
        help="auto: ask peers to dial back, serve through a relay if none can (behind NAT); "
             "public: take it as reachable; private: serve through a relay at once.",
    ),
    relay_via: str = typer.Option(
        _D.relay_via, metavar="HOST:PORT",
        help="Relay to serve through when private (as a --relay node prints it); default: "
             "one of the peers offering to relay.",
    ),
    relay: bool = typer.Option(
        _D.relay, "--relay", help="Relay connections to peers behind NAT (a reachable node)."
    ),
    relay_port: int = typer.Option(_D.relay_port, help="Relay service TCP port (0 = any free port)."),
    relay_max_connections: int = typer.Option(
        _D.relay_max_connections, help="Relayed connections at once (with --relay)."
    ),
    relay_max_mbps: float = typer.Option(
        _D.relay_max_mbps, help="Megabits per second per relayed connection and direction."
    ),
    initial_peers: Optional[List[str]] = typer.Option(None, help="DHT multiaddr to join through (repeatable)."),
    new_swarm: bool = typer.Option(False, help="Start a new DHT instead of joining one."),
    data_dir: Path = typer.Option(_D.data_dir, help="Where the node keeps its keys and state."),
    max_cache_tokens: int = typer.Option(_D.max_cache_tokens, help="KV-cache budget in tokens."),
    max_session_tokens: int = typer.Option(
        _D.max_session_tokens, help="Cache tokens one session may reserve (0 = a quarter of the cache)."
    ),
    max_connection_tokens: int = typer.Option(
        _D.max_connection_tokens,
        help="Cache tokens one client connection's sessions may reserve (0 = half of the cache).",
    ),
    max_sessions: int = typer.Option(_D.max_sessions, help="Sessions open at once."),
    max_connections: int = typer.Option(
        _D.max_connections, help="Client connections held at once (idle ones give way)."
    ),
    read_timeout: float = typer.Option(
        _D.read_timeout_s,
        help="Seconds a frame may take from its first byte to its last before its connection closes.",
    ),
    session_idle_timeout: float = typer.Option(
        _D.session_idle_timeout_s, help="Close a session without steps after this many seconds."
    ),
    first_step_timeout: float = typer.Option(
        _D.first_step_timeout_s, help="Close a session that runs no step this long after opening."
    ),
    record_ttl: float = typer.Option(
        _D.record_ttl_s, help="DHT records expire after this many seconds unless refreshed."
    ),
    announce_every: float = typer.Option(
        _D.refresh_s, help="Re-announce the DHT records every this many seconds (< --record-ttl)."
    ),
    drain: float = typer.Option(
        _D.drain_s, help="On SIGTERM, let open sessions finish for up to this many seconds."
    ),
    price: int = typer.Option(_D.price_per_block, help="Price per block per token, ledger units."),
    ledger: Optional[str] = typer.Option(
        None, "--ledger", envvar="LAYERCHAIN_LEDGER",
        help="Ledger to be paid on, a file or evm+http://HOST:PORT: with a --price, steps "
             "must carry vouchers.",
    ),
    contract: Optional[str] = typer.Option(
        None, "--contract", envvar="LAYERCHAIN_CONTRACT",
        help="The contract's address on an EVM --ledger (default: the one `chain up` deployed).",
    ),
    payout: str = typer.Option(
        _D.payout, metavar="ADDRESS",
        help="EVM ledger only: pay this node's redeemed credits and rewards to ADDRESS "
             "(the owner's wallet) instead of the node's own.",
    ),
    stake: int = typer.Option(
        _D.stake, help="Credits to stake on the ledger for uptime rewards (0 = none)."
    ),
    emulate_latency_ms: float = typer.Option(
        _D.emulate_latency_ms, help="Testing aid: delay every reply by this many ms."
    ),
    batch_window_ms: float = typer.Option(
        _D.batch_window_ms, help="Longest a decode step waits for other sessions' steps to "
        "run with them as one forward, ms (adaptive below it; 0 = never batch)."
    ),
    threads: int = typer.Option(_D.threads, help="Torch threads (0 = torch's default)."),
    device: str = typer.Option(
        _D.device, help="Where the span and its KV caches compute: cpu, cuda (cuda:N), mps, "
        "or auto (cuda if present, else mps, else cpu).",
    ),
    dtype: str = typer.Option(
        _D.dtype, metavar="auto|fp32|bf16|fp16|int8|int4",
        help="Form the span's weights are held and computed in: fp32 (exact reference), "
        "bf16, fp16, int8, int4 (weight-only, ~4x/~6x less memory), or auto (the fastest "
        "that keeps greedy agreement, int4 on CPU).",
    ),
    misbehave: str = typer.Option(
        _D.misbehave, metavar="MODE",
        help="For testing defences only: cheat on purpose, MODE one of noise, zero, skip, "
             "stale, sometimes, model (wrong outputs with honest-looking receipts).",
    ),
    seed: bool = typer.Option(
        _D.seed, "--seed/--no-seed",
        help="Serve the files of this node's span (and the head and tokenizer, if here) to "
             "peers fetching the model.",
    ),
    seed_max_mbps: float = typer.Option(
        _D.seed_max_mbps, help="Megabits per second sent to all fetching peers together."
    ),
    seed_misbehave: str = typer.Option(
        _D.seed_misbehave, metavar="corrupt", hidden=True,
        help="For testing defences only: corrupt every piece of a file served.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
) -> None:
    """Load a span of blocks, join the DHT and serve inference sessions until Ctrl-C."""
    from layerchain.ledger.open import with_contract

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    span = Span.parse(blocks) if blocks is not None else None
    config = NodeConfig(  # checks every setting: ConfigError
        model=model, start=span.start if span else 0, end=span.end if span else 0,
        auto_span=span is None, max_blocks=max_blocks, memory_gb=memory_gb, pricing=pricing,
        min_price=min_price, max_price=max_price, reprice_every_s=reprice_every,
        rebalance_every_s=rebalance_every, rebalance_threshold=rebalance_threshold,
        emulate_ms_per_block=emulate_ms_per_block, host=host, port=port, dht_port=dht_port,
        insecure=insecure,
        announce_host=announce_host, announce_port=announce_port,
        reachability=reachability, relay_via=relay_via, relay=relay, relay_port=relay_port,
        relay_max_connections=relay_max_connections, relay_max_mbps=relay_max_mbps,
        initial_peers=tuple(initial_peers or ()), new_swarm=new_swarm, data_dir=data_dir,
        max_cache_tokens=max_cache_tokens, max_session_tokens=max_session_tokens,
        max_connection_tokens=max_connection_tokens, max_sessions=max_sessions,
        session_idle_timeout_s=session_idle_timeout, first_step_timeout_s=first_step_timeout,
        max_connections=max_connections,
        read_timeout_s=read_timeout, drain_s=drain, record_ttl_s=record_ttl,
        refresh_s=announce_every, price_per_block=price,
        ledger=with_contract(ledger, contract) if ledger else "", payout=payout, stake=stake,
        emulate_latency_ms=emulate_latency_ms, batch_window_ms=batch_window_ms, threads=threads, misbehave=misbehave,
        device=device, dtype=dtype,
        seed=seed, seed_max_mbps=seed_max_mbps, seed_misbehave=seed_misbehave,
    )

    from layerchain.model.native_step import describe as describe_decode
    from layerchain.node.runner import relay_address, run_node  # after the checks: they fail fast

    def ready(node, addresses):  # noqa: ANN001
        if node.placement:
            typer.echo(node.placement)
        typer.echo(f"node {node.peer_id} serves blocks {node.span.start}:{node.span.end} "
                   f"at {', '.join(node.endpoints)} ({node.ms_per_block:.2f} ms/block)")
        typer.echo(f"decode steps: {describe_decode(node.span)}")
        for address in addresses:
            typer.echo(f"join with: --initial-peers {address}")
        if relay := relay_address(node):
            typer.echo(f"relaying for peers behind NAT: --relay-via {relay}")

    asyncio.run(run_node(config, on_ready=ready))


def register(app: typer.Typer) -> None:
    """Add `node` to the app."""
    app.add_typer(node_app, name="node")

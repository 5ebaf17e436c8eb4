"""Builds a real node (model span, TLS transport, hivemind DHT) and runs it until a signal.

On SIGTERM or SIGINT the node withdraws its DHT records, refuses new sessions, lets open
ones finish for up to ``config.drain_s`` seconds, and exits.
When it is serving, it writes ``DATA_DIR/node.json`` — ``{"pid", "peer_id", "start",
"end", "endpoint", "endpoints", "dht_addresses"}`` — which ``layerchain swarm up`` waits
for. ``endpoints`` are the ones announced (``discovery.addresses``: a node listening on
``0.0.0.0`` announces its interfaces' addresses, the one routing to its initial peers
first), ``endpoint`` the first of them; ``dht_addresses`` the DHT addresses other hosts
join through (the initial peers, for a DHT client that takes no requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import random
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from layerchain.discovery import Discovery, HivemindDiscovery, Identity, PeerRecord
from layerchain.discovery.addresses import local_announce_hosts, unreachable_from_peers
from layerchain.discovery.announcer import AnnounceConfig
from layerchain.discovery.catalog import CatalogAnnouncer
from layerchain.ledger import Ledger, open_ledger
from layerchain.market import Wallet
from layerchain.model import load_span, resolve_model
from layerchain.model.manifest_worker import build_in_child
from layerchain.model.quant import resolve_dtype
from layerchain.fetch import fetch_from_swarm, fetch_model, is_model_id, local_copy, model_dir
from layerchain.node.config import NodeConfig
from layerchain.node.memory import shed_startup_memory, shed_when_idle, tune_p2pd_env
from layerchain.node.reachability import (
    check_reachability,
    find_relay,
    pick_helpers,
    pick_relays,
    same_host_only,
)
from layerchain.model.shards import read_manifest
from layerchain.model.spec import form_model_id
from layerchain.node.rebalance import MarketTask, place_by_manifest, place_node
from layerchain.node.server import Node, measure_ms_per_block
from layerchain.types import Span
from layerchain.errors import ConfigError, LayerchainError
from layerchain.wire.codec import DEFAULT_LIMITS, Limits, largest_step_frame
from layerchain.wire.relay import RelayConfig, RelayRegistration, RelayService
from layerchain.wire.tcp import format_tcp_endpoint, parse_tcp_endpoint
from layerchain.wire.transport import Dialer

log = logging.getLogger(__name__)

SETTLE_WAIT_S = 20.0  # a node whose reachability is not settled at start (nobody to ask
# yet) keeps asking this long before it says it serves (node.json); then in the background


def wire_limits(config: NodeConfig, hidden_size: int) -> Limits:
    """The wire limits this node's listener enforces: the defaults, with the node's own caps,
    and frames no larger than the largest step of its model needs (a few MiB, not 64: what a
    connection can make the node buffer is bounded by what a step can use)."""
    return replace(
        DEFAULT_LIMITS,
        max_connections=config.max_connections,
        read_timeout_s=config.read_timeout_s,
        max_frame_bytes=min(DEFAULT_LIMITS.max_frame_bytes, largest_step_frame(hidden_size)),
    )


async def build_node(config: NodeConfig) -> tuple[Node, HivemindDiscovery]:
    """Load the span and join the DHT; the node is not started yet."""
    if not config.initial_peers and not config.new_swarm:
        raise ConfigError("a node needs initial_peers (--initial-peers) to join a swarm, "
                          "or new_swarm (--new-swarm)")
    if config.threads:
        torch.set_num_threads(config.threads)
    model = config.model
    placement = ""
    if is_model_id(model):  # a model named by id: its span's files from the peers seeding them
        if config.auto_span:  # no --blocks: its span picked from the manifest and the records
            config, placement = await place_from_swarm(config)
        model = str(await fetch_span(config))
    # a first start on this machine builds the model's manifest in a child process: the
    # build imports transformers, which this process would hold for good (~130 MiB)
    spec = await asyncio.to_thread(resolve_model, model, build=build_in_child)
    end = config.end or spec.num_blocks
    span_range = Span(config.start, end).check_within(spec.num_blocks)
    if not config.auto_span:  # (an automatic span is filled in once it is picked)
        config = replace(config, end=end)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    identity = Identity.load_or_create(config.data_dir)
    wallet = Wallet.load_or_create(config.data_dir)
    # the node's wallet pays the gas of its redemptions on an EVM ledger
    ledger = open_ledger(config.ledger, sender=wallet) if config.ledger else None
    if ledger is not None and config.payout:
        await asyncio.to_thread(set_payout, ledger, wallet, config.payout)
    # On the loop thread, as every later step (see layerchain.node.server on libgomp's
    # teams), and one node of this machine at a time: nodes started together share the
    # cores, and a speed measured while the others load would be several times too slow
    # (the routes would avoid this node until its steps taught it better).
    # the form is part of the model's id (ModelSpec.in_form): an int8 node announces, signs
    # receipts and is audited as the int8 model, never against an fp32 recomputation
    spec = spec.in_form(resolve_dtype(config.dtype, config.device))
    tune_p2pd_env(os.environ)  # the discovery's p2pd starts with this process's environment
    discovery = await HivemindDiscovery.create(
        initial_peers=list(config.initial_peers),
        host=config.host,
        port=config.dht_port,
        new_swarm=config.new_swarm,
        identity=identity,
        client_mode=config.reachability == "private",  # nobody can dial it: a DHT client
        announce_host=config.announce_host,
    )
    if config.auto_span:  # no --blocks: where the swarm needs it (node.rebalance)
        span_range, limit, placement = await place_node(
            discovery, spec, config, lambda: probe_block(spec, config.device))
        config = replace(config, start=span_range.start, end=span_range.end, auto_span=False,
                         max_blocks=limit.blocks)
    with machine_lock("compute-start"):
        span = load_span(spec, span_range.start, span_range.end, device=config.device)
        ms_per_block = measure_ms_per_block(span, spec.hidden_size)
    announce_hosts = await asyncio.to_thread(
        local_announce_hosts, config.host, config.initial_peers, config.announce_host
    )
    if unreachable_from_peers(announce_hosts, config.initial_peers):
        log.warning("this node listens on %s, which other machines cannot reach, while its "
                    "initial peers are on other machines: start it with --host 0.0.0.0 (or "
                    "--announce-host) to serve them", config.host)
    node = Node(
        config,
        spec=spec,
        span=span,
        # TLS with the identity key unless --insecure; the node's own outgoing dials (none
        # today) would refuse plaintext the same way
        transport=Dialer(identity, config.insecure, wire_limits(config, spec.hidden_size)),
        listen_at=f"{'tcp' if config.insecure else 'tls'}://{config.host}:{config.port}",
        discovery=discovery,
        identity=identity,
        wallet=wallet,
        ledger=ledger,
        ms_per_block=ms_per_block,
        announce_hosts=announce_hosts,
    )
    node.placement = placement
    return node, discovery


def probe_block(spec: Any, device: str) -> tuple[int, float]:
    """Load block 0 alone: (its weight bytes in the spec's form, ms per block per token)."""
    with machine_lock("compute-start"):
        block = load_span(spec, 0, 1, device=device)
        return block.parameter_bytes(), measure_ms_per_block(block, spec.hidden_size)


def load_locked(spec: Any, device: str, span: Span) -> Any:
    """A span loaded, one node of the machine at a time (``machine_lock``): what a moving
    node swaps in (node.rebalance runs it in a thread of its own, then measures it)."""
    with machine_lock("compute-start"):
        return load_span(spec, span.start, span.end, device=device)


def set_payout(ledger: Ledger, wallet: Wallet, payout: str) -> None:
    """Have the contract pay this node's redeemed credits and rewards to ``payout`` (one
    transaction, skipped when it already does); ConfigError on a ledger without payouts."""
    from layerchain.ledger.evm import EvmLedger

    if not isinstance(ledger, EvmLedger):
        raise ConfigError("--payout only applies on an EVM ledger (--ledger evm+http://...)")
    if ledger.payout(wallet.address).lower() != payout.lower():
        ledger.set_payout(wallet, payout)
    log.info("credits of %s are paid to %s", wallet.address, payout)


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """Hold a lock shared by every layerchain process of this machine (an flock on a file
    in the temp directory, released by the kernel if the process dies). Without a usable
    lock file the block runs unlocked."""
    path = Path(tempfile.gettempdir()) / f"layerchain-{name}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        log.debug("no machine lock %s: %s", path, error)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


async def run_node(config: NodeConfig, on_ready: Callable[[Node, list[str]], None] | None = None) -> None:
    """Run a node until SIGTERM/SIGINT; then stop it gracefully."""
    node, discovery = await build_node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rechecker: asyncio.Task[None] | None = None
    keeper: asyncio.Task[None] | None = None
    market: asyncio.Task[None] | None = None
    shedder: asyncio.Task[None] | None = None
    catalog: CatalogAnnouncer | None = None
    try:
        await node.listen()
        discovery, settled = await settle_reachability(node, config, discovery)
        await node.announce()
        catalog = announce_catalog(node, discovery)
        if not settled:  # nodes starting together: wait a little for peers to ask
            rechecker = loop.create_task(
                recheck_reachability(node, config, discovery, first_wait_s=1.0))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(rechecker), SETTLE_WAIT_S)
        addresses = discovery.visible_addresses or discovery.initial_peers

        def write_ready(_: object = None) -> None:
            ready = {
                "pid": os.getpid(),
                "peer_id": node.peer_id,
                "start": node.span.start,
                "end": node.span.end,
                "endpoint": node.endpoints[0],
                "endpoints": list(node.endpoints),
                "dht_addresses": addresses,
                "relay": relay_address(node),  # HOST:PORT of its relay service, "" if none
                "relayed": node.relay_listener is not None,  # serves through a relay (private)
                "ms_per_block": node.ms_per_block,
                "wallet": node.wallet,
            }
            tmp = config.data_dir / "node.json.tmp"
            tmp.write_text(json.dumps(ready))
            tmp.replace(config.data_dir / "node.json")

        write_ready()
        await asyncio.to_thread(shed_startup_memory)  # serving: drop what only the start used
        # and again what serving paged back in, once no session has been open for a while
        shedder = loop.create_task(shed_when_idle(lambda: len(node.sessions) > 0))
        if rechecker is not None and not rechecker.done():  # settled later: say so
            rechecker.add_done_callback(write_ready)
        if not config.relay_via:  # a relay picked from the records may go: find another
            keeper = loop.create_task(keep_relayed(node, config, discovery))
        if config.pricing == "adaptive" or config.rebalance_every_s:  # node.rebalance
            market = loop.create_task(MarketTask(
                node, node.config, node.config.max_blocks or node.span.end - node.span.start,
                lambda target: load_locked(node.spec, config.device, target)).run())
        if on_ready is not None:
            on_ready(node, addresses)
        await stop.wait()
    finally:
        for task in (rechecker, keeper, market, shedder):
            if task is not None:
                task.cancel()
        if catalog is not None:
            await catalog.stop()
        await node.stop(drain_s=config.drain_s)
        await discovery.close()
        (config.data_dir / "node.json").unlink(missing_ok=True)


def announce_catalog(node: Node, discovery: HivemindDiscovery) -> CatalogAnnouncer:
    """List the node's model in the swarm's catalog (``discovery.catalog``: its manifest,
    built in the background on first use, refreshed and withdrawn with its records)."""
    from layerchain.model.manifest import manifest_of

    catalog = CatalogAnnouncer(
        discovery, node.identity, node.spec.model_id, node.spec.dtype,
        lambda: manifest_of(node.spec),
        AnnounceConfig(refresh_s=node.config.refresh_s, ttl_s=node.config.record_ttl_s))
    catalog.start()
    return catalog


async def settle_reachability(
    node: Node, config: NodeConfig, discovery: HivemindDiscovery
) -> tuple[HivemindDiscovery, bool]:
    """Between ``node.listen()`` and ``node.announce()``: can peers dial this node?

    Reachable (``--reachability public``, or a peer dialled back): with ``--relay`` it
    starts its relay service. Not (``private``, or nobody dialled back): it registers with
    ``--relay-via`` or a peer offering to relay, so its relay:// endpoint is announced
    first, and its DHT becomes a client (recreated, when the check found it private).
    Returns the discovery to use from now on, and whether the answer is settled: an auto
    check with nobody to ask, or private with no relay yet, is not (the node serves
    directly meanwhile; ``recheck_reachability`` asks again). ConfigError when private is
    forced and no relay is found."""
    rng = random.Random()
    public = config.reachability == "public"
    if config.reachability == "auto" and same_host_only(node.endpoints, config.host):
        public = True  # a one-machine swarm: nothing to check
    records = []  # the swarm's records, read only when needed (a find costs 0.2-0.6 s)
    if (config.reachability == "auto" and not public) or not (public or config.relay_via):
        records = await discovery.find(node.spec.model_id, node.spec.num_blocks)
    settled = True
    if config.reachability == "auto" and not public:
        helpers = pick_helpers(records, node.peer_id, rng)
        reach = await check_reachability(
            node.transport, node.endpoints[0], node.peer_id, helpers, node.probes
        )
        log.info("reachability: %s (%s)", "public" if reach.public else "private", reach.why)
        public, settled = reach.public, bool(helpers) or config.relay
    if public:
        if config.relay:
            service = RelayService(RelayConfig(max_pairs=config.relay_max_connections,
                                               max_mbps=config.relay_max_mbps))
            await service.start(config.host, config.relay_port)
            node.relay_service = service
            log.info("relaying for peers behind NAT at %s", relay_address(node))
        return discovery, settled
    if config.relay:
        log.warning("not relaying: this node is not reachable (--relay needs a reachable node)")
    if not await _serve_via_relay(node, config, records, rng):
        if config.reachability == "private":
            raise ConfigError(
                "this node cannot be reached by other peers, and no relay was found",
                hint="start a reachable node with --relay, then pass --relay-via HOST:PORT "
                     "(or --reachability public if peers can reach this node)",
            )
        log.warning("no peer could dial this node and no relay was found yet: serving "
                    "directly meanwhile (a reachable node started with --relay helps)")
        return discovery, False
    if config.reachability == "auto":  # it joined as a DHT server: rejoin as a client
        await discovery.close()
        discovery = await HivemindDiscovery.create(
            initial_peers=list(config.initial_peers),
            host=config.host,
            port=config.dht_port,
            identity=node.identity,
            client_mode=True,
        )
        node.discovery = discovery
    return discovery, True


async def _serve_via_relay(node: Node, config: NodeConfig, records: list[PeerRecord],
                           rng: random.Random) -> bool:
    """Register with ``--relay-via`` or a relay among ``records``; False if none answers."""
    relay = config.relay_via or await find_relay(
        node.transport, pick_relays(records, node.peer_id, rng))
    if not relay:
        return False
    await node.serve_via(relay)
    log.info("serving through relay %s at %s", relay, node.endpoints[0])
    return True


async def recheck_reachability(node: Node, config: NodeConfig, discovery: Discovery,
                               first_wait_s: float = 2.0, max_wait_s: float = 60.0) -> None:
    """For an auto node whose answer was not settled at start (nodes starting together
    find nobody to ask): ask again, waiting ``first_wait_s`` doubling up to ``max_wait_s``
    between tries, until it is found reachable or serves through a relay; then its records
    are announced again at once. (Its DHT stays a server: a late finding does not restart
    it.)"""
    rng = random.Random()
    wait = first_wait_s
    while True:
        await asyncio.sleep(wait)
        wait = min(max_wait_s, 2 * wait)
        try:
            records = await discovery.find(node.spec.model_id, node.spec.num_blocks)
            helpers = pick_helpers(records, node.peer_id, rng)
            if not helpers:
                continue
            reach = await check_reachability(
                node.transport, node.endpoints[0], node.peer_id, helpers, node.probes
            )
            log.info("reachability, checked again: %s (%s)",
                     "public" if reach.public else "private", reach.why)
            if reach.public:
                return
            if await _serve_via_relay(node, config, records, rng):
                if node.announcer is not None:
                    await node.announcer.announce_now()
                return
        except LayerchainError as error:
            log.info("reachability check failed, will retry: %s", error)


async def keep_relayed(node: Node, config: NodeConfig, discovery: Discovery,
                       check_s: float = 15.0, lost_s: float = 60.0) -> None:
    """A node serving through a relay picked from the records moves to another relay when
    its own has been unreachable for ``lost_s`` seconds (its registration keeps retrying
    meanwhile), and announces the new endpoint at once. With ``--relay-via`` it stays."""
    rng = random.Random()
    loop = asyncio.get_running_loop()
    lost_since: float | None = None
    while True:
        await asyncio.sleep(check_s)
        listener = node.relay_listener
        if not isinstance(listener, RelayRegistration) or listener.registered.is_set():
            lost_since = None
            continue
        now = loop.time()
        lost_since = lost_since if lost_since is not None else now
        if now - lost_since < lost_s:
            continue
        try:
            records = await discovery.find(node.spec.model_id, node.spec.num_blocks)
            relay = await find_relay(node.transport, pick_relays(records, node.peer_id, rng))
            if not relay or relay == listener.address.relay:
                continue  # nothing else to go to: keep retrying the old one
            await node.serve_via(relay)  # (raises before replacing the old one)
            await listener.close()
            log.warning("relay %s lost for %.0f s: serving through %s", listener.address.relay,
                        now - lost_since, relay)
            lost_since = None
            if node.announcer is not None:
                await node.announcer.announce_now()
        except LayerchainError as error:
            log.info("looking for another relay failed, will retry: %s", error)


def relay_address(node: Node) -> str:
    """``HOST:PORT`` peers behind NAT pass as ``--relay-via`` ("" if the node does not
    relay): its relay port on the host of its first announced endpoint."""
    if node.relay_service is None:
        return ""
    endpoint = node.endpoints[0]
    host, _ = parse_tcp_endpoint(endpoint, endpoint.split("://", 1)[0])
    return format_tcp_endpoint(host, node.relay_service.port).removeprefix("tcp://")


async def place_from_swarm(config: NodeConfig) -> tuple[NodeConfig, str]:
    """``place_by_id`` through a DHT client joined at ``config.initial_peers`` (closed after),
    over TLS links checking each peer's id (plaintext tcp:// only with ``--insecure``)."""
    if not config.initial_peers:
        raise ConfigError(f"model {config.model[:12]} is named by id and no peer was given to "
                          "fetch it from", hint="pass --initial-peers ADDR")
    discovery = await HivemindDiscovery.create(initial_peers=list(config.initial_peers),
                                               client_mode=True)
    try:
        return await place_by_id(config, discovery, Dialer(insecure=config.insecure))
    finally:
        await discovery.close()


async def place_by_id(config: NodeConfig, discovery: Discovery, transport: Any
                      ) -> tuple[NodeConfig, str]:
    """The span of a node serving a model by id without ``--blocks`` (``--model MODEL_ID``,
    nothing local): the model's manifest fetched first (into ``model_dir``: the shape), then
    ``node.rebalance.place_by_manifest`` over the records of the form it will compute in.
    Returns ``config`` with that span (its budget as ``max_blocks``: what a move may take)
    and the line saying why; ``fetch_span`` then fetches the span's files."""
    out = model_dir(config.model)
    if local_copy(config.model, None, client=False) is None:  # no manifest here yet
        await fetch_model(discovery, transport, config.model, out)  # the manifest only
    manifest = await asyncio.to_thread(read_manifest, out)
    form = form_model_id(config.model, resolve_dtype(config.dtype, config.device))
    span, limit, line = await place_by_manifest(discovery, form, manifest, config)
    return replace(config, start=span.start, end=span.end, auto_span=False,
                   max_blocks=limit.blocks), line


async def fetch_span(config: NodeConfig) -> Path:
    """The shard directory with the files of the span a node serves of a model it names by
    id (``--model MODEL_ID``): ``$LAYERCHAIN_HOME/models/MODEL_ID``, its missing files
    fetched from the peers seeding them (``layerchain.fetch``: verified, resumable)."""
    if not config.end:
        raise ConfigError("a node serving a model by id needs its span's end",
                          hint="give --blocks START:END")
    span = Span(config.start, config.end)
    local = local_copy(config.model, span, client=False)
    if local is not None:
        return local
    if not config.initial_peers:
        raise ConfigError(f"model {config.model[:12]} is not on this machine and no peer was "
                          "given to fetch it from", hint="pass --initial-peers ADDR")
    report = await fetch_from_swarm(config.initial_peers, config.model, model_dir(config.model),
                                    blocks=span, insecure=config.insecure)
    log.info("fetched blocks %s of model %s: %.1f MB in %.1f s from %d peers (%d files refused)",
             span, config.model[:12], report.bytes / 1e6, report.seconds, len(report.peers),
             len(report.refused))
    return model_dir(config.model)

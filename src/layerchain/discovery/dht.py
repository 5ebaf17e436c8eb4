"""``Discovery`` on hivemind's Kademlia DHT (the P2P engine behind Petals).

The DHT runs inside the caller's process: a hivemind ``DHTNode`` on an event loop of its
own, in a daemon thread (``_DHTThread``), which runs the libp2p daemon ``p2pd`` as its one
child process. We talk to it only through ``run_coroutine_threadsafe`` wrapped with
``asyncio.wrap_future``, so the caller's event loop never blocks on the DHT, and a node's
compute on its loop thread (a prefill can take seconds) never delays the DHT's answers to
other peers. The coroutines below run on the DHT thread.

Why not ``hivemind.DHT`` (a forked child process, as before 2026-12-02): that child is a
second Python holding the whole torch stack (hivemind imports torch), 241 MiB PSS beside a
10-block node, and its ``MPFuture`` shares a tensor in ``file_system`` mode, which starts a
``torch_shm_manager`` (63 MiB) although nothing is shared. In-process, a node is its own
process plus p2pd (docs/BENCHMARKS.md "Node memory"). p2pd exits by itself within about
2 s when its owner dies without ``close()`` (SIGKILL): its control connection closes.

Key layout, tombstones and verification are ``discovery.base``'s, enforced inside the DHT
by ``validator.PeerRecordValidator``; this module only moves bytes. Each ``announce`` /
``withdraw`` is one batched ``store_many`` over all blocks of the span, and each ``find``
one batched ``get_many`` over all ``L`` block keys (one traversal with all keys as parallel
queries), asked for the *latest* value so the sub-keyed dictionaries of all replicas merge.

Across hosts: a DHT listening on the wildcard (``0.0.0.0``/``::``) tells its peers (libp2p
identify) only the addresses they can dial (``announce_maddrs``, from
``discovery.addresses``: the interface routing to the initial peers first, or
``announce_host``), never ``0.0.0.0`` or ``127.0.0.1``: a peer that learned a loopback
address would dial itself. A node that cannot accept connections (behind NAT) runs in
``client_mode``: it asks and stores through others but is no DHT server, so nobody keeps
it in a routing table only to time out on it; it offers no address to join through.

Measured on loopback (2-core VM shared with other work, 1 bootstrap + 4 DHTs, with the
forked child): start 0.5-1.7 s (p2pd + join; 4 in parallel 1.1-4.8 s), announce 3 x 10
blocks 0.3-0.9 s, find over 30 blocks 0.15-0.6 s, withdraw 10 blocks 0.25-0.5 s, close
~0.2 s each. In-process, a start is p2pd's start and the join: ~0.4 s on an idle machine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import layerchain.discovery._hivemind  # noqa: F401 - first: hivemind's own __init__ stays lazy
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from layerchain.discovery.addresses import (
    announce_multiaddrs,
    is_loopback,
    is_wildcard,
    local_announce_hosts,
)
from layerchain.discovery.base import (
    TOMBSTONE_MARGIN_S,
    DiscoveryStats,
    block_key,
    check_num_blocks,
    check_own,
    select_records,
    tombstone,
)
from layerchain.discovery.identity import Identity
from layerchain.discovery.records import PeerRecord, sign_record
from layerchain.discovery.validator import PeerRecordValidator
from layerchain.errors import ConfigError, PeerTimeout, PeerUnreachable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DHTConfig:
    wait_timeout_s: float = 3.0  # a Kademlia RPC counts as lost after this many seconds
    num_workers: int = 4  # parallel RPCs per traversal
    num_replicas: int = 5  # each entry is stored on this many nearest DHT nodes
    client_mode: bool = False  # True: make requests but accept none (behind NAT)
    start_timeout_s: float = 30.0  # give up starting p2pd and joining after this many seconds
    request_timeout_s: float = 20.0  # give up one announce/withdraw/find after this many seconds
    orphan_check_s: float = 1.0  # unused since the DHT runs in-process (kept: a public field)


T = TypeVar("T")


# ---- coroutines run on the DHT thread: (owner, node, **kwargs) -> plain data ----


async def _store_many(
    _owner: object,
    node: DHTNode,
    keys: list[str],
    blobs: list[bytes],
    expirations: list[float],
    sub_key: str,
) -> list[bool]:
    ok = await node.store_many(keys, blobs, expirations, subkeys=[sub_key] * len(keys))
    return [bool(ok.get((key, sub_key))) for key in keys]


async def _get_many(_owner: object, node: DHTNode, keys: list[str]) -> dict[str, Any]:
    """``{key: {sub_key: (value, expiration)}}``, or ``{key: raw value}`` for a non-dictionary."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    out: dict[str, Any] = {}
    for key, item in found.items():
        if item is None:
            continue
        if isinstance(item.value, dict):
            out[key] = {sk: (v.value, v.expiration_time) for sk, v in item.value.items()}
        else:
            out[key] = item.value
    return out


async def _visible_maddrs(_owner: object, node: DHTNode) -> list[str]:
    return [str(m) for m in await node.get_visible_maddrs()]


async def _routing_table_size(_owner: object, node: DHTNode) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


async def _join_again(_owner: object, node: DHTNode, peers: list[str]) -> int:
    """Ping ``peers`` again (each ping: one RPC of ``wait_timeout``), then look up our own
    neighbours as a join does; the routing table's size after. For a join whose first pings
    all timed out: on a loaded machine the first dial (p2pd's handshake) can take longer
    than an RPC's timeout, the second reuses the connection."""
    ids = {PeerID.from_base58(Multiaddr(a)["p2p"]) for a in peers}
    await asyncio.gather(*(node.protocol.call_ping(peer) for peer in ids))
    if node.protocol.routing_table.uid_to_peer_id:
        await node.find_nearest_nodes([node.node_id])
    return len(node.protocol.routing_table.uid_to_peer_id)


class _OwningLoop(asyncio.SelectorEventLoop):
    """An event loop that keeps the transports of the processes started on it (p2pd), so
    that stopping it closes them: hivemind drops a p2pd that failed to start (port taken,
    no peer answered) without closing its transport (a ResourceWarning, an unreaped child)."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[asyncio.SubprocessTransport] = []

    async def subprocess_exec(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super().subprocess_exec(*args, **kwargs)
        self.processes.append(transport)
        return transport, protocol


class _DHTThread:
    """An event loop of its own in a daemon thread, where a ``DHTNode`` lives.

    ``submit`` runs a coroutine there; ``stop`` (blocking) cancels what is left, closes the
    processes started there (killing one still running), closes the loop and joins the
    thread. The thread never runs torch ops, so it does not disturb a node's compute
    (layerchain.node.server on libgomp's thread teams)."""

    EXIT_WAIT_S = 2.0  # at stop, how long to wait for a killed process to be reaped

    def __init__(self) -> None:
        self.loop = _OwningLoop()
        self._thread = threading.Thread(target=self._run, name="layerchain-dht", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            for process in loop.processes:
                process.close()  # kills it if it still runs
            deadline = time.monotonic() + self.EXIT_WAIT_S
            while (any(p.get_returncode() is None for p in loop.processes)
                   and time.monotonic() < deadline):
                loop.run_until_complete(asyncio.sleep(0.02))  # lets the exit be reaped
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)


# ---- the Discovery implementation ----


def _check_address(address: str) -> str:
    try:
        Multiaddr(address)["p2p"]
    except Exception:
        raise ConfigError(
            f"bad initial peer address {address!r}",
            hint="expected /ip4/HOST/tcp/PORT/p2p/PEER_ID, as printed by a node or bootstrap",
        ) from None
    return address


def _listen_maddr(host: str, port: int) -> str:
    if not 0 <= port < 65536:
        raise ConfigError(f"port {port} is out of range 0..65535")
    return f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` now (p2pd needs the port it announces before it starts;
    another process could take it in between, then p2pd fails to start: ConfigError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _announce_maddrs(host: str, port: int, peers: Sequence[str], announce_host: str
                     ) -> tuple[list[str] | None, int]:
    """``(announce_maddrs, port)`` for a DHT listening on ``host:port``: None (p2pd's own
    view) when it listens on one address and nothing overrides it; else the dialable
    addresses, with ``port`` made concrete. Blocking (interfaces, route lookups)."""
    if not announce_host and not is_wildcard(host):
        return None, port
    hosts = local_announce_hosts(host, peers, announce_host)
    if is_wildcard(host) and not announce_host and all(is_loopback(h) for h in hosts):
        return None, port  # a machine with no network: p2pd's loopback view is right
    port = port or _free_port(host)
    return announce_multiaddrs(hosts, port), port


class HivemindDiscovery:
    """``Discovery`` over a hivemind ``DHTNode`` running in this process (see the module
    docstring). Make it with ``await HivemindDiscovery.create(...)``."""

    def __init__(
        self,
        dht: _DHTThread,
        node: DHTNode,
        identity: Identity,
        initial_peers: tuple[str, ...],
        visible_addresses: tuple[str, ...],
        config: DHTConfig,
    ) -> None:
        self._thread: _DHTThread | None = dht
        self._node = node
        self.identity = identity
        self.config = config
        self.stats = DiscoveryStats()
        self._initial_peers = initial_peers
        self._visible_addresses = visible_addresses
        self._announced: dict[str, float] = {}  # block key -> expiration of our last entry

    @classmethod
    async def create(
        cls,
        initial_peers: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        new_swarm: bool = False,
        identity: Identity | None = None,
        config: DHTConfig = DHTConfig(),
        client_mode: bool = False,
        announce_host: str = "",
    ) -> HivemindDiscovery:
        """Start a DHT node listening on ``host:port`` and join through ``initial_peers``.

        ``new_swarm=True`` starts a swarm of one instead. ``client_mode`` (or
        ``config.client_mode``): a node others cannot dial (behind NAT) makes requests but
        serves none. ``announce_host``: the address peers reach this DHT at (else found
        from the interfaces when ``host`` is the wildcard; see the module docstring).
        Raises ConfigError on bad arguments, PeerUnreachable if none of ``initial_peers``
        answers, PeerTimeout if starting takes longer than ``config.start_timeout_s``.
        """
        peers = tuple(_check_address(a) for a in initial_peers)
        if new_swarm and peers:
            raise ConfigError("give either --new-swarm or --initial-peers, not both")
        if not new_swarm and not peers:
            raise ConfigError(
                "no initial peers to join",
                hint="pass --initial-peers ADDR (printed by a node) or --new-swarm",
            )
        client_mode = client_mode or config.client_mode
        if client_mode and new_swarm:
            raise ConfigError("a node nobody can dial cannot start a new swarm",
                              hint="join one with --initial-peers ADDR of a reachable node")
        _listen_maddr(host, port)  # range check before anything starts
        announce, port = await asyncio.to_thread(_announce_maddrs, host, port, peers,
                                                 announce_host)
        thread = _DHTThread()
        with _quiet_hivemind():
            starting = thread.submit(DHTNode.create(
                initial_peers=list(peers) or None,
                host_maddrs=[_listen_maddr(host, port)],
                announce_maddrs=None if client_mode else announce,
                num_workers=config.num_workers,
                num_replicas=config.num_replicas,
                wait_timeout=config.wait_timeout_s,
                client_mode=client_mode,
                record_validator=CompositeValidator([PeerRecordValidator()]),
                # Join failures are detected below, so that the DHT node (and its p2pd) is
                # always up when we raise and can be shut down cleanly.
                ensure_bootstrap_success=False,
            ))
            try:
                node = await asyncio.wait_for(asyncio.wrap_future(starting),
                                              config.start_timeout_s)
            except BaseException as error:
                starting.cancel()
                await asyncio.to_thread(thread.stop)
                if isinstance(error, asyncio.TimeoutError):
                    raise PeerTimeout(
                        f"the DHT did not start within {config.start_timeout_s} s") from None
                if isinstance(error, P2PDaemonError):  # p2pd itself refused to start
                    if peers and "bootstrap" in str(error):
                        raise _none_answered(peers) from None
                    raise ConfigError(f"cannot start the DHT on {host}:{port}: {error}") from None
                raise
        discovery = cls(thread, node, identity or Identity.generate(), peers, (), config)
        try:
            if (peers and await discovery._call(_routing_table_size) == 0
                    and await discovery._call(_join_again, peers=list(peers)) == 0):
                raise _none_answered(peers)
            if not client_mode:  # a client-mode DHT takes no requests: nobody joins through it
                discovery._visible_addresses = tuple(await discovery._call(_visible_maddrs))
        except BaseException:
            await discovery.close()
            raise
        return discovery

    @property
    def initial_peers(self) -> tuple[str, ...]:
        return self._initial_peers

    @property
    def visible_addresses(self) -> tuple[str, ...]:
        return self._visible_addresses

    async def call(self, coro: Callable[..., Awaitable[T]], **kwargs: Any) -> T:
        """``await coro(self, node, **kwargs)`` on the DHT thread, for a hivemind application
        sharing this DHT node (``train.dp_dht``); PeerTimeout as ``_call``."""
        return await self._call(coro, **kwargs)

    async def _call(self, coro: Callable[..., Awaitable[T]], **kwargs: Any) -> T:
        """``await coro(self, node, **kwargs)`` on the DHT thread; PeerTimeout after
        ``config.request_timeout_s``."""
        if self._thread is None:
            raise PeerUnreachable("discovery is closed")
        future = self._thread.submit(coro(self, self._node, **kwargs))
        # Shielded: if we stop waiting (timeout, cancellation), the request still finishes on
        # the DHT thread instead of being cancelled halfway through a store.
        waiter = asyncio.shield(asyncio.wrap_future(future))
        try:
            return await asyncio.wait_for(waiter, self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise PeerTimeout(
                f"the DHT did not answer within {self.config.request_timeout_s} s"
            ) from None

    async def _store(self, keys: list[str], blob: bytes, expirations: list[float]) -> list[bool]:
        sub_key = self.identity.peer_id
        return await self._call(
            _store_many, keys=keys, blobs=[blob] * len(keys), expirations=expirations, sub_key=sub_key
        )

    async def announce(self, record: PeerRecord) -> None:
        check_own(self.identity, record.peer_id)
        blob = sign_record(self.identity, record)
        keys = [block_key(record.model_id, b) for b in record.blocks]
        ok = await self._store(keys, blob, [record.expires_at] * len(keys))
        if not any(ok):
            raise PeerUnreachable(f"no DHT node stored the record for blocks {record.span}")
        if not all(ok):
            logger.warning("stored %d of %d block entries for %s", sum(ok), len(ok), record.span)
        for key, stored in zip(keys, ok):
            if stored:
                self._announced[key] = record.expires_at
        self.stats.announced += 1

    async def withdraw(self, model_id: str, peer_id: str, start: int, end: int) -> None:
        check_own(self.identity, peer_id)
        keys = [block_key(model_id, b) for b in range(start, end)]
        # A tombstone must outlive every copy of our entry, including ones from an earlier
        # run of this node that we never saw: read them first.
        held = await self._call(_get_many, keys=keys)
        latest = get_dht_time()
        for key in keys:
            entry = held.get(key)
            ours = entry.get(peer_id) if isinstance(entry, dict) else None
            latest = max(latest, self._announced.pop(key, latest), ours[1] if ours else latest)
        expiration = latest + TOMBSTONE_MARGIN_S
        blob = sign_record(self.identity, tombstone(self.identity, model_id, start, end, expiration))
        await self._store(keys, blob, [expiration] * len(keys))
        self.stats.withdrawn += 1

    async def find(self, model_id: str, num_blocks: int) -> list[PeerRecord]:
        check_num_blocks(num_blocks)
        keys = [block_key(model_id, b) for b in range(num_blocks)]
        found = await self._call(_get_many, keys=keys)
        entries: list[tuple[int, object, object, float]] = []
        for block, key in enumerate(keys):
            value = found.get(key)
            if value is None:
                continue
            if not isinstance(value, dict):  # someone stored a plain value under a block key
                self.stats.invalid += 1
                continue
            entries.extend((block, sub_key, blob, exp) for sub_key, (blob, exp) in value.items())
        return select_records(entries, model_id, num_blocks, get_dht_time(), self.stats)

    async def put_entry(self, key: str, blob: bytes, expires_at: float) -> bool:
        """Store ``blob`` under ``key``, sub-keyed by this peer (the catalog's seam)."""
        return any(await self._store([key], blob, [expires_at]))

    async def get_entries(self, key: str) -> dict[str, tuple[bytes, float]]:
        """``{sub_key: (blob, expiration)}`` under ``key``; {} if none or not a dictionary."""
        value = (await self._call(_get_many, keys=[key])).get(key)
        return dict(value) if isinstance(value, dict) else {}

    async def close(self) -> None:
        """Shut the DHT node and its p2pd down (waits up to a few seconds). Idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(_shutdown, thread, self._node)

    async def __aenter__(self) -> HivemindDiscovery:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@contextlib.contextmanager
def _quiet_hivemind() -> Iterator[None]:
    """Ignore hivemind's own DeprecationWarnings (P2P.create calls the deprecated
    ``importlib.resources.path``) while the DHT thread starts, also when this process runs
    with ``-W error`` (pytest's ``filterwarnings = error``): filters are process-wide, and
    the thread warns while the caller waits in this block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"hivemind(\.|$)")
        yield


def _none_answered(peers: Sequence[str]) -> PeerUnreachable:
    return PeerUnreachable(
        f"could not join the swarm: none of {len(peers)} initial peers answered",
        hint="check that the addresses are current and the peers are running",
    )


async def _stop_node(node: DHTNode, timeout_s: float) -> None:
    """Shut ``node`` down; if that hangs, terminate its p2pd anyway (hivemind's own way)."""
    try:
        await asyncio.wait_for(node.shutdown(), timeout_s)
    except Exception as error:
        logger.debug("DHT shutdown failed (%s): terminating p2pd", error)
        node.p2p._terminate()


def _shutdown(thread: _DHTThread, node: DHTNode, timeout_s: float = 5.0) -> None:
    """Blocking: stop the DHT node (and p2pd), then its thread."""
    with contextlib.suppress(Exception):  # the loop may already be gone
        thread.submit(_stop_node(node, timeout_s)).result(timeout_s + 1)
    thread.stop()

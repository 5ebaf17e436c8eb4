"""Can other peers dial this node? If not, which relay does it serve through?

A node behind NAT (or a firewall) listens like any other, but nobody outside can open a
connection to it. It finds out by asking up to ``MAX_HELPERS`` peers to dial it back
(``DialBack``): each dials the node's announced endpoint, proving nothing but reaching it,
and sends a ``DialBackProbe`` carrying a nonce only the node knows. The node trusts no
helper's word: it is reachable iff a probe with one of its nonces actually arrived
(``DialBackProbes``). None arrived -> private: it registers with a relay (a peer whose
record says ``relay=True``, or ``--relay-via``) and announces ``relay://RELAY/PEERID`` first,
its direct endpoints after it (a peer on its LAN may still reach it directly). See
``wire.relay`` for the relay itself and README "Behind NAT" for why our own relay.

Pure rules: ``pick_helpers``, ``pick_relays``, ``relayed_endpoints``, ``parse_relay_via``.
I/O, thin: ``check_reachability`` (the asker), ``dial_back`` (the helper), ``find_relay``.
Knows nothing of models or sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from layerchain.discovery.records import MAX_ENDPOINTS, PeerRecord
from layerchain.errors import ConfigError, LayerchainError, LimitExceeded, PeerBusy
from layerchain.wire import messages as m
from layerchain.wire.rpc import RpcClient
from layerchain.wire.tcp import format_tcp_endpoint, parse_tcp_endpoint
from layerchain.wire.transport import Transport

log = logging.getLogger(__name__)

MAX_HELPERS = 3  # peers asked to dial back
DIAL_BACK_TIMEOUT_S = 3.0  # for one dial-back: connect, probe, answer (the asker waits
# twice this for its helper: a stuck helper delays a node's start by 6 s at most)
MAX_DIAL_BACKS = 4  # dial-backs a helper runs at once for others (more: busy)
_DIRECT = ("tls://", "tcp://", "mem://")  # endpoints a dial-back may target


@dataclass(frozen=True)
class Reachability:
    """The outcome of a check."""

    public: bool  # others can dial this node's direct endpoint
    asked: tuple[str, ...]  # peer ids asked to dial back
    reached_by: tuple[str, ...]  # those whose probe arrived
    why: str  # one line for the log


class DialBackProbes:
    """The nonces a node has handed out and the ones that came back to it in a probe."""

    def __init__(self) -> None:
        self._expected: set[int] = set()
        self._seen: set[int] = set()

    def expect(self) -> int:
        """A fresh nonce to put in a DialBack request."""
        nonce = secrets.randbits(62)
        self._expected.add(nonce)
        return nonce

    def arrived(self, nonce: int) -> None:
        """A DialBackProbe with ``nonce`` reached this node (unknown nonces are ignored)."""
        if nonce in self._expected:
            self._seen.add(nonce)

    def seen(self, nonce: int) -> bool:
        """Whether the probe of ``nonce`` arrived; the nonce is spent either way."""
        self._expected.discard(nonce)
        found = nonce in self._seen
        self._seen.discard(nonce)
        return found


# ---------------------------------------------------------------------------- pure rules


def direct_endpoints(record: PeerRecord) -> tuple[str, ...]:
    """The endpoints of ``record`` one can dial without a relay."""
    return tuple(e for e in record.endpoints if e.startswith(_DIRECT))


def _distinct_peers(records: Iterable[PeerRecord], own_peer_id: str) -> list[PeerRecord]:
    by_peer: dict[str, PeerRecord] = {}
    for record in records:
        if record.peer_id != own_peer_id and direct_endpoints(record):
            by_peer.setdefault(record.peer_id, record)
    return [by_peer[p] for p in sorted(by_peer)]


def pick_helpers(records: Iterable[PeerRecord], own_peer_id: str, rng: random.Random,
                 k: int = MAX_HELPERS) -> list[PeerRecord]:
    """Up to ``k`` other peers with a direct endpoint, at random (one record per peer)."""
    peers = _distinct_peers(records, own_peer_id)
    return rng.sample(peers, min(k, len(peers)))


def pick_relays(records: Iterable[PeerRecord], own_peer_id: str,
                rng: random.Random) -> list[PeerRecord]:
    """The peers offering to relay (``relay=True``) with a direct endpoint, in random order
    (registrations spread over the relays)."""
    relays = [r for r in _distinct_peers(records, own_peer_id) if r.relay]
    rng.shuffle(relays)
    return relays


def relayed_endpoints(relay_endpoint: str, direct: Sequence[str]) -> tuple[str, ...]:
    """What a private node announces: its relayed endpoint first, then its direct ones
    (a LAN peer may reach those), at most ``MAX_ENDPOINTS``."""
    return (relay_endpoint, *(e for e in direct if e != relay_endpoint))[:MAX_ENDPOINTS]


def same_host_only(endpoints: Sequence[str], listen_host: str) -> bool:
    """True if every endpoint is in-memory or the loopback address the node listens on:
    only this machine dials them and NAT does not come into it (a one-machine swarm has
    nothing to check). Another announced address, loopback or not, is checked."""
    for endpoint in endpoints:
        if endpoint.startswith("mem://"):
            continue
        scheme = endpoint.split("://", 1)[0]
        try:
            host, _ = parse_tcp_endpoint(endpoint, scheme)
            if host != listen_host or not ipaddress.ip_address(host).is_loopback:
                return False
        except (ConfigError, ValueError):  # a DNS name or a relay: another machine's
            return False
    return True


def _host_of(endpoint: str) -> str:
    """The IP of a tcp:// or tls:// endpoint, normalised; "" for anything else."""
    scheme = endpoint.split("://", 1)[0]
    if scheme not in ("tcp", "tls"):
        return ""
    try:
        ip = ipaddress.ip_address(parse_tcp_endpoint(endpoint, scheme)[0])
    except (ConfigError, ValueError):
        return ""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)  # (a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d)


def parse_relay_via(value: str) -> str:
    """``HOST:PORT`` of a relay service, checked (ConfigError saying how to write it)."""
    try:
        host, port = parse_tcp_endpoint(f"tcp://{value}")
    except ConfigError:
        raise ConfigError(f"bad relay address {value!r}",
                          hint="write it as HOST:PORT, as the relay node prints it") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"bad relay address {value!r}: port must be in 1..65535")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------- I/O


async def _call(dialer: Transport, record: PeerRecord, msg: m.Message,
                timeout_s: float) -> m.Message:
    """``msg``'s reply from the first of ``record``'s direct endpoints that answers."""
    error: LayerchainError | None = None
    for endpoint in direct_endpoints(record):
        try:
            conn = await asyncio.wait_for(
                dialer.connect(endpoint, peer_id=record.peer_id), timeout_s)
        except (LayerchainError, asyncio.TimeoutError) as failed:
            error = failed if isinstance(failed, LayerchainError) else None
            continue
        rpc = RpcClient(conn)
        try:
            return await rpc.call(msg, timeout=timeout_s)
        finally:
            await rpc.close()
    raise error or LimitExceeded(f"peer {record.peer_id} has no endpoint that answers")


async def check_reachability(
    dialer: Transport,
    endpoint: str,
    peer_id: str,
    helpers: Sequence[PeerRecord],
    probes: DialBackProbes,
    timeout_s: float = DIAL_BACK_TIMEOUT_S,
) -> Reachability:
    """Ask ``helpers`` (at once) to dial ``endpoint`` back; public iff a probe arrived.

    With no helper (the first node of a swarm) the node is taken as public: there is nobody
    to serve yet, and a relay needs a reachable peer anyway."""
    if not helpers:
        return Reachability(True, (), (), "no peer to ask yet: taken as reachable")

    async def ask(helper: PeerRecord) -> bool:
        nonce = probes.expect()
        try:
            reply = await _call(dialer, helper, m.DialBack(0, endpoint, peer_id, nonce),
                                timeout_s * 2)  # (the helper's own dial takes up to timeout_s)
            if isinstance(reply, m.DialBackResult) and reply.error:
                log.info("peer %s could not dial %s back: %s", helper.peer_id, endpoint,
                         reply.error)
        except (LayerchainError, asyncio.TimeoutError) as error:
            log.info("peer %s did not answer a dial-back request: %s", helper.peer_id, error)
        return probes.seen(nonce)

    results = await asyncio.gather(*(ask(h) for h in helpers))
    asked = tuple(h.peer_id for h in helpers)
    reached = tuple(h.peer_id for h, ok in zip(helpers, results) if ok)
    why = (f"{len(reached)} of {len(asked)} peers dialled {endpoint} back" if reached
           else f"none of {len(asked)} peers could dial {endpoint}")
    return Reachability(bool(reached), asked, reached, why)


class DialBackService:
    """A node's side of others' checks: dial the asker back and probe it, a few at a time."""

    def __init__(self, dialer: Transport, timeout_s: float = DIAL_BACK_TIMEOUT_S) -> None:
        self._dialer = dialer
        self._timeout_s = timeout_s
        self._running = 0

    async def dial_back(self, msg: m.DialBack, observed: str = "") -> m.DialBackResult:
        """Dial ``msg.endpoint`` as ``msg.peer_id`` and send the probe; the result says
        why it failed ("" if the probe was answered). A node is nobody's free port
        scanner: with ``observed`` (the asker's address as this node sees it, tcp:// or
        tls://) it dials only that host, as libp2p's AutoNAT does (an asker behind NAT is
        then told no, which is the right answer); busy beyond ``MAX_DIAL_BACKS``; a
        relay:// target proves nothing."""
        if not msg.endpoint.startswith(_DIRECT):
            raise LimitExceeded("a dial-back goes to a direct endpoint (tls://, tcp://)")
        seen, target = _host_of(observed), _host_of(msg.endpoint)
        if seen and target != seen:
            return m.DialBackResult(msg.rid, f"dial-backs go only to the address the request "
                                             f"came from ({seen}), not {target or msg.endpoint}")
        if self._running >= MAX_DIAL_BACKS:
            raise PeerBusy(f"{self._running} dial-backs running, try another peer")
        self._running += 1
        try:
            conn = await asyncio.wait_for(
                self._dialer.connect(msg.endpoint, peer_id=msg.peer_id), self._timeout_s)
            rpc = RpcClient(conn)
            try:
                reply = await rpc.call(m.DialBackProbe(0, msg.nonce), timeout=self._timeout_s)
            finally:
                await rpc.close()
        except asyncio.TimeoutError:
            return m.DialBackResult(msg.rid, f"{msg.endpoint}: no answer within "
                                             f"{self._timeout_s:g} s")
        except LayerchainError as error:
            return m.DialBackResult(msg.rid, f"{msg.endpoint}: {error}"[:300])
        finally:
            self._running -= 1
        if not (isinstance(reply, m.Pong) and reply.nonce == msg.nonce):
            return m.DialBackResult(msg.rid, f"{msg.endpoint} answered the probe wrongly")
        return m.DialBackResult(msg.rid, "")


async def find_relay(dialer: Transport, relays: Sequence[PeerRecord],
                     timeout_s: float = DIAL_BACK_TIMEOUT_S) -> str:
    """``HOST:PORT`` of the first relay service among ``relays`` that answers (the host
    this node reached the relay's node at, the port it offers); "" if none does."""
    for record in relays:
        for endpoint in direct_endpoints(record):
            if endpoint.startswith("mem://"):
                continue
            with contextlib.suppress(LayerchainError, asyncio.TimeoutError):
                conn = await asyncio.wait_for(
                    dialer.connect(endpoint, peer_id=record.peer_id), timeout_s)
                rpc = RpcClient(conn)
                try:
                    offer = await rpc.call(m.RelayQuery(0), timeout=timeout_s)
                finally:
                    await rpc.close()
                if isinstance(offer, m.RelayOffer) and offer.port:
                    host, _ = parse_tcp_endpoint(endpoint, endpoint.split("://", 1)[0])
                    return format_tcp_endpoint(host, offer.port).removeprefix("tcp://")
    return ""

"""Which addresses a node announces: the ones other machines can dial.

A node listening on the wildcard (``0.0.0.0`` or ``::``) accepts connections on every
interface, but the wildcard itself is no address anyone can dial (``records.check_endpoint``
refuses it). So the node announces, in order of preference (``announce_hosts``, pure):

1. ``--announce-host HOST`` if given, and nothing else (a port-forwarded router, a
   container's published address: only the operator knows it);
2. else, for a wildcard listener: the address of the interface that routes to the node's
   initial peers (``route_source``: a UDP socket "connected" to the peer's IP, which sends
   no packet, tells which local address the kernel would use), then every other
   non-loopback, non-link-local interface address of the listener's family (IPv4 for
   ``0.0.0.0``, IPv6 for ``::``: asyncio and libp2p bind ``::`` IPv6-only), at most
   ``MAX_ANNOUNCED`` in all;
3. for a listener bound to one address: that address.

Loopback addresses are announced only when nothing else is left, which happens only on a
machine with no network (or a node listening on loopback: a single-host swarm). The port
is the listener's unless ``--announce-port`` overrides it.

``announce_hosts``, ``announced_endpoints``, ``announce_multiaddrs``, ``peer_hosts`` and
``unreachable_from_peers`` are pure (unit-tested with literal interface lists);
``interface_addresses`` and ``route_source`` read the machine, nothing else. A DNS name in
``--announce-host`` is passed through as given.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psutil

from layerchain.discovery.records import MAX_ENDPOINTS, check_endpoint
from layerchain.errors import ConfigError, ProtocolError

MAX_ANNOUNCED = MAX_ENDPOINTS - 1  # direct addresses announced at most: a record holds
# MAX_ENDPOINTS endpoints, and one stays free for a relay:// endpoint
_ENDPOINT = re.compile(r"(?P<scheme>[a-z]+)://(?P<host>\[[^\]]*\]|[^:/\[\]]+):(?P<port>[0-9]+)")


@dataclass(frozen=True)
class InterfaceAddress:
    """One IP address of one network interface of this machine."""

    interface: str  # the interface's name, e.g. "eth0"
    address: str  # the IP address, no brackets, no scope id: "10.0.0.7", "fd00::7"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None


def is_wildcard(host: str) -> bool:
    """Whether ``host`` is the unspecified address a listener binds to take every interface."""
    ip = _ip(host)
    return ip is not None and ip.is_unspecified


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback IP address (127.0.0.0/8, ::1) or ``localhost``."""
    ip = _ip(host)
    return host == "localhost" if ip is None else ip.is_loopback


def _dialable(address: str, ipv6: bool) -> bool:
    ip = _ip(address)
    if ip is None or ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_multicast:
        return False  # link-local: needs a scope id no other machine shares
    return ip.version == (6 if ipv6 else 4)


def check_announce_host(host: str) -> str:
    """``host`` if it can go into an endpoint of a record (``records.check_endpoint``: a
    DNS name or an IP address in standard form, not the wildcard; IPv6 with or without
    brackets), else ConfigError. "" (no override) passes."""
    if host == "":
        return host
    if is_wildcard(host):
        raise ConfigError(f"announce_host {host!r} is the wildcard, which no peer can dial",
                          hint="give the address other machines reach this node at")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        check_endpoint(join_endpoint("tcp", bare, 1))
    except ProtocolError:
        raise ConfigError(
            f"announce_host {host[:64]!r} is neither a DNS name nor an IP address in "
            "standard form"
        ) from None
    return host


def announce_hosts(
    listen_host: str,
    interfaces: Iterable[InterfaceAddress],
    route_sources: Sequence[str] = (),
    announce_host: str = "",
) -> tuple[str, ...]:
    """Pure: the hosts a node listening on ``listen_host`` announces, best first.

    ``interfaces``: this machine's addresses (``interface_addresses()``); ``route_sources``:
    the local addresses that route to the node's initial peers (``route_source``), best
    first; ``announce_host``: the operator's override. See the module docstring for the
    rules. Never empty; IPv6 addresses come without brackets.
    """
    if announce_host:
        return (check_announce_host(announce_host).strip("[]"),)
    if not is_wildcard(listen_host):
        return (listen_host.strip("[]"),)
    listen_ip = _ip(listen_host)
    ipv6 = listen_ip is not None and listen_ip.version == 6
    local = [i.address for i in interfaces]
    ordered = [a for a in route_sources if _dialable(a, ipv6) and a in local]
    others = [a for a in local if _dialable(a, ipv6)]
    hosts = list(dict.fromkeys(ordered + others))[:MAX_ANNOUNCED]
    if hosts:
        return tuple(hosts)
    return ("::1",) if ipv6 else ("127.0.0.1",)


def split_endpoint(endpoint: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of ``SCHEME://HOST:PORT`` (host without brackets), or
    ConfigError."""
    match = _ENDPOINT.fullmatch(endpoint)
    if match is None:
        raise ConfigError(f"endpoint {endpoint[:64]!r} is not SCHEME://HOST:PORT")
    return match["scheme"], match["host"].strip("[]"), int(match["port"])


def join_endpoint(scheme: str, host: str, port: int) -> str:
    """``SCHEME://HOST:PORT``, an IPv6 host in brackets."""
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def announced_endpoints(listen_endpoint: str, hosts: Sequence[str], port: int = 0
                        ) -> tuple[str, ...]:
    """Pure: the endpoints of a listener bound at ``listen_endpoint``, reached at ``hosts``
    (``announce_hosts``) on ``port`` (0: the listener's own). A ``mem://`` endpoint, or no
    hosts, leaves the listener's endpoint as it is."""
    if listen_endpoint.startswith("mem://"):
        return (listen_endpoint,)
    scheme, bound, bound_port = split_endpoint(listen_endpoint)
    return tuple(join_endpoint(scheme, h, port or bound_port) for h in (hosts or (bound,)))


def announce_multiaddrs(hosts: Sequence[str], port: int) -> list[str]:
    """Pure: the libp2p multiaddrs of a DHT listening on TCP ``port``, reached at ``hosts``
    (IP literals as ``/ip4``/``/ip6``, names as ``/dns``)."""
    out = []
    for host in hosts:
        ip = _ip(host)
        kind = "dns" if ip is None else f"ip{ip.version}"
        out.append(f"/{kind}/{host.strip('[]')}/tcp/{port}")
    return out


def unreachable_from_peers(announced: Sequence[str], initial_peers: Iterable[str]) -> bool:
    """Pure: whether every host in ``announced`` is loopback while some initial peer is
    not: that peer's machine would dial its own loopback (a node started without
    ``--host 0.0.0.0`` joining a swarm across machines)."""
    return all(is_loopback(h) for h in announced) and any(
        not is_loopback(h) for h in peer_hosts(initial_peers))


def peer_hosts(multiaddrs: Iterable[str]) -> list[str]:
    """Pure: the IP addresses or DNS names in ``/ip4|ip6|dns|dns4|dns6/HOST/...``
    multiaddrs, in order, without duplicates; others are skipped."""
    hosts = []
    for addr in multiaddrs:
        parts = addr.split("/")
        if len(parts) > 2 and parts[0] == "" and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6"):
            hosts.append(parts[2])
    return list(dict.fromkeys(hosts))


# ---------------------------------------------------------------- reading the machine


def interface_addresses() -> list[InterfaceAddress]:
    """Every IPv4 and IPv6 address of every interface that is up (psutil), as listed."""
    stats = psutil.net_if_stats()
    out = []
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                out.append(InterfaceAddress(name, addr.address.split("%")[0]))
    return out


def route_source(host: str) -> str | None:
    """The local address the kernel would send from to reach ``host`` (an IP literal or a
    name, resolved here), or None if there is no route. Sends no packet: connecting a UDP
    socket only picks a route. Blocking (a name lookup): call it off the event loop."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), 9, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, target in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.connect(target)
                return str(probe.getsockname()[0]).split("%")[0]
        except OSError:
            continue
    return None


def local_announce_hosts(listen_host: str, initial_peers: Sequence[str],
                         announce_host: str = "") -> tuple[str, ...]:
    """``announce_hosts`` for this machine: its interfaces, and the routes to the hosts of
    ``initial_peers`` (multiaddrs). Blocking: call it off the event loop."""
    if announce_host or not is_wildcard(listen_host):
        return announce_hosts(listen_host, (), (), announce_host)
    sources = [route_source(h) for h in peer_hosts(initial_peers)]
    return announce_hosts(listen_host, interface_addresses(),
                          [s for s in sources if s is not None])

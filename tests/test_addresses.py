"""Which addresses a node announces (discovery.addresses): pure rules over literal interface
lists, plus the two small readers of this machine."""

from __future__ import annotations

import pytest

from layerchain.discovery.addresses import (
    MAX_ANNOUNCED,
    InterfaceAddress,
    announce_hosts,
    announce_multiaddrs,
    announced_endpoints,
    interface_addresses,
    local_announce_hosts,
    peer_hosts,
    route_source,
    unreachable_from_peers,
)
from layerchain.discovery.identity import Identity
from layerchain.discovery.records import MAX_ENDPOINTS, PeerRecord, check_endpoint
from layerchain.errors import ConfigError
from layerchain.types import Span

# a host on two LANs and a VPN, with loopback, link-local and an IPv6 ULA
HOST = [
    InterfaceAddress("lo", "127.0.0.1"),
    InterfaceAddress("lo", "::1"),
    InterfaceAddress("eth0", "192.168.1.7"),
    InterfaceAddress("eth0", "fe80::1c2:3ff:fe4d:5e6f"),
    InterfaceAddress("eth0", "fd00::7"),
    InterfaceAddress("eth1", "10.20.0.7"),
    InterfaceAddress("docker0", "169.254.3.1"),
    InterfaceAddress("wg0", "100.64.0.7"),
]


def test_a_wildcard_listener_announces_first_the_address_routing_to_its_peers():
    # the initial peer is on eth1's subnet: that address first, then the others in order
    assert announce_hosts("0.0.0.0", HOST, route_sources=["10.20.0.7"]) == (
        "10.20.0.7", "192.168.1.7", "100.64.0.7")


def test_loopback_link_local_and_the_wildcard_are_never_announced_from_a_wildcard():
    hosts = announce_hosts("0.0.0.0", HOST, route_sources=["127.0.0.1"])
    assert hosts == ("192.168.1.7", "10.20.0.7", "100.64.0.7")  # a same-host peer: no 127.*
    assert not {"127.0.0.1", "::1", "0.0.0.0", "169.254.3.1"} & set(hosts)


def test_the_listeners_family_only_as_asyncio_and_libp2p_bind_the_ipv6_wildcard_v6_only():
    assert "fd00::7" not in announce_hosts("0.0.0.0", HOST)
    assert announce_hosts("::", HOST, route_sources=["10.20.0.7"]) == ("fd00::7",)  # no fe80
    many = [InterfaceAddress("eth0", f"fd00::{i}") for i in range(1, 7)]
    assert announce_hosts("::", many, route_sources=["fd00::5"]) == (
        "fd00::5", "fd00::1", "fd00::2")
    assert announce_hosts("::", HOST[:2]) == ("::1",)


def test_at_most_three_addresses_are_announced_leaving_room_for_a_relay():
    many = [InterfaceAddress(f"eth{i}", f"10.0.{i}.1") for i in range(9)]
    assert len(announce_hosts("0.0.0.0", many)) == MAX_ANNOUNCED == MAX_ENDPOINTS - 1


def test_a_route_source_that_is_not_an_interface_of_this_host_is_ignored():
    # a stale or spoofed answer never puts a foreign address first
    assert announce_hosts("0.0.0.0", HOST, route_sources=["203.0.113.5"])[0] == "192.168.1.7"


def test_a_machine_without_network_falls_back_to_loopback():
    lonely = [InterfaceAddress("lo", "127.0.0.1"), InterfaceAddress("lo", "::1")]
    assert announce_hosts("0.0.0.0", lonely) == ("127.0.0.1",)
    assert announce_hosts("0.0.0.0", []) == ("127.0.0.1",)


def test_a_listener_on_one_address_announces_that_address_loopback_included():
    assert announce_hosts("127.0.0.1", HOST) == ("127.0.0.1",)  # single-host swarm
    assert announce_hosts("10.20.0.7", HOST) == ("10.20.0.7",)
    assert announce_hosts("::1", HOST) == ("::1",)


def test_announce_host_overrides_everything():
    assert announce_hosts("0.0.0.0", HOST, ["10.20.0.7"], announce_host="198.51.100.4") == (
        "198.51.100.4",)
    assert announce_hosts("127.0.0.1", HOST, announce_host="node.example.org") == (
        "node.example.org",)
    assert announce_hosts("0.0.0.0", HOST, announce_host="[2001:db8::4]") == ("2001:db8::4",)


@pytest.mark.parametrize("bad", ["0.0.0.0", "::", "not a host", "x" * 300, "a/b", "[::1", "0",
                                 "127.1", "fe80::1%eth0", "[[::1]]"])
def test_an_announce_host_nobody_can_dial_is_refused(bad):
    with pytest.raises(ConfigError, match="announce_host"):
        announce_hosts("0.0.0.0", HOST, announce_host=bad)


def test_endpoints_carry_the_listeners_scheme_and_port_unless_overridden():
    hosts = ("10.20.0.7", "fd00::7")
    assert announced_endpoints("tls://0.0.0.0:4100", hosts) == (
        "tls://10.20.0.7:4100", "tls://[fd00::7]:4100")
    assert announced_endpoints("tcp://[::]:4100", hosts, port=443) == (
        "tcp://10.20.0.7:443", "tcp://[fd00::7]:443")
    assert announced_endpoints("tcp://127.0.0.1:4100", ()) == ("tcp://127.0.0.1:4100",)
    assert announced_endpoints("mem://node-a", hosts) == ("mem://node-a",)
    for endpoint in announced_endpoints("tls://0.0.0.0:4100", hosts):
        assert check_endpoint(endpoint) == endpoint  # every one fits in a record


def test_the_endpoints_of_a_wildcard_listener_make_a_valid_record():
    me = Identity.generate()
    for listen, first in (("0.0.0.0", "tcp://192.168.1.7:4100"), ("::", "tcp://[fd00::7]:4100")):
        endpoints = announced_endpoints(f"tcp://{listen}:4100".replace("::", "[::]"),
                                        announce_hosts(listen, HOST))
        record = PeerRecord.create(me, model_id="m", span=Span(0, 2), endpoints=endpoints,
                                   ms_per_block=1.0)
        assert record.endpoint == first


def test_dht_multiaddrs_and_the_hosts_of_initial_peers():
    assert announce_multiaddrs(("10.20.0.7", "fd00::7", "node.example.org"), 4001) == [
        "/ip4/10.20.0.7/tcp/4001", "/ip6/fd00::7/tcp/4001", "/dns/node.example.org/tcp/4001"]
    peers = ["/ip4/10.1.2.3/tcp/31337/p2p/QmPeer", "/ip6/fd00::9/tcp/1/p2p/QmPeer",
             "/dns4/boot.example.org/tcp/1/p2p/QmB", "/ip4/10.1.2.3/tcp/4/p2p/QmC", "/p2p/QmX"]
    assert peer_hosts(peers) == ["10.1.2.3", "fd00::9", "boot.example.org"]


def test_this_machine_routes_loopback_through_loopback_and_lists_it():
    assert route_source("127.0.0.1") == "127.0.0.1"
    assert route_source("no-such-host.invalid") is None
    assert InterfaceAddress("lo", "127.0.0.1") in interface_addresses()
    # a wildcard node whose peer is on this host announces no loopback unless it must
    hosts = local_announce_hosts("0.0.0.0", ["/ip4/127.0.0.1/tcp/1/p2p/QmPeer"])
    others = [a.address for a in interface_addresses() if not a.address.startswith("127.")
              and ":" not in a.address and not a.address.startswith("169.254.")]
    assert hosts == (tuple(others[:MAX_ANNOUNCED]) or ("127.0.0.1",))


# ---- a real node over real TLS sockets: the client keeps the endpoint that proves the id --


def test_a_dead_or_foreign_first_endpoint_falls_through_to_the_next(tiny_model_dir, reference,
                                                                     tmp_path, caplog):
    """A node announces ``tls://127.0.0.2:P`` first (nothing of its own listens there) and
    ``tls://127.0.0.1:P`` second: generation works, through the second. Then another node
    takes 127.0.0.2:P: it answers, cannot prove the peer id, and is passed over too."""
    import asyncio

    from layerchain.client import AsyncSwarm, ClientConfig
    from layerchain.discovery import MemoryDHT, MemoryDiscovery
    from layerchain.model import SamplingParams, load_head, load_span, load_tokenizer
    from layerchain.model import resolve_model
    from layerchain.node import Node, NodeConfig
    from layerchain.wire.rpc import serve_connection
    from layerchain.wire.transport import Dialer

    model = str(tiny_model_dir("llama", tokenizer=True))
    spec = resolve_model(model)
    prompt, params = "What is the capital of France?", SamplingParams(max_new_tokens=8)

    async def main():
        hub, identity = MemoryDHT(), Identity.generate()
        node = Node(NodeConfig(model=model, data_dir=tmp_path), spec=spec,
                    span=load_span(spec, 0, spec.num_blocks), transport=Dialer(identity),
                    listen_at="tls://127.0.0.1:0", discovery=MemoryDiscovery(hub, identity),
                    identity=identity, announce_hosts=("127.0.0.2", "127.0.0.1"))
        await node.start()
        imposter = None
        try:
            port = int(node.endpoint.rsplit(":", 1)[1])
            assert node.endpoints == (f"tls://127.0.0.2:{port}", f"tls://127.0.0.1:{port}")
            results = []
            for round_ in ("dead", "foreign"):
                if round_ == "foreign":
                    async def serve(conn):
                        await serve_connection(conn, lambda msg: asyncio.sleep(0))

                    imposter = await Dialer(Identity.generate()).listen(
                        f"tls://127.0.0.2:{port}", serve)
                client = AsyncSwarm(spec=spec, head=load_head(spec),
                                    tokenizer=load_tokenizer(spec), discovery=MemoryDiscovery(hub),
                                    transport=Dialer(), config=ClientConfig(audit_rate=0.0))
                try:
                    results.append(await client.generate(prompt, params))
                    assert client.peers._clients[identity.peer_id].endpoint == node.endpoints[1]
                    assert not client.peers.banned()
                finally:
                    await client.close()
            return results
        finally:
            if imposter is not None:
                await imposter.close()
            await node.stop(drain_s=0)

    with caplog.at_level("INFO", logger="layerchain.client.peers"):
        results = asyncio.run(asyncio.wait_for(main(), 120))
    expected = reference(model, prompt, params).token_ids
    assert [r.token_ids for r in results] == [expected, expected]
    skipped = [r.getMessage() for r in caplog.records if "tls://127.0.0.2" in r.getMessage()]
    assert any("is not peer" in m for m in skipped), skipped  # the foreign one was dialled
    assert any("is not peer" not in m for m in skipped), skipped  # and the dead one


def test_a_loopback_node_joining_peers_on_other_machines_is_told_it_is_unreachable():
    far = ["/ip4/10.1.0.2/tcp/4001/p2p/QmPeer"]
    near = ["/ip4/127.0.0.1/tcp/4001/p2p/QmPeer"]
    assert unreachable_from_peers(("127.0.0.1",), far)
    assert not unreachable_from_peers(("127.0.0.1",), near)  # a one-machine swarm
    assert not unreachable_from_peers(("127.0.0.1",), [])  # a new swarm
    assert not unreachable_from_peers(("10.1.0.3",), far)

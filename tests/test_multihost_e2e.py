"""The swarm across emulated hosts (issue 13): real node processes in network namespaces.

One topology for the module (``tests/netlab.py``): a LAN and a "far" subnet joined by a router
whose delay line puts 20 ms between them, and a home behind a NAT. Nodes, started once and
shared (three models: SmolLM2 and two tiny random ones, "tiny" and "near"):

    lan1  smollm2 0:15    lan2  smollm2 15:30    lan3  smollm2 0:15 (a spare)
    far1  smollm2 0:30    far1  tiny 0:2         home1 tiny 2:4 (behind the NAT: the only one)
    lan2  near 0:4        far2  near 0:4  (the same span, 20 ms apart: only the distance differs)

plus a DHT bootstrap on lan1 and a client on ``lanc`` and one on ``farc``, each a process
living on its host (``bench.netlab.RemoteClient``). Every generation is compared token for
token with the single-process model (``generate --local``'s answer).

These are the only multi-host evidence: they run in CI (as root). Where namespaces can't be
built they skip, saying why.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from layerchain.bench.netlab import (
    LabError,
    LabNode,
    RemoteClient,
    intercept,
    start_bootstrap,
    start_node,
    tcp_rtt_ms,
    wait_node,
)
from layerchain.model import SamplingParams
from netlab import build_test_topology

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPT = "What is the capital of France?"
TOKENS = 12
ROUTER_RTT_MS = 20.0  # between the LAN and the far subnet, all along
NODES = (  # (model key, host, blocks, extra args); a node is named "{model}-{host}"
    ("smollm2", "lan1", "0:15", ()), ("smollm2", "lan2", "15:30", ()),
    ("smollm2", "lan3", "0:15", ()), ("smollm2", "far1", "0:30", ()),
    # far1 relays for peers behind NAT (its operator knows it is reachable); home1 finds out
    # it is behind one (no peer can dial it back), so it starts once the relay serves
    ("tiny", "far1", "0:2", ("--relay", "--reachability", "public")),
    ("tiny", "home1", "2:4", ()),
    ("near", "lan2", "0:4", ()), ("near", "far2", "0:4", ()),
)


class Net:
    """What the module's tests share: the lab, its nodes by name, its clients, the models."""

    def __init__(self, lab, peers: list[str], nodes: dict[str, LabNode],
                 clients: dict[str, RemoteClient], models: dict[str, str]) -> None:
        self.lab, self.peers, self.nodes, self.clients = lab, peers, nodes, clients
        self.models = models  # model key -> what to pass as --model

    def on_subnet(self, subnet: str, model: str = "smollm2") -> set[str]:
        """Peer ids of the ``model`` nodes on ``subnet``."""
        return {n.peer_id for n in self.nodes.values()
                if self.lab.hosts[n.host].subnet == subnet and n.name.startswith(f"{model}-")}

    def by_peer(self, peer_id: str) -> LabNode:
        return next(n for n in self.nodes.values() if n.peer_id == peer_id)

    def join_addresses(self, name: str) -> list[str]:
        """What node ``name`` printed for others to join with (``join with: --initial-peers``)."""
        log = (self.lab.workdir / f"{name}.log").read_text(errors="replace")
        return [line.split("--initial-peers", 1)[1].strip()
                for line in log.splitlines() if line.startswith("join with: --initial-peers")]


@pytest.fixture(scope="module")
def net(tmp_path_factory, tiny_model_dir):
    models = {"smollm2": "smollm2", "tiny": str(tiny_model_dir("llama", tokenizer=True)),
              "near": str(tiny_model_dir("qwen2", tokenizer=True))}
    lab = build_test_topology(tmp_path_factory.mktemp("netlab"))
    clients: dict[str, RemoteClient] = {}
    try:
        # the far subnet is 20 ms away from the start, as a real one would be: clients
        # measure their peers with it
        lab.set_delay("r", ROUTER_RTT_MS, between=("lan", "far"))
        peers = start_bootstrap(lab, "lan1")
        assert all("/ip4/10.199." in p for p in peers), peers  # dialable from other hosts
        def start(model: str, host: str, blocks: str, extra: tuple[str, ...]) -> tuple:
            name = f"{model}-{host}"
            return name, (host, *start_node(lab, host, name, blocks, peers,
                                            model=models[model], extra_args=extra))

        started = dict(start(*n) for n in NODES if n[1] != "home1")
        nodes = {"tiny-far1": wait_node(lab, "far1", "tiny-far1", *started.pop("tiny-far1")[1:])}
        started.update(start(*n) for n in NODES if n[1] == "home1")
        nodes.update((name, wait_node(lab, host, name, proc, data_dir))
                     for name, (host, proc, data_dir) in started.items())
        for host in ("lanc", "farc"):
            clients[host] = RemoteClient(lab, host, peers, {"step_timeout_s": 5.0})
        yield Net(lab, peers, nodes, clients, models)
    finally:
        for client in clients.values():
            client.close()
        lab.close()


def _ok(result: dict) -> dict:
    assert result["event"] == "result", result
    return result


def test_nodes_on_four_hosts_form_one_swarm_and_a_client_on_another_host_matches_local(
    net, reference
):
    for node in net.nodes.values():  # on 0.0.0.0, each announces its own host's address
        if node.host == "home1":
            continue  # behind the NAT: its own test
        endpoints = [str(e) for e in node.info["endpoints"]]
        assert endpoints[0].startswith(f"tls://{net.lab.hosts[node.host].address}:"), endpoints
        assert not any("127.0.0.1" in e or "0.0.0.0" in e for e in endpoints), endpoints
        dht = [str(a) for a in node.info["dht_addresses"]]
        assert dht and all(a.startswith("/ip4/10.199.") for a in dht), dht
    expected = reference("smollm2", PROMPT, SamplingParams(max_new_tokens=TOKENS)).token_ids
    result = _ok(net.clients["lanc"].generate(PROMPT, TOKENS))
    assert result["token_ids"] == list(expected)
    assert result["route"] and not result["recoveries"]
    assert {net.by_peer(p).name for p in result["route"]} <= {
        f"{m}-{h}" for m, h, _, _ in NODES if m == "smollm2"}


def test_lan_first_with_20_ms_on_the_router_and_a_far_client_still_completes(net, reference):
    # "near": one node on each side serves the same span of a model whose compute is a
    # fraction of a millisecond, so only the measured distance tells them apart
    near = net.models["near"]
    near_expected = list(reference(near, PROMPT, SamplingParams(max_new_tokens=TOKENS)).token_ids)
    from_lan = _ok(net.clients["lanc"].generate(PROMPT, TOKENS, model=near))
    from_far = _ok(net.clients["farc"].generate(PROMPT, TOKENS, model=near))
    assert from_lan["token_ids"] == from_far["token_ids"] == near_expected
    assert from_lan["route"] == [net.nodes["near-lan2"].peer_id]  # its LAN peer
    assert from_far["route"] == [net.nodes["near-far2"].peer_id]  # and the far client its own
    # the far client with the nodes of its own subnet left out: SmolLM2 across the 20 ms
    expected = list(reference("smollm2", PROMPT, SamplingParams(max_new_tokens=TOKENS)).token_ids)
    crossing = _ok(net.clients["farc"].generate(PROMPT, TOKENS, ban=net.on_subnet("far")))
    assert crossing["token_ids"] == expected
    assert set(crossing["route"]) <= net.on_subnet("lan"), crossing["route"]
    print(f"near: LAN client {from_lan['tokens_per_s']:.1f} tok/s on its LAN peer, far client "
          f"{from_far['tokens_per_s']:.1f} tok/s on its own; smollm2 across the router "
          f"{crossing['tokens_per_s']:.1f} tok/s")


def test_a_node_behind_nat_serves_the_span_no_one_else_serves(net, reference):
    home = net.nodes["tiny-home1"]
    relay_host = net.lab.hosts["far1"].address
    endpoints = [str(e) for e in home.info["endpoints"]]
    assert endpoints[0].startswith(f"relay://{relay_host}:"), endpoints  # found it was private
    with pytest.raises(LabError):  # no way in from outside the NAT
        net.lab.run("lanc", [sys.executable, "-c", (
            "import socket; socket.create_connection(('%s', 9), timeout=2)"
            % net.lab.hosts["home1"].address)], timeout_s=30)
    tiny = net.models["tiny"]
    expected = list(reference(tiny, PROMPT, SamplingParams(max_new_tokens=TOKENS)).token_ids)
    result = _ok(net.clients["lanc"].generate(PROMPT, TOKENS, model=tiny))
    assert result["token_ids"] == expected
    assert home.peer_id in result["route"]
    print(f"through the NATed node: announced {home.info.get('endpoints', home.info['endpoint'])}")


def test_a_man_in_the_middle_without_the_nodes_key_is_detected_and_routed_around(
    net, reference
):
    expected = list(reference("smollm2", PROMPT, SamplingParams(max_new_tokens=TOKENS)).token_ids)
    victim, spare = net.nodes["smollm2-lan1"], net.nodes["smollm2-lan3"]
    intercept(net.lab, "r", victim, port=7443)
    # a new client, so that every connection it opens meets the man in the middle; it must
    # cross the router: the nodes of its own subnet are left out. It joins through what a
    # LAN node printed ("join with: --initial-peers ..."), not through the bootstrap.
    joins = net.join_addresses("smollm2-lan2")
    assert joins and all(a.startswith(f"/ip4/{net.lab.hosts['lan2'].address}/") for a in joins)
    client = RemoteClient(net.lab, "farc", joins, {"step_timeout_s": 5.0})
    try:
        result = _ok(client.generate(PROMPT, TOKENS, ban=net.on_subnet("far")))
        # with the spare left out too, nothing honest serves 0:15 for this client: an error,
        # never an answer through the man in the middle
        alone = client.generate(PROMPT, TOKENS, ban=[*net.on_subnet("far"), spare.peer_id])
    finally:
        client.close()
    assert alone["event"] == "error" and alone["type"] == "NoRoute", alone
    assert result["token_ids"] == expected
    assert victim.peer_id not in result["route"] and spare.peer_id in result["route"]
    detected = [w for w in result["warnings"] if victim.peer_id in w]
    assert detected, result["warnings"]
    log = (net.lab.workdir / "mitm-r.log").read_text()
    assert "intercepted a connection" in log  # the attacker was on the path
    print(f"detected: {detected[0]}; with no other peer: {alone['message']}")


def test_kill_9_a_node_on_another_host_mid_generation_gives_identical_output(net, reference):
    params = SamplingParams(max_new_tokens=2 * TOKENS)
    expected = list(reference("smollm2", PROMPT, params).token_ids)
    killed = None
    # An auditing client shows a token only once verified, steps after computing it; this
    # one shows each as computed, so that pausing at token 3 puts the kill between steps.
    client = RemoteClient(net.lab, "lanc", net.peers, {"step_timeout_s": 5.0, "audit_rate": 0})
    try:
        for event in client.stream(PROMPT, 2 * TOKENS, pause_at=3):
            if event["event"] == "token" and event["index"] == 3:
                first_hop = net.by_peer(event["route"][0])  # lan1, lan3 (0:15) or far1 (0:30)
                os.kill(first_hop.proc.pid, signal.SIGKILL)
                first_hop.proc.wait()
                killed, t_kill = first_hop, time.monotonic()
                client.resume()  # token 4 is the first step after the kill
    finally:
        client.close()
    result = _ok(event)
    assert killed is not None
    assert result["token_ids"] == expected
    assert [r["peer_id"] for r in result["recoveries"]] == [killed.peer_id]
    assert killed.peer_id not in result["route"]
    print(f"killed {killed.name} on {killed.host} at token 3; recovered: "
          f"{result['recoveries'][0]['reason']} ({time.monotonic() - t_kill:.1f} s to the end)")


def test_the_delay_line_adds_the_round_trip_it_is_set_to_between_subnets_only(net):
    """Last: it changes the router's delay, which the clients above measured."""
    lab, figures = net.lab, {}
    try:
        for rtt_ms in (0.0, ROUTER_RTT_MS, 50.0):
            lab.set_delay("r", rtt_ms)
            figures[rtt_ms] = tcp_rtt_ms(lab, "lanc", "far1")
        lan = tcp_rtt_ms(lab, "lanc", "lan2")
    finally:
        lab.set_delay("r", ROUTER_RTT_MS)
    base = figures[0.0]
    for rtt_ms in (ROUTER_RTT_MS, 50.0):
        added = {q: figures[rtt_ms][q] - base[q] for q in ("p10", "p50", "p90")}
        print(f"delay line set to {rtt_ms:g} ms: TCP round trip +{added['p50']:.2f} ms (p50; "
              f"p10 +{added['p10']:.2f}, p90 +{added['p90']:.2f})")
        # p10: the line's own accuracy (about +0.3 ms on an idle machine); p50 also carries
        # the scheduling delays of a loaded one (2 cores shared with the nodes)
        assert rtt_ms - 0.1 <= added["p10"] <= rtt_ms + 1.0
        assert rtt_ms - 0.1 <= added["p50"] <= rtt_ms + 5.0
    assert base["p50"] < 1.0 and lan["p50"] < 1.0  # bridged LAN traffic never meets the line

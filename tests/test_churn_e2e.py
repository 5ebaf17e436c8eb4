"""Churn: joining, crashing and leaving nodes, and the client's view of them.

Fast tests (in-memory discovery and transport) pin the client's refresh rules: a view
whose usable peers leave a gap is re-read at once however fresh it is, and a banned peer
that comes back at a new endpoint stays banned (bans stick to identities).

The slow tests use real node processes on loopback, one swarm for the module: A serves
0:15 (drains for up to 20 s on SIGTERM), B serves 15:30 with short-lived DHT records
(TTL 8 s, refreshed every 2 s). The client re-reads the swarm only when it must (its
``refresh_s`` is 10 minutes). The tests run in order:

1. mid-generation, C (15:30) joins; then B is killed with -9: the client's failover finds
   C although its view was read before C existed, and the answer does not change; B's
   records, which nobody withdrew, vanish once their TTL runs out;
2. mid-generation, A gets SIGTERM: it withdraws its records at once (long before their
   60 s TTL), refuses new sessions with ``busy``, lets the open generation finish with the
   reference tokens, then exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from layerchain.errors import PeerBusy
from layerchain.local import start_node, swarm_down, swarm_up, wait_ready
from layerchain.model import DEFAULT_MODEL, SamplingParams
from layerchain.types import Span

pytestmark = pytest.mark.timeout(300)

PROMPT = "Name three rivers in Europe."
PARAMS = SamplingParams(max_new_tokens=12)
SHORT_TTL_S = 8.0  # B's and C's records live this long after each announcement
SHORT_TTL_ARGS = ("--record-ttl", str(SHORT_TTL_S), "--announce-every", "2")
DRAIN_S = 20.0  # A lets open sessions finish for up to this long on SIGTERM


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # our child: reap it once it exits
        return done == 0
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------------------ the client's view, fast


class FakePeers:
    """Records announced in an in-memory DHT, each with an endpoint that answers pings."""

    def __init__(self) -> None:
        from layerchain.discovery import MemoryDHT
        from layerchain.wire import MemoryNetwork

        self.hub, self.wire = MemoryDHT(), MemoryNetwork()
        self.listeners: list = []

    async def announce(self, identity, start: int, end: int, name: str) -> None:
        from layerchain.discovery import MemoryDiscovery, PeerRecord
        from layerchain.wire import MemoryTransport, serve_connection

        async def nothing(msg):  # pings are answered by serve_connection itself
            raise AssertionError(msg)

        transport = MemoryTransport(self.wire)
        self.listeners.append(
            await transport.listen(f"mem://{name}", lambda conn: serve_connection(conn, nothing))
        )
        record = PeerRecord.create(identity, model_id="m", span=Span(start, end),
                                   endpoint=f"mem://{name}", ms_per_block=1.0,
                                   expires_at=time.time() + 60)
        await MemoryDiscovery(self.hub, identity).announce(record)

    def view(self, **config):
        from layerchain.client import ClientConfig
        from layerchain.client.peers import PeerView
        from layerchain.discovery import MemoryDiscovery
        from layerchain.wire import MemoryTransport

        return PeerView(MemoryDiscovery(self.hub), MemoryTransport(self.wire), "m", 4,
                        ClientConfig(**config))


def test_a_fresh_view_is_reread_at_once_when_its_usable_peers_leave_a_gap():
    from layerchain.discovery import Identity

    async def main():
        peers = FakePeers()
        a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
        await peers.announce(a, 0, 2, "a")
        await peers.announce(b, 2, 4, "b")
        view = peers.view(refresh_s=600.0)
        await view.refresh(force=True)
        await peers.announce(c, 2, 4, "c")  # joins after the view was read
        await view.refresh()
        assert set(view.records) == {a.peer_id, b.peer_id}  # fresh, no gap: not re-read
        view.ban(b.peer_id, "test")  # now blocks 2:4 have no usable peer
        await view.refresh()
        assert set(view.records) == {a.peer_id, b.peer_id, c.peer_id}
        assert [h.peer_id for h in view.plan(2, 4).hops] == [c.peer_id]
        await view.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_banned_peer_back_at_a_new_endpoint_stays_banned_and_its_next_ban_is_longer():
    from layerchain.discovery import Identity

    async def main():
        peers = FakePeers()
        a = Identity.generate()
        await peers.announce(a, 0, 4, "a-first-run")
        view = peers.view(ban_base_s=60.0)
        await view.refresh(force=True)
        view.ban(a.peer_id, "test")
        await asyncio.sleep(0.01)  # the new record must expire later than the old one
        await peers.announce(a, 0, 4, "a-restarted")
        await view.refresh(force=True)
        assert view.records[a.peer_id].endpoint == "mem://a-restarted"
        assert a.peer_id in view.banned()  # a ban sticks to the identity, not the endpoint
        view.unban(a.peer_id)  # an operator (or the ban's end) lifts it
        view.ban(a.peer_id, "test again")
        assert view._banned_until[a.peer_id] - time.monotonic() > 100  # 2nd ban: 120 s
        await view.close()

    asyncio.run(asyncio.wait_for(main(), 20))


# ------------------------------------------------------------------ real processes, slow


@pytest.fixture(scope="module")
def churn(tmp_path_factory):
    """(local swarm, client): A 0:15, B 15:30; the tests add and remove nodes."""
    from layerchain.client import Swarm

    state = tmp_path_factory.mktemp("churn")
    local = swarm_up(
        state, [Span(0, 15), Span(15, 30)],
        node_args=[("--drain", str(DRAIN_S)), SHORT_TTL_ARGS],
    )
    try:
        # refresh_s: 10 min, so only a gap in the usable peers makes a failover re-read.
        # audit_rate 0: tokens shown as computed (not once verified), so what the test does
        # at token k happens between steps
        with Swarm(local.initial_peers, step_timeout_s=5.0, ban_base_s=60.0,
                   refresh_s=600.0, audit_rate=0.0) as client:
            yield local, client
    finally:
        swarm_down(state, quiet=True)


def _visible(client, timeout: float = 20.0) -> set[str]:
    """Peer ids with live records, read from the DHT now (the client's own DHT node)."""
    core = client.core
    find = core.discovery.find(core.spec.model_id, core.spec.num_blocks)
    return {r.peer_id for r in client._run(asyncio.wait_for(find, timeout))}


def _wait_gone(client, peer_id: str, within_s: float) -> float:
    """Seconds until ``peer_id`` has no live record; fails after ``within_s``."""
    t0 = time.monotonic()
    while peer_id in _visible(client):
        assert time.monotonic() - t0 < within_s, f"{peer_id} still announced after {within_s} s"
        time.sleep(0.25)
    return time.monotonic() - t0


@pytest.mark.slow
def test_a_node_joining_mid_generation_takes_over_a_killed_hop_whose_records_then_expire(
    churn, reference
):
    local, client = churn
    a, b = local.nodes
    gen = client.stream(PROMPT, PARAMS)
    for event in gen:
        if event.index == 1:  # C joins while the generation waits for the next token
            proc, data_dir = start_node(local.state_dir, "node-2", Span(15, 30),
                                        local.initial_peers, extra_args=SHORT_TTL_ARGS)
            local.nodes.append({"pid": proc.pid, "peer_id": "", "start": 15, "end": 30,
                                "endpoint": ""})
            local.save()
            local.nodes[2] = wait_ready(proc, data_dir, local.state_dir / "node-2.log", 120)
            local.save()
            assert local.nodes[2]["peer_id"] not in client.core.peers.records  # not seen yet
        elif event.index == 3:
            os.kill(b["pid"], signal.SIGKILL)
            t_kill = time.monotonic()
    res = gen.result
    c = local.nodes[2]
    assert res.token_ids == reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids
    assert [r.peer_id for r in res.recoveries] == [b["peer_id"]]
    assert [h.peer_id for h in res.recoveries[0].replacement] == [c["peer_id"]]
    assert [h.peer_id for h in res.route] == [a["peer_id"], c["peer_id"]]

    # Nobody withdrew B's records: still there right after the kill, gone after their TTL.
    seen = _visible(client)
    assert b["peer_id"] in seen and c["peer_id"] in seen
    assert time.monotonic() - t_kill < SHORT_TTL_S - 2.0  # so B was seen before expiry
    gone_s = time.monotonic() - t_kill + _wait_gone(client, b["peer_id"], SHORT_TTL_S + 10)
    assert gone_s <= SHORT_TTL_S + 5.0, gone_s
    print(f"killed node's records expired {gone_s:.1f} s after the kill (TTL {SHORT_TTL_S:g} s)")


@pytest.mark.slow
def test_a_node_stopping_gracefully_withdraws_at_once_and_finishes_its_generation(
    churn, reference
):
    from layerchain.wire import Dialer, OpenSession, RpcClient

    local, client = churn
    a = local.nodes[0]
    assert a["peer_id"] in _visible(client)

    async def try_open(endpoint: str) -> Exception | None:
        rpc = RpcClient(await Dialer().connect(endpoint))
        try:
            await rpc.call(OpenSession(0, "probe", client.core.spec.model_id, 0, 15, 16), 5.0)
        except Exception as error:  # noqa: BLE001 - the error is the result
            return error
        finally:
            await rpc.close()
        return None

    gen = client.stream(PROMPT, PARAMS)
    for event in gen:
        if event.index == 2:  # A is asked to leave while it serves this generation
            os.kill(a["pid"], signal.SIGTERM)
            withdrawn_s = _wait_gone(client, a["peer_id"], 10.0)
            refused = asyncio.run(try_open(a["endpoint"]))
            t_resume = time.monotonic()
    res = gen.result
    assert withdrawn_s < 5.0, withdrawn_s  # its TTL is 60 s: this was a withdrawal
    assert isinstance(refused, PeerBusy) and "shutting down" in str(refused), refused
    # finished on the draining node: no failover needed
    assert res.token_ids == reference(DEFAULT_MODEL, PROMPT, PARAMS).token_ids
    assert a["peer_id"] in [h.peer_id for h in res.route] and not res.recoveries
    while _alive(a["pid"]):  # its last session closed with the generation: it exits
        assert time.monotonic() - t_resume < DRAIN_S, "node did not exit after draining"
        time.sleep(0.1)
    exit_s = time.monotonic() - t_resume
    assert a["peer_id"] not in _visible(client)
    print(f"records withdrawn {withdrawn_s:.2f} s after SIGTERM; exited {exit_s:.1f} s "
          "after the generation resumed")

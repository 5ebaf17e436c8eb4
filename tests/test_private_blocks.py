"""--private-blocks N (issue 13 item 5): the client runs blocks [0, N) itself, so no peer
sees the prompt's embedding rows, and the answer stays the single-process model's.

Fast tier: an in-process swarm (memory transport, real model code); the real-process run
over the DHT, with nodes listening on every interface, is marked slow.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import torch
from memswarm import MemorySwarm

from layerchain.errors import ConfigError, NoRoute
from layerchain.model import DEFAULT_MODEL, SamplingParams, load_head
from layerchain.wire import messages as m

PROMPT = "What is the capital of France?"
PARAMS = SamplingParams(max_new_tokens=16)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


def record_steps(node, seen: list[torch.Tensor], sent: list[torch.Tensor] | None = None
                 ) -> None:
    """Keep every hidden-state tensor ``node`` is sent in a Step (and, in ``sent``, every
    one it returns)."""
    original = node.handle

    async def handle(msg, *args):
        if isinstance(msg, m.Step):
            seen.append(msg.hidden.detach().clone())
        reply = await original(msg, *args)
        if sent is not None and isinstance(reply, m.StepResult):
            sent.append(reply.hidden.detach().clone())
        return reply

    node.handle = handle


def token_ids_seen(spec, seen: list[torch.Tensor]) -> list[int]:
    """The token ids a peer recovers from what it was sent: each row that is exactly a row of
    the public embedding table names its token."""
    head = load_head(spec)
    table = head.embed(torch.arange(spec.config.vocab_size).unsqueeze(0))[0]  # [V, H]
    found = []
    for hidden in seen:
        for row in hidden[0]:  # [H]
            match = (table == row).all(dim=1).nonzero()
            if len(match):
                found.append(int(match[0, 0]))
    return found


def test_without_private_blocks_the_first_hop_reads_the_prompt_token_by_token(
    tiny_model, reference, tmp_path
):
    """The leak the flag closes: the first hop maps its input back to the exact token ids."""
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            first = await swarm.add_node(0, 2, tmp_path / "a")
            await swarm.add_node(2, 4, tmp_path / "b")
            seen: list[torch.Tensor] = []
            record_steps(first, seen)
            client = swarm.client(audit_rate=0.0)
            result = await client.generate(PROMPT, PARAMS)
            return result, seen, client.spec
        finally:
            await swarm.close()

    result, seen, spec = run(main())
    assert result.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids
    ids = token_ids_seen(spec, seen)
    assert ids == [*result.prompt_token_ids, *result.token_ids[:-1]]  # every token, in order


def test_private_blocks_keep_the_answer_and_no_peer_sees_an_embedding_row(
    tiny_model, reference, tmp_path
):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:  # nobody serves block 0: the client does
            nodes = [await swarm.add_node(1, 3, tmp_path / "a"),
                     await swarm.add_node(3, 4, tmp_path / "b")]
            seen: list[torch.Tensor] = []
            last_out: list[torch.Tensor] = []
            record_steps(nodes[0], seen)
            record_steps(nodes[1], seen, last_out)
            client = swarm.client(private_blocks=1, audit_rate=0.0)
            result = await client.generate(PROMPT, PARAMS)
            return result, seen, last_out, client.spec
        finally:
            await swarm.close()

    result, seen, last_out, spec = run(main())
    expected = reference(tiny_model, PROMPT, PARAMS)
    assert result.token_ids == expected.token_ids
    assert result.text == expected.text
    assert [(h.start, h.end) for h in result.route] == [(1, 3), (3, 4)]
    assert seen and token_ids_seen(spec, seen) == []
    # What the flag does not hide (README): the last hop applies the public head to its own
    # output and, under greedy decoding, reads every generated token.
    head = load_head(spec)
    read = [int(head.logits(out[:, -1:])[0, -1].argmax()) for out in last_out]
    assert tuple(read) == result.token_ids


def test_each_generation_gets_a_fresh_private_cache(tiny_model, reference, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            await swarm.add_node(2, 4, tmp_path)
            client = swarm.client(private_blocks=2, audit_rate=0.0)
            return [await client.generate(PROMPT, PARAMS) for _ in range(2)]
        finally:
            await swarm.close()

    first, second = run(main())
    assert first.token_ids == second.token_ids == reference(tiny_model, PROMPT, PARAMS).token_ids


def test_private_blocks_with_a_rollback_still_give_the_local_answer(
    tiny_model, reference, tmp_path
):
    """An audit catches a cheater after the private blocks; the rollback cuts the client's
    own cache back too, or the positions after it would be wrong."""
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            cheater = await swarm.add_node(1, 3, tmp_path / "cheater", misbehave="noise")
            await swarm.add_node(3, 4, tmp_path / "next")
            for i in range(2):  # an auditor and a referee, slower so routes take the cheater
                await swarm.add_node(1, 3, tmp_path / f"spare{i}", emulate_latency_ms=5)
                await swarm.add_node(3, 4, tmp_path / f"spare-next{i}", emulate_latency_ms=5)
            client = swarm.client(private_blocks=1, audit_rate=0.5)
            return await client.generate(PROMPT, SamplingParams(max_new_tokens=24)), cheater
        finally:
            await swarm.close()

    result, cheater = run(main())
    assert [d.peer_id for d in result.disputes] == [cheater.peer_id]  # a rollback happened
    expected = reference(tiny_model, PROMPT, SamplingParams(max_new_tokens=24))
    assert result.token_ids == expected.token_ids


def test_without_private_blocks_a_swarm_missing_block_0_has_no_route(tiny_model, tmp_path):
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            await swarm.add_node(1, 4, tmp_path)
            await swarm.client().generate(PROMPT, PARAMS)
        finally:
            await swarm.close()

    with pytest.raises(NoRoute, match="blocks 0:1"):
        run(main())


@pytest.mark.parametrize("bad", [-1, 4, 99, True, 1.5])
def test_private_blocks_must_leave_blocks_to_route(tiny_model, bad):
    with pytest.raises(ConfigError, match="private_blocks"):
        MemorySwarm(tiny_model).client(private_blocks=bad)


# ---- one real-process run: nodes on every interface, the DHT across "hosts", the CLI ----


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerchain", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_nodes_on_every_interface_announce_dialable_addresses_and_private_blocks_match_local(
    tmp_path, reference
):
    """Two node processes listening on 0.0.0.0 (the second joins through the address the
    first prints), serving blocks 10:30; ``generate --private-blocks 10`` through them is
    ``generate --local`` token for token.

    The first says ``--reachability public``, which it would conclude anyway (no peer to
    ask yet), so it does not wait SETTLE_WAIT_S (20 s) for a peer to ask before it serves;
    the second checks its reachability as any node does (``auto``: it asks the first)."""
    from layerchain.discovery.addresses import interface_addresses, is_loopback

    dialable = [a.address for a in interface_addresses()
                if not is_loopback(a.address) and ":" not in a.address
                and not a.address.startswith("169.254.")]
    if not dialable:
        pytest.skip("this machine has no non-loopback IPv4 address to announce")
    procs: list[subprocess.Popen] = []

    def start(name: str, blocks: str, *join: str) -> dict:
        data = tmp_path / name
        with open(tmp_path / f"{name}.log", "w") as log:  # the child keeps its own copy
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "layerchain", "node", "start", "--blocks", blocks,
                 "--host", "0.0.0.0", "--data-dir", str(data), "--threads", "1", *join],
                stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and procs[-1].poll() is None:
            if (data / "node.json").exists():
                return json.loads((data / "node.json").read_text())
            time.sleep(0.1)
        raise AssertionError((tmp_path / f"{name}.log").read_text()[-2000:])

    try:
        first = start("a", "10:20", "--new-swarm", "--reachability", "public")
        for endpoint in first["endpoints"]:
            assert "0.0.0.0" not in endpoint and "127.0.0.1" not in endpoint
        assert first["endpoint"] == first["endpoints"][0]
        join = first["dht_addresses"][0]
        assert not any(x in join for x in ("/0.0.0.0/", "/127.0.0.1/"))
        second = start("b", "20:30", "--initial-peers", join)
        assert second["endpoints"][0].split("//")[1].split(":")[0] in dialable
        params = SamplingParams(max_new_tokens=12)
        done = cli("generate", "--initial-peers", second["dht_addresses"][0], "--prompt", PROMPT,
                   "--max-new-tokens", "12", "--private-blocks", "10", "--json")
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["token_ids"] == list(reference(DEFAULT_MODEL, PROMPT, params).token_ids)
        assert [(h["start"], h["end"]) for h in out["route"]] == [(10, 20), (20, 30)]
        assert f"join with: --initial-peers {join}" in (tmp_path / "a.log").read_text()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.parametrize("command", [["generate", "--prompt", "Hi"],
                                     ["api", "serve", "--port", "0"]])
def test_a_bad_private_blocks_fails_before_joining_the_swarm(command, tmp_path):
    """`--private-blocks 30` on a 30-block model: one line, no DHT started (the initial
    peer is unreachable: a join would fail differently, after seconds)."""
    from typer.testing import CliRunner

    from layerchain.cli.main import app

    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWHSfjBWMPDr3sd6kRJSR1JHpXFpmhP1v3ucgRDT8PqaWr"
    done = CliRunner().invoke(app, [*command, "--initial-peers", dead, "--private-blocks", "30",
                                    "--data-dir", str(tmp_path)])
    assert done.exit_code != 0
    assert "private_blocks must be an integer in 0..29" in done.output


def test_the_swarm_state_counts_only_the_routed_blocks(tiny_model, tmp_path):
    """Coverage, health and the most a route can cost (what the gateway holds on a key)
    leave the client's own blocks out."""
    async def main():
        swarm = MemorySwarm(tiny_model)
        try:
            await swarm.add_node(2, 4, tmp_path / "a", price_per_block=1)
            private, public = swarm.client(private_blocks=2), swarm.client()
            await private.peers.wait_for_coverage()  # blocks 2:4 are all it needs
            await public.peers.refresh(force=True)
            states = private.state(), public.state()
            await swarm.add_node(0, 2, tmp_path / "b", price_per_block=50)
            await private.peers.refresh(force=True)
            return (*states, private.state())
        finally:
            await swarm.close()

    private, public, with_dear_first = run(main())
    assert private.covered and private.usable and private.max_route_price() == 2.0
    assert not public.covered and public.max_route_price() == float("inf")
    assert with_dear_first.max_route_price() == 2.0  # blocks 0:2 are not bought

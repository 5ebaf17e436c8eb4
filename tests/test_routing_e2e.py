"""Routing on a real swarm: a LAN pair and a far pair (20 ms emulated) serve the same spans.

The client must take the LAN pair because it measures faster (no flag says "LAN"), its
tokens/s must beat the forced far route by about the emulated delay, and a price limit
must steer the route to the cheaper far pair.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from layerchain.local import swarm_down, swarm_up
from layerchain.types import Span

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
DELAY_MS = 20.0
PROMPT = "Write a short poem about the sea."


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerchain", *args],
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def lan_far(tmp_path_factory):
    state = tmp_path_factory.mktemp("lanfar")
    spans = [Span(0, 15), Span(15, 30), Span(0, 15), Span(15, 30)]
    args = [
        ("--price", "2"), ("--price", "2"),  # LAN pair: fast and dear
        ("--price", "1", "--emulate-latency-ms", str(DELAY_MS)),  # far pair: slow and cheap
        ("--price", "1", "--emulate-latency-ms", str(DELAY_MS)),
    ]
    swarm = swarm_up(state, spans, node_args=args)
    yield swarm
    swarm_down(state, quiet=True)


def generate(swarm, *extra):
    done = cli("generate", "--initial-peers", swarm.initial_peers[0], "--prompt", PROMPT,
               "--max-new-tokens", "24", "--json", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_route_explain_prefers_the_lan_pair(lan_far):
    lan = {lan_far.nodes[0]["peer_id"], lan_far.nodes[1]["peer_id"]}
    done = cli("route", "--initial-peers", lan_far.initial_peers[0], "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert {hop["peer"] for hop in plan["route"]} == lan
    assert plan["pareto"], "the frontier has at least the chosen route"
    table = cli("route", "--initial-peers", lan_far.initial_peers[0], "--explain")
    assert table.returncode == 0 and "pareto" in table.stdout.lower(), table.stdout


def test_lan_route_is_faster_and_max_price_steers_to_the_far_pair(lan_far):
    lan = {lan_far.nodes[0]["peer_id"], lan_far.nodes[1]["peer_id"]}
    far = {lan_far.nodes[2]["peer_id"], lan_far.nodes[3]["peer_id"]}
    fast = generate(lan_far)
    assert {h["peer_id"] for h in fast["route"]} == lan
    cheap = generate(lan_far, "--max-price", "30")  # LAN costs 60 per token, far 30
    assert {h["peer_id"] for h in cheap["route"]} == far
    assert cheap["token_ids"] == fast["token_ids"]
    added_ms = 1000 / cheap["tokens_per_s"] - 1000 / fast["tokens_per_s"]
    # two far hops each delay every reply by DELAY_MS: about 2 * DELAY_MS per token is
    # expected; the bound leaves half of it to the noise of a shared 2-core machine
    assert added_ms > DELAY_MS, (fast["tokens_per_s"], cheap["tokens_per_s"])
    too_cheap = cli("generate", "--initial-peers", lan_far.initial_peers[0], "--prompt", PROMPT,
                    "--max-price", "10")
    assert too_cheap.returncode != 0
    assert "max_price" in too_cheap.stderr and len(too_cheap.stderr.strip().splitlines()) == 1

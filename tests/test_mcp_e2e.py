"""End to end: the MCP server on a real local swarm of 2 node processes serving SmolLM2,
called with the SDK's own client in memory, over streamable HTTP (`layerchain mcp serve
--transport http` in its own process) and over stdio (an MCP host's way: the client starts
`layerchain mcp serve`).

One swarm serves the module; few tokens. Training jobs in memory run a stand-in program
(the real `train` commands run for minutes; `test_mcp.py` checks the arguments parse with
them).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.memory import create_connected_server_and_client_session
from test_mcp import RESOURCES, STAND_IN

from layerchain.local import swarm_down, swarm_up
from layerchain.mcpserver import McpConfig, McpServer
from layerchain.model import SamplingParams
from layerchain.types import even_spans

pytestmark = pytest.mark.slow

PROMPT = "What is the capital of France?"
TOKENS = 6
TOOLS = {"llm_inference_distributed", "llm_train_distributed", "llm_data_shard"}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    state = tmp_path_factory.mktemp("mcp-swarm")
    local = swarm_up(state, even_spans(30, 2))
    yield local
    swarm_down(state, quiet=True)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mcp-data") / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"fact {i}"}) + "\n" for i in range(5)))
    return path


@pytest.fixture(scope="module")
def in_memory(swarm, tmp_path_factory, data_file):
    """What the SDK's in-memory client got from a server in this process, and the greedy
    answer of the server's own swarm client (``AsyncSwarm.generate``, ``Swarm``'s core)."""
    tmp = tmp_path_factory.mktemp("mcp-stand-in")
    (tmp / "stand_in.py").write_text(STAND_IN)

    async def main():
        server = McpServer(McpConfig(initial_peers=tuple(swarm.initial_peers), start_wait_s=10.0,
                                     train_program=(sys.executable, str(tmp / "stand_in.py"))))
        try:
            async with create_connected_server_and_client_session(server.mcp) as session:
                got = {"tools": {t.name for t in (await session.list_tools()).tools},
                       "resources": {str(r.uri) for r in (await session.list_resources()).resources}}
                got["answer"] = await session.call_tool("llm_inference_distributed", {
                    "prompt": PROMPT, "model_name": "smollm2", "parallelism": "model",
                    "max_tokens": TOKENS})
                got["tensor"] = await session.call_tool("llm_inference_distributed", {
                    "prompt": PROMPT, "parallelism": "tensor"})
                got["shard"] = await session.call_tool("llm_data_shard", {
                    "data_uri": str(data_file), "shard_strategy": "random", "num_shards": 2})
                got["train"] = await session.call_tool("llm_train_distributed", {
                    "training_data": str(data_file), "parallelism": "model", "steps": 2})
                for uri in sorted(RESOURCES):
                    got[uri] = json.loads((await session.read_resource(uri)).contents[0].text)
            client = await server.pool.get()
            got["expected"] = await client.generate(PROMPT, SamplingParams(max_new_tokens=TOKENS))
            return got
        finally:
            await server.close()

    return asyncio.run(asyncio.wait_for(main(), 240))


def _text(result) -> str:
    return result.content[0].text


def test_in_memory_client_calls_each_tool_on_the_swarm(in_memory, swarm):
    got = in_memory
    assert got["tools"] == TOOLS and got["resources"] == RESOURCES
    answer = got["answer"].structuredContent
    assert not got["answer"].isError, _text(got["answer"])
    assert answer["text"] == got["expected"].text and answer["completion_tokens"] == TOKENS
    node_ids = {n["peer_id"] for n in swarm.nodes}
    assert {h["peer_id"] for h in answer["route"]} == node_ids
    assert [(h["start"], h["end"]) for h in answer["route"]] == [(0, 15), (15, 30)]
    assert got["tensor"].isError and "not supported" in _text(got["tensor"])
    assert got["shard"].structuredContent["sizes"] == [3, 2]  # random: sizes within one
    assert not got["train"].isError, _text(got["train"])

    (model,) = [m for m in got["llm://models"]["models"] if m["open"]]
    assert model["num_blocks"] == 30 and model["servers"] == 2 and model["blocks_served"] == 30
    assert {n["peer_id"] for n in got["llm://nodes"]["nodes"]} == node_ids
    assert got["llm://performance"]["summary"]["requests"] == 1  # "tensor" never ran
    job_id = got["train"].structuredContent["job_id"]
    assert [j["job_id"] for j in got["training://jobs"]["jobs"]].count(job_id) == 1
    assert got["training://data_shards"]["assignments"][0]["sizes"] == [3, 2]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "layerchain", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server (it closes its clients, whose DHT daemon is its child), then
    SIGKILL to whatever of its process group is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_http_transport_serves_the_same_answer(swarm, in_memory, data_file, tmp_path):
    log = tmp_path / "mcp-http.log"
    proc = _start(["mcp", "serve", "--transport", "http", "--port", "0",
                   "--initial-peers", swarm.initial_peers[0]], log)
    try:
        deadline = time.monotonic() + 90
        while not (found := re.search(r"at (http://127\.0\.0\.1:\d+/mcp) ", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)

        async def main():
            async with streamable_http_client(found.group(1)) as (read, write, _), \
                    ClientSession(read, write) as session:
                await session.initialize()
                tools = {t.name for t in (await session.list_tools()).tools}
                answer = await session.call_tool("llm_inference_distributed", {
                    "prompt": PROMPT, "max_tokens": TOKENS})
                bad = await session.call_tool("llm_data_shard", {
                    "data_uri": str(data_file), "shard_strategy": "alphabetical"})
                missing = await session.call_tool("llm_train_distributed", {
                    "training_data": str(tmp_path / "nothing.jsonl")})
                nodes = json.loads((await session.read_resource("llm://nodes")).contents[0].text)
                return tools, answer, bad, missing, nodes

        tools, answer, bad, missing, nodes = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        _stop(proc)
    assert tools == TOOLS
    assert not answer.isError, _text(answer)
    assert answer.structuredContent["text"] == in_memory["expected"].text
    assert bad.isError and "shard_strategy" in _text(bad) and "\n" not in _text(bad)
    assert missing.isError and "no data file at" in _text(missing)
    assert len(nodes["nodes"]) == 2
    assert proc.returncode == 0, log.read_text()[-2000:]  # SIGTERM: closed, not killed


def test_stdio_transport_keeps_stdout_for_the_protocol(swarm, data_file):
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "layerchain", "mcp", "serve", "--initial-peers", swarm.initial_peers[0]],
        env=dict(os.environ))

    async def main():
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name for t in (await session.list_tools()).tools}
            shard = await session.call_tool("llm_data_shard", {
                "data_uri": str(data_file), "nodes": ["a", "b"]})
            return tools, shard

    tools, shard = asyncio.run(asyncio.wait_for(main(), 120))
    assert tools == TOOLS
    assert shard.structuredContent["sizes"] == [3, 2]

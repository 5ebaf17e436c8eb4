"""The MCP server in process: the SDK's own client over in-memory streams, an in-process
swarm of a tiny model (memory transport and DHT), training jobs run by a stand-in program.

Fast tier: what the tools answer (the swarm's greedy text, the shard assignment, a job id
its process takes), the one-line errors of bad calls, the resources. ``test_mcp_e2e.py``
runs the same tools against node processes, in memory and over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
from mcp.shared.memory import create_connected_server_and_client_session
from memswarm import MemorySwarm

from layerchain.errors import ConfigError
from layerchain.mcpserver import McpConfig, McpServer
from layerchain.mcpserver.requests import check_parallelism, train_command, train_request
from layerchain.mcpserver.schema import ShardStrategy
from layerchain.model import SamplingParams
from layerchain.train.jobs import JobStore
from layerchain.train.sharding import STRATEGIES, assign

PROMPT = "What is the capital of France?"
TOKENS = 6
SPANS = ((0, 2), (2, 4), (0, 4))
RESOURCES = {"llm://models", "llm://nodes", "llm://performance", "training://jobs",
             "training://data_shards", "training://checkpoints", "training://metrics"}

# A stand-in for `layerchain train ...` (the real commands run minutes): it writes its job
# record as a training process does (JobStore.create without an id takes LAYERCHAIN_JOB_ID),
# or fails at start like a command given a bad flag.
STAND_IN = textwrap.dedent("""
    import sys
    from layerchain.train.jobs import JobStore
    args = sys.argv[1:]
    if "--method" in args and args[args.index("--method") + 1] == "lora":
        print("Error: No such option: --method lora is not built yet", file=sys.stderr)
        sys.exit(2)
    kind = "finetune" if args[1] == "finetune" else "federated" if "federated" in args else "dp"
    store = JobStore()
    job = store.create(kind, out="/tmp/out", peers=["peer-a"], extra={"argv": args, "tokens_per_s": 12.5})
    store.update(job.job_id, loss=2.5)
    store.update(job.job_id, loss=1.25, checkpoint="/tmp/out/step-2", status="done")
""")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private LAYERCHAIN_HOME: the server's job store and the stand-in's are the same."""
    monkeypatch.setenv("LAYERCHAIN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    lines = [{"text": f"fact number {i}"} for i in range(7)]
    lines.append({"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"}]})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _one_line_error(result) -> str:
    assert result.isError, result
    text = result.content[0].text
    assert "\n" not in text and "Traceback" not in text
    return text


async def _with_swarm(model: str, tmp_path: Path, body):
    """Run ``body(session, server, client)`` against an in-process swarm of nodes serving
    blocks 0:2, 2:4 and 0:4, ``client`` being the swarm client the server runs inference
    with."""
    swarm = MemorySwarm(model)
    try:
        for start, end in SPANS:
            await swarm.add_node(start, end, tmp_path)

        client = swarm.client(audit_rate=0)  # one head load: the server's and the reference's

        async def factory(reference: str):
            return client

        server = McpServer(McpConfig(model=model, start_wait_s=10.0,
                                     train_program=(sys.executable, str(tmp_path / "stand_in.py"))),
                           factory=factory)
        (tmp_path / "stand_in.py").write_text(STAND_IN)
        try:
            async with create_connected_server_and_client_session(server.mcp) as session:
                return await body(session, server, client)
        finally:
            await server.close()
    finally:
        await swarm.close()


def test_tools_and_resources_keep_seed_003_names_and_schemas():
    async def main():
        server = McpServer(McpConfig())
        async with create_connected_server_and_client_session(server.mcp) as session:
            tools = {t.name: t.inputSchema for t in (await session.list_tools()).tools}
            uris = {str(r.uri) for r in (await session.list_resources()).resources}
        return tools, uris

    tools, uris = run(main())
    assert set(tools) == {"llm_inference_distributed", "llm_train_distributed", "llm_data_shard"}
    assert uris == RESOURCES
    infer = tools["llm_inference_distributed"]["properties"]
    assert infer["prompt"]["type"] == "string" and infer["model_name"]["type"] == "string"
    assert infer["parallelism"]["enum"] == ["model", "tensor", "pipeline", "hybrid"]
    assert infer["nodes"] == {**infer["nodes"], "type": "array", "items": {"type": "string"}}
    assert tools["llm_inference_distributed"]["required"] == ["prompt"]
    train = tools["llm_train_distributed"]["properties"]
    assert train["model_config"]["type"] == "object" and train["training_data"]["type"] == "string"
    assert train["parallelism"]["enum"] == ["data", "model", "federated", "hybrid"]
    assert train["nodes"]["type"] == "array"
    for name in ("epochs", "batch_size"):
        assert train[name]["type"] == "integer"
    shard = tools["llm_data_shard"]["properties"]
    assert shard["data_uri"]["type"] == "string" and shard["nodes"]["type"] == "array"
    assert shard["shard_strategy"]["enum"] == list(STRATEGIES) == list(ShardStrategy.__args__)


def test_inference_is_the_swarms_greedy_answer_and_resources_show_it(tiny_model, tmp_path):
    async def body(session, server, client):
        expected = await client.generate(PROMPT, SamplingParams(max_new_tokens=TOKENS))
        progress = []  # (tokens so far, max_tokens, the token's text) per notification

        async def on_progress(done, total, message):
            progress.append((done, total, message))

        result = await session.call_tool("llm_inference_distributed", {
            "prompt": PROMPT, "parallelism": "pipeline", "max_tokens": TOKENS},
            progress_callback=on_progress)
        await client.refresh()
        peers = {(n.start, n.end): n.peer_id for n in client.state().nodes}
        routed = {}  # the nodes a call allows -> its answer
        for allowed in (((0, 2), (2, 4)), ((0, 4),), ((2, 4),)):
            routed[allowed] = await session.call_tool("llm_inference_distributed", {
                "prompt": PROMPT, "nodes": [peers[span] for span in allowed],
                "max_tokens": TOKENS})
        unknown = await session.call_tool("llm_inference_distributed", {
            "prompt": PROMPT, "nodes": ["12D3KooWnotapeer"], "max_tokens": TOKENS})
        read = {}
        for uri in ("llm://models", "llm://nodes", "llm://performance"):
            read[uri] = json.loads((await session.read_resource(uri)).contents[0].text)
        return expected, result, routed, unknown, read, peers, progress

    expected, result, routed, unknown, read, peers, progress = run(
        _with_swarm(tiny_model, tmp_path, body))
    assert not result.isError, result.content[0].text
    answer = result.structuredContent
    assert answer["text"] == expected.text and answer["completion_tokens"] == len(expected.token_ids)
    assert answer["route"][0]["start"] == 0 and answer["route"][-1]["end"] == 4
    assert answer["tokens_per_s"] > 0 and json.loads(result.content[0].text) == answer
    assert [(done, total) for done, total, _ in progress] == \
        [(i + 1, TOKENS) for i in range(len(expected.token_ids))]
    assert "".join(text for _, _, text in progress) == expected.text
    for allowed in (((0, 2), (2, 4)), ((0, 4),)):  # the route is planned among those nodes
        hops = routed[allowed].structuredContent["route"]
        assert [(h["peer_id"], h["start"], h["end"]) for h in hops] == \
            [(peers[span], *span) for span in allowed]
        assert routed[allowed].structuredContent["text"] == expected.text
    assert "blocks 0:2" in _one_line_error(routed[((2, 4),)])  # no node of 0:2 allowed
    assert "does not serve" in _one_line_error(unknown)

    (model,) = read["llm://models"]["models"]
    assert model["num_blocks"] == 4 and model["servers"] == 3 and model["replicas"] == [2, 2, 2, 2]
    assert model["blocks_served"] == 4 and model["open"] and model["throughput_tokens_per_s"] > 0
    nodes = read["llm://nodes"]["nodes"]
    assert sorted(n["peer_id"] for n in nodes) == sorted(peers.values())
    assert sorted(tuple(n["span"]) for n in nodes) == sorted(SPANS)
    assert all({"price_per_block", "ms_per_block", "load"} <= set(n) for n in nodes)
    perf = read["llm://performance"]
    assert perf["summary"]["requests"] == 5 and perf["summary"]["errors"] == 2
    assert perf["requests"][-1]["completion_tokens"] == len(expected.token_ids)
    assert "text" not in perf["requests"][-1]  # no prompt nor answer is kept


def test_bad_calls_are_one_line_tool_errors(home, tmp_path, data_file):
    calls = [
        ("llm_inference_distributed", {"prompt": PROMPT, "parallelism": "tensor"},
         "parallelism 'tensor' is not supported"),
        ("llm_inference_distributed", {"prompt": PROMPT, "parallelism": "hybrid"},
         "parallelism 'hybrid' is not supported"),
        ("llm_inference_distributed", {"prompt": PROMPT, "parallelism": "sideways"},
         "parallelism: Input should be"),
        ("llm_inference_distributed", {"prompt": PROMPT, "max_tokens": "many"},
         "max_tokens: Input should be a valid integer"),
        ("llm_inference_distributed", {"prompt": "   "}, "the prompt is empty"),
        ("llm_inference_distributed", {}, "prompt: Field required"),
        ("llm_inference_distributed", {"prompt": PROMPT, "model_name": "no-such-model"},
         "no-such-model"),
        ("llm_data_shard", {"data_uri": str(tmp_path / "missing.jsonl")}, "no data file at"),
        ("llm_data_shard", {"data_uri": str(data_file), "shard_strategy": "semantic"},
         "shard_strategy: Input should be"),
        ("llm_data_shard", {"data_uri": "https://example.com/d.jsonl"}, "not supported"),
        ("llm_data_shard", {"data_uri": str(data_file), "nodes": ["a", "b"], "num_shards": 3},
         "num_shards is 3 but 2 nodes"),
        ("llm_train_distributed", {"training_data": str(data_file), "parallelism": "hybrid"},
         "'hybrid' is not supported"),
        ("llm_train_distributed", {"training_data": str(data_file),
                                   "model_config": {"layers": 3}}, "unknown keys ['layers']"),
        ("llm_train_distributed", {"training_data": str(tmp_path / "none.jsonl")},
         "no data file at"),
        ("llm_train_distributed", {"training_data": str(data_file), "steps": 1},
         "cannot start the training command /nonexistent/layerchain"),
        ("no_such_tool", {}, "Unknown tool"),
    ]

    async def main():
        async def no_swarm(model: str):
            raise ConfigError(f"cannot open {model}: there is no such model here")

        server = McpServer(McpConfig(train_program=("/nonexistent/layerchain",)),
                           factory=no_swarm)
        async with create_connected_server_and_client_session(server.mcp) as session:
            return [await session.call_tool(name, args) for name, args, _ in calls]

    results = run(main())
    for (name, args, expected), result in zip(calls, results):
        assert expected in _one_line_error(result), (name, args, result.content[0].text)
    (job,) = JobStore().list()  # the one that could not start says why
    assert job.status == "failed" and "cannot start" in job.error


def test_data_shard_returns_the_sharding_modules_assignment(data_file, tmp_path):
    from layerchain.train.data import read_records, record_key

    async def main():
        server = McpServer(McpConfig())
        async with create_connected_server_and_client_session(server.mcp) as session:
            by_node = await session.call_tool("llm_data_shard", {
                "data_uri": data_file.as_uri(), "shard_strategy": "hash",
                "nodes": ["peer-a", "peer-b", "peer-c"], "seed": 7})
            by_count = await session.call_tool("llm_data_shard", {
                "data_uri": str(data_file), "shard_strategy": "round_robin", "num_shards": 2})
            shards = json.loads((await session.read_resource("training://data_shards"))
                                .contents[0].text)
        return by_node, by_count, shards

    by_node, by_count, shards = run(main())
    keys = [record_key(r) for r in read_records(data_file)]
    hashed = by_node.structuredContent
    assert [s["indices"] for s in hashed["shards"]] == assign(keys, 3, "hash", seed=7)
    assert [s["node"] for s in hashed["shards"]] == ["peer-a", "peer-b", "peer-c"]
    assert hashed["num_records"] == 8 and sum(hashed["sizes"]) == 8
    counted = by_count.structuredContent
    assert [s["indices"] for s in counted["shards"]] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert counted["sizes"] == [4, 4] and counted["shards"][0]["node"] is None
    assert [a["shard_strategy"] for a in shards["assignments"]] == ["round_robin", "hash"]
    assert "indices" not in shards["assignments"][0]["shards"][0]


def test_train_starts_a_job_whose_process_takes_its_id(home, data_file, tmp_path):
    program = (sys.executable, str(tmp_path / "stand_in.py"))
    (tmp_path / "stand_in.py").write_text(STAND_IN)

    async def main():
        server = McpServer(McpConfig(initial_peers=("/ip4/127.0.0.1/tcp/1/p2p/QmPeer",),
                                     train_program=program, start_wait_s=10.0))
        try:
            async with create_connected_server_and_client_session(server.mcp) as session:
                started = await session.call_tool("llm_train_distributed", {
                    "training_data": str(data_file), "parallelism": "model", "epochs": 2,
                    "batch_size": 4, "model_config": {"method": "prompt"}})
                failed = await session.call_tool("llm_train_distributed", {
                    "training_data": str(data_file), "model_config": {"method": "lora"}})
                read = {}
                for uri in ("training://jobs", "training://metrics", "training://checkpoints"):
                    read[uri] = json.loads((await session.read_resource(uri)).contents[0].text)
                return started, failed, read
        finally:
            await server.close()

    started, failed, read = run(main())
    assert not started.isError, started.content[0].text
    job = started.structuredContent
    assert job["kind"] == "finetune" and job["steps"] == 4  # ceil(2 epochs x 8 records / 4)
    record = JobStore().get(job["job_id"])  # written by the process, under the id given
    assert record.status == "done" and record.losses == (2.5, 1.25)
    argv = record.extra["argv"]
    assert argv[:2] == ["train", "finetune"] and argv[-1] == "--json"
    for flag, value in (("--data", str(data_file)), ("--method", "prompt"), ("--steps", "4"),
                        ("--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmPeer")):
        assert argv[argv.index(flag) + 1] == value
    assert "--method lora is not built yet" in _one_line_error(failed)

    jobs = {j["job_id"]: j for j in read["training://jobs"]["jobs"]}
    assert jobs[job["job_id"]]["loss"] == 1.25 and jobs[job["job_id"]]["status"] == "done"
    (bad,) = [j for j in jobs.values() if j["job_id"] != job["job_id"]]
    assert bad["status"] == "failed" and "exited with code 2" in bad["error"]
    metrics = {m["job_id"]: m for m in read["training://metrics"]["metrics"]}
    assert metrics[job["job_id"]]["losses"] == [2.5, 1.25]
    assert metrics[job["job_id"]]["figures"] == {"tokens_per_s": 12.5}
    checkpoints = {c["job_id"]: c for c in read["training://checkpoints"]["checkpoints"]}
    assert checkpoints[job["job_id"]]["latest"] == "/tmp/out/step-2"


def test_train_commands_use_issue_18s_flags(tmp_path):
    def command(parallelism, **extra):
        request = train_request(training_data=str(tmp_path / "d.jsonl"), parallelism=parallelism,
                                model_config={"model": "smollm2"}, nodes=(), epochs=None,
                                batch_size=extra.get("batch_size"), steps=extra.get("steps"),
                                shard_strategy="hash", out=tmp_path / "out", num_records=10)
        return train_command(request, ["/ip4/1.2.3.4/tcp/5/p2p/QmA"])

    assert command("model", steps=3) == [
        "train", "finetune", "--initial-peers", "/ip4/1.2.3.4/tcp/5/p2p/QmA",
        "--data", str(tmp_path / "d.jsonl"), "--method", "prompt", "--steps", "3",
        "--out", str(tmp_path / "out"), "--model", "smollm2", "--json"]
    dp = command("data", batch_size=8)
    assert dp[:2] == ["train", "dp"] and dp[dp.index("--shard-strategy") + 1] == "hash"
    assert dp[dp.index("--target-batch-size") + 1] == "8" and "--parallelism" not in dp
    assert dp[dp.index("--steps") + 1] == "2"  # ceil(10 records / 8 per step)
    federated = command("federated")
    assert federated[federated.index("--parallelism") + 1] == "federated"
    with pytest.raises(ConfigError, match="lora_rank is for fine-tuning only"):
        train_request(training_data="d", parallelism="data", model_config={"lora_rank": 2},
                      nodes=(), epochs=None, batch_size=None, steps=None, shard_strategy="hash",
                      out=None, num_records=1)
    with pytest.raises(ConfigError, match="nodes of a training job"):
        train_request(training_data="d", parallelism="data", model_config=None, nodes=["x"],
                      epochs=None, batch_size=None, steps=None, shard_strategy="hash",
                      out=tmp_path, num_records=1)


@pytest.mark.parametrize("parallelism", ["model", "pipeline"])
def test_routed_parallelisms_pass(parallelism):
    check_parallelism(parallelism)


@pytest.mark.parametrize("parallelism", ["model", "data", "federated"])
def test_train_commands_parse_with_the_real_cli(parallelism, tmp_path):
    """The arguments the tool builds are accepted by `layerchain train ...` itself (parsed,
    not run): a renamed flag fails here, not in a user's job."""
    import typer.main

    from layerchain.cli.main import app

    settings = {"model": "smollm2", "method": "lora", "lr": 0.01}
    if parallelism == "model":
        settings |= {"lora_rank": 4, "virtual_tokens": 8}
    request = train_request(training_data=str(tmp_path / "d.jsonl"), parallelism=parallelism,
                            model_config=settings, nodes=(),
                            epochs=2, batch_size=4, steps=None, shard_strategy="random",
                            out=tmp_path / "out", num_records=10)
    args = train_command(request, ["/ip4/1.2.3.4/tcp/5/p2p/QmA"], insecure=True)
    root = typer.main.get_command(app)
    ctx = root.make_context("layerchain", ["train"], resilient_parsing=True)
    group = root.get_command(ctx, args[0])  # train
    command = group.get_command(ctx, args[1])  # finetune | dp
    if command is None:  # FINETUNE's command lands in the same round as this server
        pytest.skip(f"`layerchain train {args[1]}` is not registered yet")
    with command.make_context(args[1], args[2:], parent=ctx) as parsed:
        assert parsed.params["data"] == tmp_path / "d.jsonl" and parsed.params["lr"] == 0.01
        assert parsed.params["steps"] == 5  # ceil(2 epochs x 10 records / 4)
        if parallelism == "model":
            assert (parsed.params["lora_rank"], parsed.params["virtual_tokens"]) == (4, 8)
            assert parsed.params["batch_size"] == 4 and parsed.params["insecure"] is True
        else:
            assert parsed.params["target_batch_size"] == 4
        (json_flag,) = [p.name for p in command.params if "--json" in getattr(p, "opts", ())]
        assert parsed.params[json_flag] is True


@pytest.mark.parametrize("args, expected", [
    ([], "mcp serve needs --initial-peers"),
    (["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmA", "--transport", "sse"],
     "unknown transport 'sse'"),
    (["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmA", "--max-tokens", "0"],
     "the default max_tokens must be in 1.."),
])
def test_serve_command_refuses_bad_flags_in_one_line(args, expected):
    from typer.testing import CliRunner

    from layerchain.cli.main import app

    result = CliRunner().invoke(app, ["mcp", "serve", *args])
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line, result.stderr


def test_a_bug_is_one_line_for_the_client_and_a_traceback_in_the_log(caplog):
    async def broken(model: str):
        raise RuntimeError("boom\nsecond line")

    async def main():
        server = McpServer(McpConfig(), factory=broken)
        async with create_connected_server_and_client_session(server.mcp) as session:
            return await session.call_tool("llm_inference_distributed", {"prompt": PROMPT})

    result = run(main())
    assert _one_line_error(result) == "internal error: RuntimeError: boom second line"
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


def test_models_lists_the_catalog_and_open_models_it_lacks():
    from types import SimpleNamespace

    from layerchain.client.state import swarm_state
    from layerchain.discovery.catalog import Coverage, ModelEntry
    from layerchain.mcpserver.resources import models_json
    from layerchain.routing import RouteLimits

    listed = ModelEntry(model_id="aa", name="listed", family="llama", num_blocks=2,
                        hidden_size=8, dtype="fp32", weights_id="aa", tokenizer_sha256="t",
                        announced_by=1, coverage=Coverage(1, (1, 1), 50.0))
    spec = SimpleNamespace(model_id="bb", name="unlisted", family="qwen2", num_blocks=2,
                           hidden_size=16, dtype="int8")
    state = swarm_state("bb", 2, [], {}, set(), RouteLimits())
    rows = models_json([listed], [(spec, state)])["models"]
    assert [(r["model_id"], r["open"]) for r in rows] == [("aa", False), ("bb", True)]
    assert rows[1] == {"model_id": "bb", "name": "unlisted", "family": "qwen2", "num_blocks": 2,
                       "hidden_size": 16, "dtype": "int8", "servers": 0, "blocks_served": 0,
                       "replicas": [0, 0], "throughput_tokens_per_s": 0.0, "open": True}
    opened = models_json([listed], [(SimpleNamespace(**{**vars(spec), "model_id": "aa"}),
                                     state)])["models"]
    assert [(r["model_id"], r["open"], r["servers"]) for r in opened] == [("aa", True, 1)]


def test_http_app_refuses_other_hosts_and_origins():
    """DNS rebinding: a web page whose name resolves to 127.0.0.1 must not reach the tools
    of a server on loopback (the SDK's guard, on for loopback hosts)."""
    from starlette.testclient import TestClient

    app = McpServer(McpConfig(transport="http", port=0)).mcp.streamable_http_app()
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"}}}
    headers = {"Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    with TestClient(app, base_url="http://127.0.0.1:8765") as http:
        assert http.post("/mcp", json=init, headers=headers).status_code == 200
        evil_host = http.post("/mcp", json=init, headers={**headers, "Host": "evil.example"})
        assert evil_host.status_code == 421
        evil_page = http.post("/mcp", json=init,
                              headers={**headers, "Origin": "http://evil.example"})
        assert evil_page.status_code == 403


def test_jobs_still_running_are_stopped_when_the_server_closes(home, data_file, tmp_path):
    (tmp_path / "long_job.py").write_text(textwrap.dedent("""
        import time
        from layerchain.train.jobs import JobStore
        job = JobStore().create("dp")
        print("training", job.job_id, flush=True)
        time.sleep(120)
    """))

    async def main():
        server = McpServer(McpConfig(train_program=(sys.executable, str(tmp_path / "long_job.py")),
                                     start_wait_s=0.2))
        try:
            async with create_connected_server_and_client_session(server.mcp) as session:
                started = await session.call_tool("llm_train_distributed", {
                    "training_data": str(data_file), "parallelism": "data"})
            for _ in range(100):  # until the process has written its own record
                if JobStore().get(started.structuredContent["job_id"]).extra.get("log") is None:
                    break
                await asyncio.sleep(0.1)
        finally:
            await server.close()
        return started

    started = run(main())
    job = started.structuredContent
    record = JobStore().get(job["job_id"])
    assert record.status == "failed" and "exited with code -15: training" in record.error
    with pytest.raises(ProcessLookupError):
        os.kill(job["pid"], 0)

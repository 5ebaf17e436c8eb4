"""The layerchain MCP server: seed 003's tools and resources over the swarm, with the
official ``mcp`` SDK (FastMCP, major version 1).

Tools (input schemas: ``schema.py``):

* ``llm_inference_distributed`` - generate through the swarm with the real client
  (``AsyncSwarm``, greedy by default): the text, the route, tokens/s.
* ``llm_train_distributed`` - start a ``layerchain train finetune|dp`` job
  (``training.py``); returns its job id.
* ``llm_data_shard`` - deal a JSONL file's records to shards (``train.sharding``).

Resources (JSON): ``llm://models``, ``llm://nodes``, ``llm://performance``,
``training://jobs``, ``training://data_shards``, ``training://checkpoints``,
``training://metrics`` (``resources.py``).

Errors: a tool that fails answers an MCP tool error (``isError``) whose text is one line -
a layerchain error's message and hint, or which argument is wrong - never a traceback
(``one_line``). A bug is logged with its traceback on the server's stderr and shown to the
client as "internal error: TYPE: message".

Transports (``serve``): stdio (an MCP host starts ``layerchain mcp serve``; the protocol
gets the process's real stdout, and file descriptor 1 is pointed at stderr, so nothing a
library or child process prints can corrupt it), or streamable HTTP on ``host:port``
(``/mcp``; the SDK's DNS-rebinding guard is on for loopback hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.server.fastmcp.tools import Tool
from mcp.server.fastmcp.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.types import CallToolResult, ContentBlock, TextContent
from pydantic import ValidationError

from layerchain.client import AsyncSwarm
from layerchain.discovery.catalog import CatalogDiscovery, ModelEntry, list_models
from layerchain.errors import ConfigError, LayerchainError
from layerchain.mcpserver import resources
from layerchain.mcpserver.config import McpConfig
from layerchain.mcpserver.requests import (
    ShardAssignment,
    data_path,
    inference_request,
    shard_data,
    train_command,
    train_request,
)
from layerchain.mcpserver.schema import InferenceArguments, ShardArguments, TrainArguments
from layerchain.mcpserver.swarms import (
    REFRESH_TIMEOUT_S,
    PerformanceLog,
    SwarmFactory,
    SwarmPool,
    generate,
    refresh,
)
from layerchain.mcpserver.training import TrainingJobs
from layerchain.train.jobs import JobStore

log = logging.getLogger(__name__)

RECENT_SHARDS = 20  # llm_data_shard assignments training://data_shards keeps
STOP_TIMEOUT_S = 15.0  # a stdio server told to stop by a signal exits after this at the latest
INSTRUCTIONS = (
    "layerchain runs language models on a peer-to-peer swarm: peers serve spans of a model's "
    "blocks and a request's hidden states go through a route of them. "
    "llm_inference_distributed generates text through the swarm; llm_train_distributed "
    "starts a training job (fine-tuning through the swarm, or data-parallel); "
    "llm_data_shard splits a JSONL data file into shards. llm://models and llm://nodes show "
    "the swarm, training://jobs the training jobs."
)


def one_line(error: BaseException) -> str:
    """What a failed tool call answers: one line saying what is wrong (see the module)."""
    cause = error.__cause__ if isinstance(error, ToolError) and error.__cause__ else error
    if isinstance(cause, LayerchainError):
        text = str(cause)
    elif isinstance(cause, ValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                    for e in cause.errors()]
        text = "invalid arguments: " + "; ".join(problems)
    elif cause is error:  # the SDK's own (an unknown tool)
        text = str(error)
    else:
        log.error("internal error in a tool call", exc_info=cause)
        text = f"internal error: {type(cause).__name__}: {cause}"
    return " ".join(text.split())


class _FastMCP(FastMCP[Any]):
    """FastMCP whose tool errors are ``one_line``'s."""

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        try:
            return await super().call_tool(name, arguments)
        except ToolError as error:
            raise ToolError(one_line(error)) from None


def _tool(fn: Callable[..., Awaitable[CallToolResult]], name: str, description: str,
          arguments: type[ArgModelBase], context_kwarg: str | None = None) -> Tool:
    """A tool whose input schema is ``arguments`` (``schema.py``) and that calls ``fn`` with
    the validated arguments (by their names, aliases included), and the request's
    ``Context`` as ``context_kwarg`` if given."""
    return Tool(fn=fn, name=name, title=None, description=description,
                parameters=arguments.model_json_schema(by_alias=True),
                fn_metadata=FuncMetadata(arg_model=arguments), is_async=True,
                context_kwarg=context_kwarg, annotations=None)


def _json_result(data: dict[str, Any]) -> CallToolResult:
    content: list[ContentBlock] = [TextContent(type="text", text=json.dumps(data))]
    return CallToolResult(content=content, structuredContent=data)


def swarm_factory(config: McpConfig) -> SwarmFactory:
    """Opens the real client of a model on ``config``'s swarm."""

    async def open_swarm(model: str) -> AsyncSwarm:
        if not config.initial_peers:
            raise ConfigError("the MCP server has no --initial-peers to join the swarm through",
                              hint="start a swarm with `layerchain swarm up`")
        options: dict[str, Any] = {"insecure": config.insecure}
        if config.audit_rate is not None:
            options["audit_rate"] = config.audit_rate
        return await AsyncSwarm.create(config.initial_peers, model=model, **options)

    return open_swarm


class McpServer:
    """The server's state - swarm clients, the performance log, training jobs, recent shard
    assignments - and the FastMCP app (``self.mcp``) over it."""

    def __init__(self, config: McpConfig, *, factory: SwarmFactory | None = None,
                 store: JobStore | None = None) -> None:
        self.config = config
        self.pool = SwarmPool(factory or swarm_factory(config), config.model, config.max_models)
        self.performance = PerformanceLog(config.recent_requests)
        self.store = store if store is not None else JobStore()
        self.jobs = TrainingJobs(config.train_program, self.store, config.start_wait_s)
        self.shards: deque[ShardAssignment] = deque(maxlen=RECENT_SHARDS)
        self.mcp = _FastMCP(
            name="layerchain", instructions=INSTRUCTIONS, host=config.host, port=config.port,
            log_level="WARNING",
            tools=[
                _tool(self.infer, "llm_inference_distributed",
                      "Run LLM inference across network nodes: the prompt goes through a "
                      "route of peers serving spans of the model's blocks; returns the text, "
                      "the route and tokens/s. With a progress token, each token is a "
                      "progress notification (progress: tokens so far, total: max_tokens, "
                      "message: its text).", InferenceArguments, context_kwarg="ctx"),
                _tool(self.train, "llm_train_distributed",
                      "Train LLM across network nodes: starts a training job (fine-tuning "
                      "through the swarm, data-parallel or federated) and returns its job id; "
                      "training://jobs follows it.", TrainArguments),
                _tool(self.shard, "llm_data_shard",
                      "Shard training data across nodes: deals a JSONL file's records to "
                      "shards by strategy; returns each shard's record indices and size.",
                      ShardArguments),
            ],
        )
        for uri, read, description in (
            ("llm://models", self.models, "Models the swarm serves and how their blocks "
             "are covered."),
            ("llm://nodes", self.nodes, "Peers: id, span, price, ms per block, load."),
            ("llm://performance", self.performance_json, "Recent inference calls: tokens/s, "
             "time to first token, duration."),
            ("training://jobs", self.training_jobs, "Training jobs: status, peers, loss."),
            ("training://data_shards", self.data_shards, "Data shard assignments."),
            ("training://checkpoints", self.checkpoints, "Checkpoints of training jobs."),
            ("training://metrics", self.metrics, "Training metrics: loss curves and rates."),
        ):
            self.mcp.resource(uri, name=uri.split("://")[1], description=description,
                              mime_type="application/json")(read)

    async def close(self) -> None:
        """Stop the training jobs this server started and close the swarm clients."""
        try:
            await self.jobs.close()
        finally:
            await self.pool.close()

    # ---------------------------------------------------------------- tools

    async def infer(self, *, prompt: str, model_name: str, parallelism: str, nodes: list[str],
                    max_tokens: int | None, temperature: float, top_p: float, seed: int,
                    stop: list[str], raw: bool, ctx: Context[Any, Any, Any]) -> CallToolResult:
        request = inference_request(
            prompt, model_name=model_name, parallelism=parallelism, nodes=nodes,
            max_tokens=self.config.default_max_tokens if max_tokens is None else max_tokens,
            max_tokens_limit=self.config.max_tokens_limit, temperature=temperature,
            top_p=top_p, seed=seed, stop=stop, raw=raw,
        )
        total = request.params.max_new_tokens

        async def progress(tokens: int, text: str) -> None:  # sent only if the caller asked
            await ctx.report_progress(tokens, total, message=text)

        return _json_result(await generate(self.pool, request, self.performance, progress))

    async def train(self, *, training_data: str, model_config: dict[str, Any], parallelism: str,
                    nodes: list[str], epochs: int | None, batch_size: int | None,
                    steps: int | None, shard_strategy: str, out: str) -> CallToolResult:
        from layerchain.train.data import read_records

        path = data_path(training_data)
        num_records = len(await asyncio.to_thread(read_records, path))  # checks every line
        job_id = secrets.token_hex(6)
        out_dir = Path(out).expanduser() if out else None
        if out_dir is None and parallelism == "model":  # finetune's --out is required
            out_dir = self.store.root.parent / "out" / job_id
        request = train_request(
            training_data=str(path), parallelism=parallelism, model_config=model_config,
            nodes=nodes, epochs=epochs, batch_size=batch_size, steps=steps,
            shard_strategy=shard_strategy, out=out_dir, num_records=num_records,
        )
        args = train_command(request, self.config.initial_peers, self.config.insecure)
        job = await self.jobs.start(request.kind, args, job_id=job_id,
                                    out=str(out_dir) if out_dir else "")
        return _json_result({**job.to_json(), "data": str(path), "records": num_records,
                             "steps": request.steps})

    async def shard(self, *, data_uri: str, shard_strategy: str, nodes: list[str],
                    num_shards: int | None, seed: int) -> CallToolResult:
        assignment = await asyncio.to_thread(shard_data, data_uri, shard_strategy, nodes,
                                             num_shards, seed)
        self.shards.appendleft(assignment)
        return _json_result(assignment.to_json())

    # ---------------------------------------------------------------- resources

    async def _open_swarms(self) -> list[tuple[str, AsyncSwarm]]:
        """The open clients, their records refreshed; the default model's opened first if
        none is (its error as is: the swarm cannot be read)."""
        swarms = self.pool.open_swarms()
        if not swarms:
            await self.pool.get()
            swarms = self.pool.open_swarms()
        await asyncio.gather(*(refresh(swarm) for _, swarm in swarms))
        return swarms

    async def models(self) -> str:
        swarms = await self._open_swarms()
        catalog: list[ModelEntry] = []
        discovery = swarms[0][1].discovery
        if isinstance(discovery, CatalogDiscovery):
            try:
                catalog = await asyncio.wait_for(list_models(discovery), REFRESH_TIMEOUT_S)
            except (LayerchainError, OSError, asyncio.TimeoutError) as error:
                log.warning("could not read the swarm's catalog: %s", error)
        data = resources.models_json(catalog, [(s.spec, s.state()) for _, s in swarms])
        return json.dumps(data)

    async def nodes(self) -> str:
        swarms = await self._open_swarms()
        return json.dumps(resources.nodes_json([(s.spec.name, s.state()) for _, s in swarms]))

    async def performance_json(self) -> str:
        return json.dumps(self.performance.to_json())

    def _records(self) -> list[Any]:
        self.jobs.poll()  # a job whose process died shows as failed
        return self.store.list()

    async def training_jobs(self) -> str:
        return json.dumps(resources.jobs_json(self._records()))

    async def data_shards(self) -> str:
        return json.dumps(resources.data_shards_json(list(self.shards), self._records()))

    async def checkpoints(self) -> str:
        return json.dumps(resources.checkpoints_json(self._records()))

    async def metrics(self) -> str:
        return json.dumps(resources.metrics_json(self._records()))


# -------------------------------------------------------------------- serving


async def serve(config: McpConfig, *, on_ready: Callable[[str], None] | None = None,
                server: McpServer | None = None) -> None:
    """Serve ``config.transport`` until the client goes away (stdio), or SIGINT/SIGTERM;
    then stop the training jobs this server started and close the swarm clients.
    ``on_ready(where)`` is called once it serves ("stdio" or the HTTP URL)."""
    server = server or McpServer(config)
    server.pool.warm()  # join the swarm now: the first call does not wait for it
    try:
        if config.transport == "http":
            await _serve_http(server, on_ready)
        else:
            await _serve_stdio(server, on_ready)
    finally:
        await server.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one); a port in use is one ConfigError line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}",
                          hint="pick another --port or --host") from None
    sock.listen(128)
    return sock


async def _serve_http(server: McpServer, on_ready: Callable[[str], None] | None) -> None:
    import uvicorn

    config = server.config
    sock = bind(config.host, config.port)
    try:
        host, port = sock.getsockname()[:2]
        app = server.mcp.streamable_http_app()
        http = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                             timeout_graceful_shutdown=5))
        if on_ready is not None:
            on_ready(f"http://{host}:{port}{server.mcp.settings.streamable_http_path}")
        with _signals_end_serving():
            await http.serve(sockets=[sock])
    finally:
        sock.close()


async def _serve_stdio(server: McpServer, on_ready: Callable[[str], None] | None) -> None:
    """Serve on stdin/stdout until the host closes stdin (MCP's way to stop a stdio server).
    SIGINT/SIGTERM stop the jobs, close the clients and exit at once: the thread that reads
    stdin cannot be interrupted, so the SDK's transport cannot unwind."""
    from anyio import wrap_file
    from mcp.server.stdio import stdio_server

    sys.stdout.flush()
    protocol_fd = os.dup(1)  # the real stdout: the protocol's, only
    os.dup2(2, 1)  # whatever else writes to fd 1 (a library, a child process) goes to stderr
    stdout = wrap_file(io.TextIOWrapper(os.fdopen(protocol_fd, "wb"), encoding="utf-8"))
    lowlevel = server.mcp._mcp_server  # the SDK's own run_stdio_async, with our stdout
    if threading.current_thread() is threading.main_thread():
        _exit_on_signals(server)
    async with stdio_server(stdout=stdout) as (read, write):
        if on_ready is not None:
            on_ready("stdio")
        await lowlevel.run(read, write, lowlevel.create_initialization_options())


def _exit_on_signals(server: McpServer) -> None:
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    async def stop(sig: int) -> None:
        try:
            await asyncio.wait_for(server.close(), STOP_TIMEOUT_S)
        except BaseException as error:  # noqa: BLE001 - exiting anyway
            log.warning("could not close everything before exiting: %s", error)
        finally:
            os._exit(128 + sig)

    def on_signal(sig: int) -> None:
        if not stopping:
            stopping.append(asyncio.ensure_future(stop(sig)))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


@contextlib.contextmanager
def _signals_end_serving() -> Iterator[None]:
    """uvicorn stops on SIGINT/SIGTERM, then raises the signal again for the handler that
    was there before it; a no-op one here lets ``serve`` stop the jobs and close the swarm
    clients instead of dying on the spot (as the gateway's server does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

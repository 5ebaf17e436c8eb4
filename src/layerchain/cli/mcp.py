"""CLI: `layerchain mcp serve`, the MCP server (``layerchain.mcpserver``) for MCP hosts.

Over stdio (the default) an MCP host starts this command and talks to it on stdin/stdout;
with ``--transport http`` it serves streamable HTTP at http://HOST:PORT/mcp. Status lines go
to stderr (stdout is the protocol's).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from layerchain.cli.generate import DEFAULT_AUDIT_RATE, AuditRateOpt, InitialPeersOpt, ModelOpt
from layerchain.errors import ConfigError
from layerchain.mcpserver.config import TRANSPORTS, McpConfig

mcp_app = typer.Typer(help="The MCP server: inference and training tools for MCP hosts.",
                      no_args_is_help=True)

_M = McpConfig  # the defaults live on the dataclass
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # hosts only this machine reaches


@mcp_app.command("serve")
def serve(
    initial_peers: InitialPeersOpt = None,
    transport: Annotated[str, typer.Option(
        "--transport", help=f"{' or '.join(TRANSPORTS)}: stdio for a host that starts this "
        "command, http for streamable HTTP at http://HOST:PORT/mcp.")] = _M.transport,
    host: Annotated[str, typer.Option("--host", help="Address the HTTP transport listens "
                                      "on.")] = _M.host,
    port: Annotated[int, typer.Option("--port", help="Port of the HTTP transport; 0 = a free "
                                      "one.")] = _M.port,
    model: ModelOpt = _M.model,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Also use peers serving plaintext tcp:// (a network you trust); by "
        "default only TLS peers proving their peer id are used.")] = False,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", help="Tokens generated when a call gives no max_tokens.")] = _M.default_max_tokens,
    audit_rate: AuditRateOpt = DEFAULT_AUDIT_RATE,
) -> None:
    """Serve the MCP tools llm_inference_distributed, llm_train_distributed and
    llm_data_shard, and the llm:// and training:// resources."""
    from layerchain.mcpserver.server import serve as serve_mcp

    if not initial_peers:
        raise ConfigError("mcp serve needs --initial-peers",
                          hint="start a swarm with `layerchain swarm up`")
    config = McpConfig(initial_peers=tuple(initial_peers), model=model, transport=transport,
                       host=host, port=port, insecure=insecure, default_max_tokens=max_tokens,
                       audit_rate=audit_rate)

    def ready(where: str) -> None:
        what = "on stdio" if where == "stdio" else f"at {where} (streamable HTTP)"
        typer.echo(f"layerchain MCP server {what} for {model}", err=True)
        if where != "stdio" and host not in LOOPBACK:
            typer.echo(f"warning: the MCP server has no authentication: whoever reaches "
                       f"{host}:{port} can run inference and start training jobs here", err=True)

    asyncio.run(serve_mcp(config, on_ready=ready))


def register(app: typer.Typer) -> None:
    """Add `mcp` to the app."""
    app.add_typer(mcp_app, name="mcp")

"""The MCP server (issue 18): seed 003's tools and resources for inference and training
over the swarm, with the official ``mcp`` SDK.

Named ``mcpserver``, not ``mcp``, so that it never shadows the SDK. ``server.py`` assembles
the FastMCP app and serves it (stdio or streamable HTTP); ``schema.py`` holds the tools'
input schemas, ``requests.py`` the rules that check a call, ``swarms.py`` the swarm
clients and inference, ``training.py`` the training processes, ``resources.py`` what the
resources show. Above the client and ``train`` in the layers; nothing below imports it.
"""

from layerchain.mcpserver.config import McpConfig
from layerchain.mcpserver.server import McpServer, serve

__all__ = ["McpConfig", "McpServer", "serve"]

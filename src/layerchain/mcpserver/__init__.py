"""The MCP server (issue 18): seed 003's tools and resources for inference and training
over the swarm, with the official ``mcp`` SDK.

Named ``mcpserver``, not ``mcp``, so that it never shadows the SDK. ``server.py`` assembles
the FastMCP app and serves it (stdio or streamable HTTP); ``schema.py`` holds the tools'
input schemas, ``requests.py`` the rules that check a call, ``swarms.py`` the swarm
clients and inference, ``training.py`` the training processes, ``resources.py`` what the
resources show. Above the client and ``train`` in the layers; nothing below imports it.
"""

import importlib

from layerchain.mcpserver.config import McpConfig

__all__ = ["McpConfig", "McpServer", "serve"]

# The server pulls in the client (torch): loaded on first use, so ``layerchain --help`` and
# ``cli.mcp``'s import stay light (tests/test_startup.py).
_LAZY = {"McpServer": "layerchain.mcpserver.server", "serve": "layerchain.mcpserver.server"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value

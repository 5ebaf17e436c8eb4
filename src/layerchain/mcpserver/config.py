"""Configuration of the MCP server: one frozen record; ``layerchain mcp serve``'s flags and
defaults come from it."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from layerchain.errors import ConfigError
from layerchain.model.spec import DEFAULT_MODEL

TRANSPORTS = ("stdio", "http")


@dataclass(frozen=True)
class McpConfig:
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs of the swarm
    model: str = DEFAULT_MODEL  # the model a tool call that names none runs on
    transport: str = "stdio"  # "stdio" (an MCP host starts the server) or "http"
    # (streamable HTTP at http://HOST:PORT/mcp)
    host: str = "127.0.0.1"  # address the HTTP transport listens on
    port: int = 8765  # TCP port of the HTTP transport; 0 picks a free one
    insecure: bool = False  # also use peers serving plaintext tcp:// (a trusted network)
    audit_rate: float | None = None  # the client's audit rate, 0..1 (None: ClientConfig's)
    default_max_tokens: int = 64  # tokens generated when a call gives no max_tokens
    max_tokens_limit: int = 2048  # most tokens one call may ask for
    max_models: int = 4  # models with an open client at once (each holds its head in memory)
    recent_requests: int = 100  # inference calls llm://performance keeps
    train_program: tuple[str, ...] = (sys.executable, "-m", "layerchain")  # the `layerchain`
    # command training jobs run as (``train finetune|dp ...`` is appended)
    start_wait_s: float = 3.0  # a training job that fails this soon (a bad flag, a bad file)
    # is the tool call's error; later failures show in training://jobs

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"unknown transport {self.transport!r}",
                              hint=f"use one of {', '.join(TRANSPORTS)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ConfigError(f"the default max_tokens must be in 1..{self.max_tokens_limit}, "
                              f"got {self.default_max_tokens}")
        if self.max_models < 1:
            raise ConfigError(f"max_models must be >= 1, got {self.max_models}")
        if not self.train_program:
            raise ConfigError("train_program must name a command")

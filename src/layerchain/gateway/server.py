"""Running the gateway: join the swarm, serve the app with uvicorn, close everything on exit.

One event loop: the key store is checked first and the swarm client is created next (so a
missing or unreadable ``--keys`` file, a bad ``--initial-peers`` or model is one line from the
CLI, not a uvicorn traceback), then uvicorn serves the app on a socket
bound beforehand (so ``--port 0`` works and the address is known), and on SIGINT/SIGTERM
uvicorn drains the requests and the client closes its sessions and payment channels.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from layerchain.client import AsyncSwarm
from layerchain.errors import ConfigError
from layerchain.gateway.app import Gateway, create_app, keys_on_at_start
from layerchain.gateway.config import GatewayConfig
from layerchain.gateway.keys import KeyStore


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = a free one), so the address is known before serving and
    a port in use is one ConfigError line."""
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
    sock.set_inheritable(True)
    return sock


def payment_options(config: GatewayConfig) -> dict[str, Any]:
    """``AsyncSwarm.create`` keyword arguments that make the client pay priced peers from the
    wallet in the data dir; none without a ledger (the client then pays nothing)."""
    if config.ledger is None:
        return {}
    options: dict[str, Any] = {"data_dir": config.data_dir, "ledger": config.ledger}
    if config.deposit is not None:
        options["deposit"] = config.deposit
    return options


async def serve(
    config: GatewayConfig,
    *,
    on_ready: Callable[[str, Gateway], None] | None = None,
    log_level: str = "info",
) -> None:
    """Join the swarm, serve the app until SIGINT/SIGTERM, then close everything.

    ``on_ready(url, gateway)`` is called once the socket listens and the client is ready."""
    import uvicorn

    keys_on_at_start(config, KeyStore(config.keys_file))  # a bad key store: one line, at once
    sock = bind(config.host, config.port)
    try:
        swarm = await AsyncSwarm.create(
            config.initial_peers, model=config.model, limits=config.limits,
            **config.client_options, **payment_options(config),
        )
    except BaseException:
        sock.close()
        raise
    app = create_app(config, swarm)
    gateway: Gateway = app.state.gateway
    try:
        host, port = sock.getsockname()[:2]
        server = uvicorn.Server(uvicorn.Config(
            app, lifespan="off", log_level=log_level, timeout_graceful_shutdown=5,
        ))
        if on_ready is not None:
            on_ready(f"http://{host}:{port}", gateway)
        with _signals_end_serving():
            await server.serve(sockets=[sock])
    finally:
        sock.close()
        await gateway.close()
        await swarm.close()


@contextlib.contextmanager
def _signals_end_serving() -> Any:
    """uvicorn stops on SIGINT/SIGTERM, then raises the signal again for the handler that
    was there before it; a no-op one here lets ``serve`` close the swarm client (and its
    sessions and payment channels) instead of dying on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""The OpenAI-compatible HTTP gateway: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models`` (streamed with server-sent events or whole), API keys with balances for
resellers, and a live dashboard of the swarm at ``/``.

One process: a FastAPI app around one ``AsyncSwarm`` client, served by uvicorn
(``layerchain api serve``). The gateway sits on top of the client and never talks to nodes
itself. Modules: ``config`` (GatewayConfig), ``schema`` (the OpenAI shapes and bounds,
pure), ``keys`` (the SQLite key store: holds and settlement), ``billing`` (what a request
may cost, pure), ``guard`` (Host, Origin and Content-Type checks against browsers, pure plus
a thin ASGI middleware), ``activity`` (what the dashboard shows), ``app`` (the HTTP app),
``server`` (uvicorn, start and stop), ``static/`` (the dashboard: plain HTML, CSS and
JavaScript).
"""

from layerchain.gateway.config import GatewayConfig
from layerchain.gateway.keys import ApiKey, KeyStore

__all__ = ["ApiKey", "GatewayConfig", "KeyStore", "create_app", "serve"]


def __getattr__(name: str):  # the app pulls in FastAPI: only when it is asked for
    if name == "create_app":
        from layerchain.gateway.app import create_app

        return create_app
    if name == "serve":
        from layerchain.gateway.server import serve

        return serve
    raise AttributeError(name)

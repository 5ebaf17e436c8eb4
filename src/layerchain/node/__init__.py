"""A node: serves one span of a model's blocks to inference sessions.

Never imports ``layerchain.client``; talks to clients only through ``layerchain.wire``.
``Node`` and ``SessionTable`` (torch) load on first use (PEP 562): the CLI imports
``node.config`` without torch (``tests/test_startup.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from layerchain.node.config import NodeConfig

if TYPE_CHECKING:
    from layerchain.node.server import Node
    from layerchain.node.sessions import SessionTable

_LAZY = {"Node": "layerchain.node.server", "SessionTable": "layerchain.node.sessions"}

__all__ = ["Node", "NodeConfig", "SessionTable"]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value

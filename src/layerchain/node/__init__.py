"""A node: serves one span of a model's blocks to inference sessions.

Never imports ``layerchain.client``; talks to clients only through ``layerchain.wire``.
"""

from layerchain.node.config import NodeConfig
from layerchain.node.server import Node
from layerchain.node.sessions import SessionTable

__all__ = ["Node", "NodeConfig", "SessionTable"]

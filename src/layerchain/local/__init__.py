"""Local swarms of node processes on this machine, for the demo, benchmarks and tests.

``launcher`` starts and stops node processes (and the bootstrap DHT peer) and records
them in ``STATE_DIR/swarm.json``; nothing here is used by a node or a client in a real
network.
"""

from layerchain.local.launcher import (
    LocalProcess,
    LocalSwarm,
    node_env,
    process_start,
    start_node,
    stop_pids,
    swarm_down,
    swarm_up,
    wait_ready,
)

__all__ = [
    "LocalProcess",
    "LocalSwarm",
    "node_env",
    "process_start",
    "start_node",
    "stop_pids",
    "swarm_down",
    "swarm_up",
    "wait_ready",
]

"""Peer discovery: signed, expiring records of who serves which blocks (DESIGN.md "Network").

* ``identity``  - a node's Ed25519 key and peer id
* ``records``   - ``PeerRecord``, its canonical bytes, ``sign_record`` / ``verify_record``
* ``addresses`` - which addresses a node announces (dialable ones, not the wildcard)
* ``base``      - the ``Discovery`` seam, key layout, tombstones, ``select_records``
* ``memory``    - ``MemoryDiscovery`` over a shared ``MemoryDHT`` (tests)
* ``dht``       - ``HivemindDiscovery`` over hivemind's Kademlia DHT
* ``announcer`` - ``Announcer``: refresh every ``refresh_s``, withdraw on stop
* ``catalog``   - the model catalog: signed entries bound to their manifest, ``list_models``
* ``bootstrap`` - a record-less entry node (``python -m layerchain.discovery.bootstrap``)

``dht`` and ``bootstrap`` import hivemind (and so torch); they load only when used.
"""

from __future__ import annotations

from typing import Any

from layerchain.discovery.announcer import AnnounceConfig, Announcer
from layerchain.discovery.base import Discovery, DiscoveryStats, block_key, select_records
from layerchain.discovery.identity import Identity, peer_id_from_public_key, verify
from layerchain.discovery.memory import MemoryDiscovery, MemoryDHT
from layerchain.discovery.records import (
    PeerRecord,
    check_fresh,
    open_record,
    sign_record,
    verify_record,
)

_LAZY = {
    "HivemindDiscovery": "layerchain.discovery.dht",
    "DHTConfig": "layerchain.discovery.dht",
    "start_bootstrap": "layerchain.discovery.bootstrap",
    "run_bootstrap": "layerchain.discovery.bootstrap",
}

__all__ = [
    "AnnounceConfig",
    "Announcer",
    "DHTConfig",
    "Discovery",
    "DiscoveryStats",
    "HivemindDiscovery",
    "Identity",
    "MemoryDiscovery",
    "MemoryDHT",
    "PeerRecord",
    "block_key",
    "check_fresh",
    "open_record",
    "peer_id_from_public_key",
    "run_bootstrap",
    "select_records",
    "sign_record",
    "start_bootstrap",
    "verify",
    "verify_record",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

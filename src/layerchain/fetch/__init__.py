"""Model files fetched from the peers that seed them (issue 20.3; DESIGN "Shards").

* ``pieces``  - the rules, pure: a manifest must hash to the model id, a piece must be the
  one asked for, a file must match its sha256 before anything reads it; ``FetchReport``
* ``fetcher`` - ``fetch_model``: peers from the DHT records of the model id, the manifest,
  then the files from several peers at once into a shard directory, resumably

Layer: above ``discovery``, ``wire`` and ``model``, below ``node`` and ``client`` (both use
it: a node fetches the span it is asked to serve, a client its head and tokenizer). The
serving side is ``node.seeding``.
"""

from __future__ import annotations

from layerchain.fetch.fetcher import (
    FetchConfig,
    Fetcher,
    Seed,
    client_copy,
    fetch_from_swarm,
    fetch_model,
    find_seeders,
    is_model_id,
    local_copy,
    model_dir,
)
from layerchain.fetch.pieces import FetchReport, Refusal, check_manifest, check_piece

__all__ = [
    "FetchConfig",
    "FetchReport",
    "Fetcher",
    "Refusal",
    "Seed",
    "check_manifest",
    "check_piece",
    "client_copy",
    "fetch_from_swarm",
    "fetch_model",
    "find_seeders",
    "is_model_id",
    "local_copy",
    "model_dir",
]

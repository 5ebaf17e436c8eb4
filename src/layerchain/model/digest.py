"""Content digests: the canonical hash of a JSON-able record.

A model's id is the hash of its shard manifest (``shards.manifest_id`` over ``digest_of``),
and the manifest lists the full sha256 of every block file (``model.manifest``): no part of
the weights is left out of the id. (Until issue 20 the id of a file over 1 GiB hashed only
its first 16 MiB and 256 samples of it, so two weight files of the same shape differing
elsewhere shared an id and chained silently.) A pure function over dicts; nothing
here knows a model format.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest_of(parts: dict[str, Any]) -> str:
    """Hex sha256 of a JSON-able dict in canonical form (sorted keys, no spaces)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()

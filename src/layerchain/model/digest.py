"""Content digests: the model id is a hash of the weights, so peers chain only over identical ones.

The model id is a hex sha256 over the weights' content. It is cheap to recompute: a file's
digest is memoised per process by (path, size, mtime); files up to 1 GiB are hashed whole
(about 0.1 s per 100 MB); larger files are hashed over their first 16 MiB (the GGUF or
safetensors header with every tensor's name, shape and offset) plus 256 evenly spaced 64 KiB
samples and their size. A shard directory's id is the sha256 of its manifest (which lists the
sha256 of every file), so it is verifiable from the manifest alone. Different sources of the
same model (a GGUF file and the shards converted from it) have different ids: peers chain over
one source. Pure functions over files and dicts; nothing here knows a model format.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from layerchain.errors import ModelFileError

_WHOLE_FILE_LIMIT = 1 << 30  # bytes: files up to this size are hashed whole
_HEADER_BYTES = 16 << 20  # bytes hashed from the start of a larger file
_SAMPLES = 256  # evenly spaced samples of a larger file
_SAMPLE_BYTES = 64 << 10  # bytes per sample


def file_digest(path: Path) -> str:
    """Hex sha256 of a file's content (sampled above 1 GiB; see module docstring)."""
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=1024)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if size <= _WHOLE_FILE_LIMIT:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            else:
                h.update(f"sampled:{size}:".encode())
                h.update(f.read(_HEADER_BYTES))
                for i in range(_SAMPLES):
                    f.seek(size * i // _SAMPLES)
                    h.update(f.read(_SAMPLE_BYTES))
    except OSError as error:
        raise ModelFileError(f"cannot read {path}: {error.strerror}") from None
    return h.hexdigest()


def digest_of(parts: dict[str, Any]) -> str:
    """Hex sha256 of a JSON-able dict in canonical form (sorted keys, no spaces)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()

"""The rules of fetching a model's files, as pure functions: what to trust, what to refuse.

Nothing a peer sends is trusted: a manifest counts only if it hashes to the model id asked
for (``check_manifest``); a piece only if it is the one asked for, of the length the file's
end allows, of a file whose size agrees with the manifest (``check_piece``: a truncated or
padded piece is refused at once); a file only once its whole sha256 is the manifest's
(``sha256_of`` against ``FileEntry.sha256``). The unit of verification is the file (the
manifest holds one sha256 per block file, the head and each tokenizer file), so a file is
written to ``NAME.part`` piece by piece and becomes ``NAME`` only when verified: nothing
reads a file before that.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerchain.errors import InvalidOutput, ShardHashMismatch
from layerchain.model.shards import manifest_id
from layerchain.wire.messages import MAX_MANIFEST_BYTES, MAX_PIECE_BYTES, PieceQuery, PieceReply

MAX_UNSIZED_FILE_BYTES = 64 << 20  # a tokenizer file (whose size the manifest does not list)
PART_SUFFIX = ".part"  # a file being fetched: NAME.part, renamed to NAME once verified
_FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


@dataclass(frozen=True)
class Refusal:
    """A file refused from a peer, and why (logged, reported; the file is fetched elsewhere)."""

    file: str
    peer_id: str
    reason: str


@dataclass(frozen=True)
class FetchReport:
    """What a fetch did."""

    model_id: str
    fetched: tuple[str, ...]  # files fetched and verified
    present: tuple[str, ...]  # files that were there already, verified
    bytes: int  # bytes received in accepted pieces (refused files' bytes included)
    seconds: float  # wall time of the fetch, manifest included
    peers: tuple[str, ...]  # peer ids that delivered at least one verified file
    refused: tuple[Refusal, ...]  # files refused, in order

    @property
    def mb_per_s(self) -> float:
        """Megabytes (10^6) received per second."""
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def check_manifest(model_id: str, data: bytes) -> dict[str, Any]:
    """The manifest in ``data`` if it is the one ``model_id`` names (its hash), else
    ShardHashMismatch: a peer cannot make a fetcher use another model's files."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ShardHashMismatch(f"the manifest sent for model {model_id[:12]} is over "
                                f"{MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise ShardHashMismatch(f"the manifest sent for model {model_id[:12]} is not JSON")
    try:
        ok = manifest_id(manifest) == model_id == manifest.get("model_id")
    except TypeError:
        ok = False
    if not ok:
        raise ShardHashMismatch(f"the manifest sent for model {model_id[:12]} is another's "
                                "(its hash is not the model id)")
    return manifest


def piece_queries(model_id: str, file: str, start: int, size: int) -> list[PieceQuery]:
    """The pieces of ``file`` (``size`` bytes) from byte ``start`` on, in order."""
    return [PieceQuery(0, model_id, file, offset, min(MAX_PIECE_BYTES, size - offset))
            for offset in range(start, size, MAX_PIECE_BYTES)]


def check_piece(query: PieceQuery, reply: PieceReply, size: int | None) -> None:
    """InvalidOutput (naming the file) unless ``reply`` is exactly the piece ``query`` asked
    for: same model, file and offset, a file size equal to ``size`` (the manifest's; None:
    unknown, then at most ``MAX_UNSIZED_FILE_BYTES``), and ``min(length, size - offset)``
    bytes (a truncated or padded piece is refused)."""
    where = f"{query.file} at {query.offset}"
    if (reply.model_id, reply.file, reply.offset) != (query.model_id, query.file, query.offset):
        raise InvalidOutput(f"{where}: the peer sent another piece "
                            f"({reply.file[:64]!r} at {reply.offset})")
    if size is not None and reply.size != size:
        raise InvalidOutput(f"{where}: the peer says the file has {reply.size} bytes, "
                            f"its manifest {size}")
    if not 0 < reply.size <= (size if size is not None else MAX_UNSIZED_FILE_BYTES):
        raise InvalidOutput(f"{where}: a file of {reply.size} bytes is out of bounds")
    expected = min(query.length, reply.size - query.offset)
    if len(reply.data) != expected:
        raise InvalidOutput(f"{where}: {len(reply.data)} bytes, not {expected} (truncated "
                            "or padded)")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def part_path(out: Path, name: str) -> Path:
    """Where ``name`` is written while it is fetched."""
    return out / (name + PART_SUFFIX)


def check_file_name(name: str) -> str:
    """``name`` if it is a plain file name (letters, digits, ``._-``, not starting with a
    dot), else ShardHashMismatch: a manifest never makes a fetcher write outside its
    directory."""
    if not _FILE_NAME.fullmatch(name) or name.startswith("."):
        raise ShardHashMismatch(f"the manifest lists a file named {name[:64]!r}, which is no "
                                "plain file name")
    return name

"""A model's manifest, whatever its source, and the model id it defines (issue 20, item 4).

A model's id is the hash of its shard manifest (``shards.manifest_id``), and the manifest
holds the full sha256 of every block file, of the head and of the tokenizer files. So two
weight files that differ in any byte that reaches a tensor have different ids (the id no
longer hashes samples of a large file), and a GGUF file, the Hugging Face directory it came
from and the shard directory converted from either... have the id of the weights they hold:
a GGUF file and its shard directory are one model to the swarm.

* ``manifest_of(spec)``: a shard directory's own (verified) manifest; for a GGUF file or a
  HF directory, the manifest its shard directory would have (``shards.build_manifest``:
  every block dequantized, serialized and hashed, seconds per GiB), computed once per
  machine and cached in ``$LAYERCHAIN_HOME/cache/manifests/KEY.json``, KEY the sha256 of the
  source's kind, resolved path and every file's name, size and mtime (a file rewritten in
  place gets a new key). A cached manifest is checked against its own id when read (a
  damaged one is rebuilt); processes starting together build it once (an flock per key).
  The ``name`` returned is the spec's (a label the id does not cover).
* ``file_bytes(spec, name)`` / ``block_file_bytes(spec, index)``: the bytes of a file the
  manifest lists, built from whatever source the spec has, refused (``ShardHashMismatch``)
  unless their sha256 is the manifest's: what a seeding node serves to peers.
* ``FileEntry`` / ``manifest_files``: the files a manifest lists, with their sha256 and, for
  blocks and the head, their size (tokenizer files are listed by sha256 alone).

This module knows nothing of networks; it reads and writes only the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerchain.errors import ModelFileError, ShardHashMismatch
from layerchain.model.digest import digest_of
from layerchain.model.shards import (
    HEAD_FILE,
    ShardSource,
    block_bytes,
    block_file,
    build_manifest,
    head_bytes,
    manifest_id,
    tokenizer_files,
    verify_file,
)
from layerchain.model.spec import ModelSpec
from layerchain.types import Span

DEFAULT_HOME = "~/.layerchain"  # LAYERCHAIN_HOME when unset (as ledger.open)
CACHE_FORMAT = 1  # bump when what a cached manifest means changes: old entries are ignored
# builds a source's manifest when the cache has none: ``shards.build_manifest`` in this
# process (the default), or ``manifest_worker.build_in_child`` (a node: no transformers here)
ManifestBuilder = Callable[[ModelSpec], dict[str, Any]]


@dataclass(frozen=True)
class FileEntry:
    """One file of a model, as its manifest lists it."""

    name: str  # file name inside a shard directory: "block_007.safetensors", "tokenizer.json"
    sha256: str  # hex sha256 of its whole content
    size: int | None  # bytes; None for tokenizer files (the manifest lists only their hash)


def cache_dir() -> Path:
    """Where cached manifests live: ``$LAYERCHAIN_HOME/cache/manifests``."""
    home = Path(os.environ.get("LAYERCHAIN_HOME") or DEFAULT_HOME).expanduser()
    return home / "cache" / "manifests"


def manifest_of(spec: ModelSpec, build: ManifestBuilder | None = None) -> dict[str, Any]:
    """The shard manifest of ``spec``'s weights (see the module docstring); its
    ``model_id`` is the model's id in its fp32 form (``spec.weights_id``). ``build`` computes
    it when the cache has none (default: ``build_manifest`` in this process)."""
    if isinstance(spec.source, ShardSource):
        return dict(spec.source.manifest)  # checked when the source opened
    key = _cache_key(spec)
    manifest = _read_cached(key)
    if manifest is None:
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory / f"{key}.lock"):
            manifest = _read_cached(key)  # another process may have built it meanwhile
            if manifest is None:
                manifest = (build or build_manifest)(spec)
                tmp = directory / f"{key}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps({"cache_format": CACHE_FORMAT, "manifest": manifest}))
                tmp.replace(directory / f"{key}.json")
    return {**manifest, "name": spec.name}


def manifest_files(manifest: dict[str, Any]) -> dict[str, FileEntry]:
    """Every file ``manifest`` lists, by name: the blocks in order, the head, the tokenizer."""
    entries = [manifest["blocks"][str(i)] for i in range(manifest["num_blocks"])]
    entries.append(manifest["head"])
    files = {e["file"]: FileEntry(e["file"], e["sha256"], int(e["bytes"])) for e in entries}
    for name, sha256 in manifest.get("files", {}).items():
        files[name] = FileEntry(name, sha256, None)
    return files


def span_files(manifest: dict[str, Any], span: Span) -> list[str]:
    """The block files a node serving ``span`` needs."""
    return [block_file(i) for i in range(span.start, span.end)]


def client_files(manifest: dict[str, Any]) -> list[str]:
    """The files a client needs besides the manifest: the head and the tokenizer."""
    return [HEAD_FILE, *sorted(manifest.get("files", {}))]


def file_bytes(spec: ModelSpec, name: str) -> bytes:
    """The bytes of the file ``name`` of ``spec``'s manifest, whatever the source: read from
    a shard directory, or built from a GGUF file or a HF directory. ModelFileError if the
    manifest lists no such file; ShardHashMismatch (naming it) if the bytes are not the ones
    it lists (a damaged file, or a source that no longer builds what it hashed)."""
    manifest = manifest_of(spec)
    entry = manifest_files(manifest).get(name)
    if entry is None:
        raise ModelFileError(f"model {spec.weights_id[:12]} has no file {name!r}")
    if spec.kind == "shards":
        return verify_file(spec.path / name, entry.sha256)
    if name == HEAD_FILE:
        data = head_bytes(spec)
    elif name.startswith("block_"):
        data = block_bytes(spec, int(name.removeprefix("block_").split(".")[0]))
    else:
        data = tokenizer_files(spec).get(name, b"")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ShardHashMismatch(
            f"{name} built from {spec.path} does not match the sha256 in its manifest",
            hint=f"delete the cached manifests in {cache_dir()} and start again",
        )
    return data


def block_file_bytes(spec: ModelSpec, index: int) -> bytes:
    """The bytes of block ``index``'s shard file: their sha256 is ``blocks[index]["sha256"]``
    of ``manifest_of(spec)`` (``file_bytes``)."""
    return file_bytes(spec, block_file(index))


def _cache_key(spec: ModelSpec) -> str:
    """sha256 of what identifies the source's files on this machine (see module docstring)."""
    path = spec.path.resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = []
    for f in files:
        try:
            stat = f.stat()
        except OSError as error:
            raise ModelFileError(f"cannot read {f}: {error.strerror}") from None
        stats.append([f.name, stat.st_size, stat.st_mtime_ns])
    return digest_of({"kind": spec.kind, "path": str(path), "files": stats})


def _read_cached(key: str) -> dict[str, Any] | None:
    """The cached manifest under ``key`` if there is one that verifies, else None."""
    try:
        cached = json.loads((cache_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("cache_format") != CACHE_FORMAT:
        return None
    manifest = cached.get("manifest")
    if not isinstance(manifest, dict):
        return None
    try:
        ok = manifest_id(manifest) == manifest["model_id"]
    except (KeyError, TypeError):
        return None
    return manifest if ok else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an flock on ``path`` (released by the kernel if the process dies)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

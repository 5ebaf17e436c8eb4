"""Native decode steps: ``decode.cpp``, built once per machine, loaded when present.

A one-token decode step through a span is thousands of small torch calls (about 170 per
llama block), and on a CPU most of a compact (int4) step is their Python side: argument
parsing, tensor wrapping, the functions between them (docs/BENCHMARKS.md "Native decode").
``decode.cpp`` runs the same ATen ops as ``model.span.LeanDecode`` in the same order, from
C++, so a step gives the same bits with that Python gone. It is registered as
``torch.ops.layerchain.span_decode``; ``model.native_step`` maps a span's modules onto it.

The library is compiled against the installed torch with the system C++ compiler by
``make install`` (``python -m layerchain.native``: about 10 s), into ``_build/`` beside this
file (or the user's cache folder when the package folder is read-only), named by a key over
the source, torch's version and the C++ ABI, so a stale build is never loaded. Nothing is
compiled at run time: without a build (no compiler, or not built yet), ``load()`` says
False and spans take the Python path, same bits, slower. ``LAYERCHAIN_NATIVE=0`` turns the
native path off (A/B runs: ``bench compute --baseline``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from layerchain.errors import ConfigError

SOURCE = Path(__file__).with_name("decode.cpp")
ENV_SWITCH = "LAYERCHAIN_NATIVE"  # "0": never load the library (the Python path only)
_PACKAGE_DIR = Path(__file__).with_name("_build")
_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "layerchain" / "native"


def _torch_dir() -> Path:
    import torch

    return Path(torch.__file__).parent


def library_key() -> str:
    """What a build depends on: the source, torch's version and C++ ABI, the machine."""
    import torch

    digest = hashlib.sha256(SOURCE.read_bytes())
    abi = torch.compiled_with_cxx11_abi()
    digest.update(f"{torch.__version__}|{abi}|{platform.machine()}|{sys.platform}".encode())
    return digest.hexdigest()[:16]


def library_name() -> str:
    return f"layerchain_native-{library_key()}.so"


def build_dirs() -> list[Path]:
    """Where a build goes and is looked for, first choice first."""
    return [_PACKAGE_DIR, _CACHE_DIR]


def find_library() -> Path | None:
    """The built library for this source and torch, if any."""
    name = library_name()
    return next((d / name for d in build_dirs() if (d / name).is_file()), None)


def compiler() -> str | None:
    """The C++ compiler a build uses (``CXX``, else g++, else c++), None when there is none."""
    wanted = os.environ.get("CXX")
    return shutil.which(wanted) if wanted else shutil.which("g++") or shutil.which("c++")


def build(force: bool = False) -> Path:
    """Compile ``decode.cpp`` (if not built already, or ``force``) and return the library's
    path. Raises ConfigError when there is no C++ compiler or the compile fails."""
    found = find_library()
    if found is not None and not force:
        return found
    cxx = compiler()
    if cxx is None:
        raise ConfigError("no C++ compiler (g++) to build layerchain's native decode: "
                          "install g++ (apt-get install g++) or run without it (slower)")
    import torch

    include = _torch_dir() / "include"
    abi = int(torch.compiled_with_cxx11_abi())
    target_dir = next((d for d in build_dirs() if _writable(d)), None)
    if target_dir is None:
        raise ConfigError(f"no writable folder for the native build among {build_dirs()}")
    target = target_dir / library_name()
    with tempfile.TemporaryDirectory(dir=target_dir) as scratch:
        out = Path(scratch) / target.name
        command = [
            cxx, "-O2", "-std=c++20", "-shared", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
            str(SOURCE), "-o", str(out),
            f"-L{_torch_dir() / 'lib'}", "-lc10", "-ltorch_cpu", "-ltorch",
            f"-Wl,-rpath,{_torch_dir() / 'lib'}",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise ConfigError("building layerchain's native decode failed: " + " | ".join(tail))
        os.replace(out, target)  # whole or not at all, for a concurrent loader
    if target_dir == _PACKAGE_DIR:  # older builds of this checkout (the user's cache folder
        for stale in target_dir.glob("layerchain_native-*.so"):  # may serve other installs)
            if stale != target:
                stale.unlink(missing_ok=True)
    return target


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def switched_off() -> bool:
    """Whether ``LAYERCHAIN_NATIVE=0`` turns the native path off."""
    return os.environ.get(ENV_SWITCH, "1") == "0"


def enabled() -> bool:
    """Whether the native path may be used (not ``switched_off``) and its library is
    loaded (see ``load``)."""
    return not switched_off() and load()


@functools.cache
def load() -> bool:
    """Load the built library into torch (``torch.ops.layerchain``) once; False when it is
    not built for this source and torch, or does not load."""
    path = find_library()
    if path is None:
        return False
    import torch

    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError):
        return False
    return True


def main() -> None:
    """``python -m layerchain.native``: build (``--force``: rebuild) and print the path;
    without a compiler, one line saying so and exit status 0 (the Python path still works),
    unless ``--require``."""
    args = set(sys.argv[1:])
    try:
        print(build(force="--force" in args))
    except ConfigError as exc:
        print(f"layerchain native decode not built: {exc}", file=sys.stderr)
        if "--require" in args:
            raise SystemExit(1) from None

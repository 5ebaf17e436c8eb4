"""Where a model's tensors live and compute: the ``--device`` names and their resolution.

``DEVICES`` are the names every command takes (``--device``); ``resolve_device(name)`` turns
one into a ``torch.device`` that exists on this machine, or says in one line why it cannot:

* ``cpu``: always;
* ``cuda`` (or ``cuda:N``): an NVIDIA GPU, with a torch built for CUDA;
* ``mps``: Apple's Metal GPU, with a torch built for it;
* ``auto``: cuda if one is present, else mps if present, else cpu.

CPU stays the default everywhere: it is the exactness reference (float32 on CPU). A span, its
KV caches and a head placed on a device stay there; hidden states cross the wire from CPU
memory, so each hop pays one copy in (``SpanModel.forward`` moves its input) and one out (the
node's reply). ``reply_dtype`` is the rule for the dtype of what a hop sends back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerchain.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the CLI validates names without loading torch
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")  # what --device accepts (cuda also as cuda:N)


def check_device_name(name: str) -> str:
    """``name`` if it is one of ``DEVICES`` or ``cuda:N``; ConfigError otherwise (no torch)."""
    base, colon, index = name.partition(":")
    if base in DEVICES and (not colon or (base == "cuda" and index.isascii() and index.isdigit())):
        return name
    raise ConfigError(
        f"unknown device {name!r}", hint=f"use one of {', '.join(DEVICES)} (or cuda:N)"
    )


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` named ``name`` (see the module docstring).

    Raises ConfigError, one line, for an unknown name or a device this machine or this torch
    build does not have (``--device cuda`` on a CPU-only machine)."""
    import torch

    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
            raise ConfigError(
                f"--device {name}: no CUDA GPU is usable here (torch {torch.__version__}, built "
                f"{build})",
                hint="use --device cpu or auto, or install a CUDA build of torch on a GPU machine",
            )
        device = torch.device(name)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"--device {name}: this machine has {count} CUDA device(s)",
                hint=f"use cuda:0..cuda:{count - 1}",
            )
        return device
    if not _mps_available():
        raise ConfigError(
            f"--device mps: no Metal GPU is usable here (torch {torch.__version__})",
            hint="use --device cpu or auto (mps needs macOS on Apple silicon)",
        )
    return torch.device("mps")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def reply_dtype(sent: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The dtype a hop answers in, given the dtype its input was ``sent`` in and the dtype its
    span computes in: a float32 span answers in the sender's dtype (float16/bfloat16 clients
    get what they sent; the audit's recomputation casts the same way); a half-precision span
    (bf16/fp16 on a GPU) sends its own dtype: widening it would double the bytes and add no
    information."""
    import torch

    return sent if compute == torch.float32 else compute

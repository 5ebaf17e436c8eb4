"""hivemind's DHT without hivemind's training stack: its package ``__init__`` runs lazily.

``import hivemind.dht.node`` first runs ``hivemind/__init__.py``, which imports all of
hivemind: averaging, optimizers, mixture-of-experts, compression, and through them scipy.
A layerchain process needs only ``hivemind.dht``, ``hivemind.p2p`` and ``hivemind.utils``;
the rest cost 1.5 s of start-up and 30 MiB of private memory (measured 2026-12-02 after
torch and transformers were imported: 36.9 -> 6.9 MiB USS, scipy no longer loaded).

Importing this module (before any ``hivemind.*`` import) puts the real ``hivemind``
package module in ``sys.modules`` with its ``__init__`` not yet run, plus a PEP 562
``__getattr__`` that runs it on the first attribute the submodules do not provide (e.g.
``hivemind.DHT``), so code that wants all of hivemind still gets it, with the same module
objects. If hivemind was imported already, nothing changes.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType


def _lazy_package(name: str) -> ModuleType | None:
    """``name``'s package module, its ``__init__`` deferred to its first missing attribute;
    None if it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return None
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader
    lock = threading.RLock()  # another thread asking meanwhile waits for the whole __init__
    started: list[bool] = []

    def __getattr__(attr: str) -> object:
        loading = sys.modules.get(f"{name}.{attr}")
        if loading is not None:  # a submodule still being imported (``import a.b.c as x``)
            return loading
        with lock:
            if not started:  # (the same thread asking again, from inside __init__, skips)
                started.append(True)
                loader.exec_module(package)
                package.__dict__.pop("__getattr__", None)
        try:
            return package.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    package.__dict__["__getattr__"] = __getattr__
    return package


if "hivemind" not in sys.modules:
    _package = _lazy_package("hivemind")
    if _package is not None:
        sys.modules["hivemind"] = _package

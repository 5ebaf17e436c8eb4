"""No garbage collection while a command starts, and none over what it loaded.

A one-shot ``layerchain generate`` imports torch, hivemind and the client: about a million
container objects, over which CPython ran three full collections as they were created
(37 + 58 + 94 ms, measured 2026-12-03) that freed almost nothing (5-77 objects each).
``pause`` (the CLI's ``main``, before the command runs) turns collection off; ``resume``
(a command once it has loaded what it needs, or a timer after ``limit_s`` for commands that
never call it, such as a long-running node) moves everything alive to the permanent
generation (``gc.freeze``: never traversed again, as modules and classes live to the end
anyway) and turns collection back on for what the command creates from then on.
Standard library only: the CLI imports this before anything heavy.
"""

from __future__ import annotations

import gc
import threading

PAUSE_LIMIT_S = 10.0  # a command that never says it is ready collects again after this

_lock = threading.Lock()
_timer: threading.Timer | None = None


def pause(limit_s: float | None = None) -> None:
    """Turn collection off until ``resume`` or ``limit_s`` seconds (None: PAUSE_LIMIT_S),
    whichever comes first."""
    global _timer
    with _lock:
        if _timer is not None or not gc.isenabled():
            return  # already paused (or off by the user's choice: left so)
        gc.disable()
        _timer = threading.Timer(PAUSE_LIMIT_S if limit_s is None else limit_s, resume)
        _timer.daemon = True
        _timer.name = "layerchain-gc-resume"
        _timer.start()


def resume() -> None:
    """Freeze what is alive and turn collection back on; nothing if not paused."""
    global _timer
    with _lock:
        timer, _timer = _timer, None
        if timer is None:
            return
        timer.cancel()  # (from the timer's own thread: a no-op)
        gc.freeze()
        gc.enable()


def paused() -> bool:
    return _timer is not None

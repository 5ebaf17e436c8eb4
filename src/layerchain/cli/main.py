"""Entry point of the `layerchain` command.

The app is assembled from one module per area; each exposes ``register(app)``. A
``LayerchainError`` escaping any command becomes one line on stderr and exit code 1
(commands that promise another code, such as ``route``'s 2, exit themselves).

Every layerchain process started from the command line (nodes too: ``python -m layerchain
node start``) tunes OpenMP here, before torch loads (``layerchain.openmp``).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys

from layerchain.openmp import tune_openmp

tune_openmp()  # before any command imports torch: nodes, gateway, demo and bench all start here

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from layerchain import gcpause  # noqa: E402
from layerchain.errors import LayerchainError  # noqa: E402


class _Group(TyperGroup):
    """Turns a LayerchainError into one line on stderr, for the real CLI and CliRunner alike."""

    # typer.Context subclasses the Context of the click that typer vendors (typer._click,
    # private), which is what the base class names: same object, narrower name
    def invoke(self, ctx: typer.Context) -> object:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except LayerchainError as error:
            typer.echo(f"error: {error}", err=True)
            sys.exit(1)


_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Run large language models on a peer-to-peer network of ordinary devices.",
)


@_app.callback()
def _root() -> None:
    # no docstring: --help shows the app's own help; a callback keeps the app a group of
    # commands when only one is registered
    pass


# Each top-level command and the CLI module that registers it, in the order of --help.
_COMMANDS = {
    "generate": "generate", "chat": "generate", "demo": "demo", "shard": "shard",
    "node": "node", "swarm": "swarm", "route": "route", "bench": "bench",
    "wallet": "ledger", "ledger": "ledger", "chain": "chain", "api": "api",
    "train": "train", "models": "models", "mcp": "mcp", "sim": "sim",
}
_registered: set[str] = set()


def _register(modules: list[str]) -> None:
    """Import the CLI modules named (``layerchain.cli.NAME``) and register their commands,
    each once."""
    from importlib import import_module

    for name in modules:
        if name not in _registered:
            _registered.add(name)
            import_module(f"layerchain.cli.{name}").register(_app)


def _register_all() -> None:
    _register(list(dict.fromkeys(_COMMANDS.values())))


def __getattr__(name: str) -> object:
    """``app``: the whole CLI, every command registered (for importers: tests, tools)."""
    if name == "app":
        _register_all()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_teardown = True


def skip_teardown() -> None:
    """For a one-shot command that has closed what it opened and printed its result, as its
    last act: the process then ends right after its exit handlers have run (logging's flush
    included), without tearing its modules down one by one (torch's and the client's: ~0.14 s
    of a one-shot generate's exit, measured 2026-12-03; docs/BENCHMARKS.md "Start-up").
    Nothing unless the process was started by ``main``."""
    global _teardown
    _teardown = False


def _end() -> None:
    """The last exit handler (``main`` registers it first)."""
    if _teardown:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more can be said on it
            pass
    os._exit(0)


def main() -> None:
    atexit.register(_end)  # first, so it runs after every other exit handler
    # Next to last of the exit handlers: the objects alive at exit are left to the OS
    # instead of one last garbage collection through torch's and transformers' object
    # graphs (2.7 -> 0.3 s of a one-shot generate's exit, measured 2026-12-02 under load;
    # docs/BENCHMARKS.md "Start-up"). Refcounted objects (open files held by modules) are
    # still finalized as modules are torn down, unless the command skipped the teardown.
    atexit.register(gc.freeze)
    # No collections over the command's imports (torch's: ~0.2 s of a one-shot generate);
    # the command resumes them once loaded, or a timer does (layerchain.gcpause)
    gcpause.pause()
    # A command imports only its own module (a one-shot `generate` skips the other areas'
    # imports: ~0.2 s of its start-up); --help, no command or an unknown one: all of them.
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in _COMMANDS:
        _register([_COMMANDS[command]])
    else:
        _register_all()
    _app()

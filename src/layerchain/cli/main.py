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
import sys

from layerchain.openmp import tune_openmp

tune_openmp()  # before any command imports torch: nodes, gateway, demo and bench all start here

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

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


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Run large language models on a peer-to-peer network of ordinary devices.",
)


def _register_all() -> None:
    from layerchain.cli import (
        api,
        bench,
        chain,
        demo,
        generate,
        ledger,
        mcp,
        models,
        node,
        route,
        shard,
        sim,
        swarm,
        train,
    )

    for module in (generate, demo, shard, node, swarm, route, bench, ledger, chain, api, train,
                   models, mcp, sim):
        module.register(app)


_register_all()


def main() -> None:
    # Registered first, so it runs last of the exit handlers: the objects alive at exit are
    # left to the OS instead of one last garbage collection through torch's and
    # transformers' object graphs (2.7 -> 0.3 s of a one-shot generate's exit, measured
    # 2026-12-02 under load; docs/BENCHMARKS.md "Start-up"). Refcounted objects (open
    # files held by modules) are still finalized as modules are torn down.
    atexit.register(gc.freeze)
    app()

"""Entry point of the `layerchain` command.

The app is assembled from one module per area; each exposes ``register(app)``. A
``LayerchainError`` escaping any command becomes one line on stderr and exit code 1
(commands that promise another code, such as ``route``'s 2, exit themselves).
"""

from __future__ import annotations

import sys

import click
import typer
from typer.core import TyperGroup

from layerchain.errors import LayerchainError


class _Group(TyperGroup):
    """Turns a LayerchainError into one line on stderr, for the real CLI and CliRunner alike."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except LayerchainError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Run large language models on a peer-to-peer network of ordinary devices.",
)


def _register_all() -> None:
    from layerchain.cli import api, bench, demo, generate, ledger, node, route, shard, swarm

    for module in (generate, demo, shard, node, swarm, route, bench, ledger, api):
        module.register(app)


_register_all()


def main() -> None:
    app()

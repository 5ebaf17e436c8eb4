"""CLI commands of ``layerchain train`` (being built: issue 18)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the ``train`` sub-app."""

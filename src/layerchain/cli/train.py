"""CLI commands ``train``: fine-tuning through the swarm, data-parallel training, job status.

``layerchain train finetune`` (``cli.train_finetune``), ``layerchain train dp`` and
``layerchain train status`` (``cli.train_dp``) register themselves on ``train_app``.
"""

from __future__ import annotations

import typer

train_app = typer.Typer(
    no_args_is_help=True, help="Train over the swarm: fine-tune through remote spans, data-parallel."
)


def register(app: typer.Typer) -> None:
    from layerchain.cli import train_dp, train_finetune

    train_finetune.register(train_app)
    train_dp.register(train_app)
    app.add_typer(train_app, name="train")

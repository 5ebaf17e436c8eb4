"""CLI commands ``shard``: convert a model into verifiable per-block files.

``layerchain shard convert MODEL --out DIR [--blocks START:END]`` writes one safetensors file
per block, one for the head, the tokenizer and ``manifest.json`` (see
``layerchain.model.shards``). Progress goes to stderr; stdout gets one summary line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layerchain.model.spec import DEFAULT_MODEL

shard_app = typer.Typer(no_args_is_help=True, help="Convert and inspect model shards.")


@shard_app.command("convert")
def convert(
    model: Annotated[
        str, typer.Argument(help=f"{DEFAULT_MODEL}, a .gguf file, a HF directory or a shard directory.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the shards into.")],
    blocks: Annotated[
        str | None,
        typer.Option("--blocks", help="Write only these block files, START:END (all are hashed)."),
    ] = None,
) -> None:
    """Write one safetensors file per block, the head, the tokenizer and a manifest."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from layerchain.model import convert_to_shards, resolve_model
    from layerchain.types import Span

    span = Span.parse(blocks) if blocks is not None else None
    spec = resolve_model(model)
    if span is not None:
        span.check_within(spec.num_blocks)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"converting {spec.name}", total=spec.num_blocks + 2)

        def advance(step: str) -> None:
            progress.update(task, advance=1, description=f"converting {spec.name}: {step}")

        manifest = convert_to_shards(spec, out, blocks=span, progress=advance)
    typer.echo(
        f"wrote {spec.name} ({manifest['num_blocks']} blocks) to {out}; "
        f"model id {manifest['model_id']}"
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(shard_app, name="shard")

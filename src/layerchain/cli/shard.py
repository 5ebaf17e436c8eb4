"""CLI commands ``shard``: convert a model into verifiable per-block files, or fetch them.

``layerchain shard convert MODEL --out DIR [--blocks START:END]`` writes one safetensors file
per block, one for the head, the tokenizer and ``manifest.json`` (see
``layerchain.model.shards``). Progress goes to stderr; stdout gets one summary line.

``layerchain shard fetch MODEL_ID --blocks A:B --initial-peers ADDR --out DIR`` writes the
same shard directory (the manifest, the blocks' files and, unless ``--no-head``, the head and
the tokenizer) from the peers seeding the model (``layerchain.fetch``): each file verified
against the manifest, whose hash is the model id. ``--json`` prints the fetch report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

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


@shard_app.command("fetch")
def fetch(
    model_id: Annotated[str, typer.Argument(help="The model's id (64 hex digits: its manifest's hash).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the shards into.")],
    initial_peers: Annotated[
        List[str], typer.Option("--initial-peers", help="DHT multiaddr to join through (repeatable).")
    ],
    blocks: Annotated[
        Optional[str], typer.Option("--blocks", help="Fetch these blocks' files, START:END (default: none).")
    ] = None,
    head: Annotated[
        bool, typer.Option("--head/--no-head", help="Fetch the head and the tokenizer too.")
    ] = True,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow plaintext tcp:// peers (trusted networks only).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the fetch report as JSON.")] = False,
) -> None:
    """Fetch a model's files from the peers seeding it into a shard directory."""
    import asyncio
    import json
    import re

    from layerchain.errors import ConfigError
    from layerchain.fetch import fetch_from_swarm
    from layerchain.types import Span

    if not re.fullmatch(r"[0-9a-f]{64}", model_id):
        raise ConfigError(f"{model_id[:80]!r} is not a model id",
                          hint="give the 64 hex digits `layerchain models` lists")
    span = Span.parse(blocks) if blocks is not None else None
    report = asyncio.run(fetch_from_swarm(initial_peers, model_id, out, blocks=span,
                                          client=head, insecure=insecure))
    if as_json:
        typer.echo(json.dumps({
            "model_id": report.model_id, "fetched": list(report.fetched),
            "present": list(report.present), "bytes": report.bytes,
            "seconds": round(report.seconds, 3), "mb_per_s": round(report.mb_per_s, 2),
            "peers": list(report.peers),
            "refused": [{"file": r.file, "peer_id": r.peer_id, "reason": r.reason}
                        for r in report.refused],
        }))
        return
    for refusal in report.refused:
        typer.echo(f"refused {refusal.file} from {refusal.peer_id}: {refusal.reason}", err=True)
    typer.echo(f"fetched {len(report.fetched)} files ({report.bytes / 1e6:.1f} MB in "
               f"{report.seconds:.1f} s from {len(report.peers)} peers, {len(report.present)} "
               f"already there) of model {model_id} into {out}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(shard_app, name="shard")

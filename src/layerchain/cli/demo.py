"""CLI: `layerchain demo` — a local swarm up, one generation with a live view, swarm down."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def route_text(route: tuple) -> Text:
    """``client -> peer [0:10] -> ... -> client`` as rich text."""
    text = Text("client", style="bold")
    for hop in route:
        text.append(" → ")
        text.append(f"{hop.peer_id[:10]} ", style="cyan")
        text.append(f"[{hop.start}:{hop.end}]", style="magenta")
    text.append(" → client", style="bold")
    return text


def route_json(route: tuple) -> list[dict]:
    return [{"peer_id": h.peer_id, "start": h.start, "end": h.end} for h in route]


def demo(
    nodes: int = typer.Option(3, help="Number of nodes (ignored when --spans is given)."),
    spans: Optional[str] = typer.Option(None, help="Comma-separated spans, e.g. 0:10,10:20,20:30."),
    model: str = typer.Option("smollm2", help="Model reference."),
    prompt: str = typer.Option("What is the capital of France?", help="The prompt."),
    max_new_tokens: int = typer.Option(32, help="Most tokens to generate."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
    alpha: float = typer.Option(0.0, help="Route cost weight: 0 fastest, 1 cheapest."),
    max_price: Optional[float] = typer.Option(None, help="Most a route may cost per token."),
    max_latency_ms: Optional[float] = typer.Option(None, help="Most a route may take per token, ms."),
    state_dir: Optional[Path] = typer.Option(None, help="Keep the swarm's files here (default: a temp dir)."),
) -> None:
    """Start a local swarm, generate through it with a live view of the route, stop it."""
    from layerchain.client import Swarm
    from layerchain.cli.swarm import parse_spans
    from layerchain.localswarm import swarm_down, swarm_up
    from layerchain.model import SamplingParams, resolve_model

    spec = resolve_model(model)
    span_list = parse_spans(spans, nodes, spec.num_blocks)
    state = state_dir or Path(tempfile.mkdtemp(prefix="layerchain-demo-"))
    say = (lambda s: None) if as_json else (lambda s: err_console.print(f"[dim]{s}[/dim]"))
    try:
        say(f"starting {len(span_list)} nodes: {', '.join(map(str, span_list))}")
        local = swarm_up(state, span_list, model=model, on_progress=say)
        params = SamplingParams(max_new_tokens=max_new_tokens)
        result: list = []
        with Swarm(local.initial_peers, model=model, alpha=alpha, max_price=max_price,
                   max_latency_ms=max_latency_ms) as client:
            stream = client.stream(prompt, params, raw=raw, result=result)
            if as_json:
                for _ in stream:
                    pass
            elif console.is_terminal:
                text = Text()
                with Live(console=console, refresh_per_second=12) as live:
                    for event in stream:
                        text.append(event.text)
                        live.update(Group(Panel(route_text(client.core.last_route), title="route"), text))
            else:
                for event in stream:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
        res = result[0]
        if as_json:
            typer.echo(json.dumps({
                "text": res.text,
                "token_ids": res.token_ids,
                "route": route_json(res.route),
                "tokens_per_s": res.tokens_per_s,
                "ttft_s": res.ttft_s,
            }))
        else:
            console.print(Panel(route_text(res.route), title="route"))
            console.print(
                f"[dim]{len(res.token_ids)} tokens, {res.tokens_per_s:.1f} tokens/s, "
                f"first token after {res.ttft_s:.2f} s[/dim]"
            )
    finally:
        swarm_down(state, quiet=True)
        say("swarm stopped")


def register(app: typer.Typer) -> None:
    """Add `demo` to the app."""
    app.command("demo")(demo)

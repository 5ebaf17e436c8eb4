"""CLI command ``generate``: one prompt in, generated text out.

``--local`` runs the whole model in this process (``layerchain.model.generate_local``), the
reference every swarm generation must match. Without it, generation goes through the swarm
(wired in by the client side). The option types below (``PromptOpt`` ...) and
``sampling_params_from_options`` are shared with other commands (``chat``), so each default
exists once, in ``SamplingParams``.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from layerchain.errors import ConfigError
from layerchain.model.sampling import SamplingParams

_D = SamplingParams  # the defaults live on the dataclass

PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="smollm2, a .gguf file, a HF directory or a shard directory."
    ),
]
LocalOpt = Annotated[bool, typer.Option("--local", help="Run the whole model in this process.")]
MaxNewTokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.")
]
TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")]
TopKOpt = Annotated[
    int, typer.Option("--top-k", help="Sample among the k likeliest tokens; 0 = all.")
]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass; 1 = all.")]
RepetitionPenaltyOpt = Annotated[
    float, typer.Option("--repetition-penalty", help="> 1 discourages repeated tokens.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the sampler.")]
StopOpt = Annotated[
    list[str] | None,
    typer.Option("--stop", help="Stop string (repeatable); not part of the output."),
]
RawOpt = Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help='Print one JSON object {"text", "token_ids", "tokens_per_s"}.'),
]


def sampling_params_from_options(
    max_new_tokens: int = _D.max_new_tokens,
    temperature: float = _D.temperature,
    top_k: int = _D.top_k,
    top_p: float = _D.top_p,
    repetition_penalty: float = _D.repetition_penalty,
    seed: int = _D.seed,
    stop: list[str] | None = None,
) -> SamplingParams:
    """SamplingParams from CLI option values (ConfigError on bad values)."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
    )


def stream_to_stdout(text: str) -> None:
    """Write streamed text as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()


def print_result_json(result) -> None:
    """Print the one ``--json`` object of a GenerationResult."""
    typer.echo(json.dumps(result.to_json()))


def generate(
    prompt: PromptOpt,
    model: ModelOpt = "smollm2",
    local: LocalOpt = False,
    max_new_tokens: MaxNewTokensOpt = _D.max_new_tokens,
    temperature: TemperatureOpt = _D.temperature,
    top_k: TopKOpt = _D.top_k,
    top_p: TopPOpt = _D.top_p,
    repetition_penalty: RepetitionPenaltyOpt = _D.repetition_penalty,
    seed: SeedOpt = _D.seed,
    stop: StopOpt = None,
    raw: RawOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Generate text for a prompt (with --local: the whole model in this process)."""
    params = sampling_params_from_options(
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop
    )
    if not local:
        raise ConfigError(
            "generate without --local needs --initial-peers",
            hint="or pass --local to run the model in this process",
        )
    from layerchain.model import generate_local, resolve_model

    spec = resolve_model(model)
    result = generate_local(
        spec, prompt, params, raw=raw, on_text=None if json_out else stream_to_stdout
    )
    if json_out:
        print_result_json(result)
    else:
        stream_to_stdout("\n")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("generate")(generate)

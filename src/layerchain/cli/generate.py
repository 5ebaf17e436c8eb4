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
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from layerchain import gcpause, timings
from layerchain.errors import ConfigError
from layerchain.model.params import SamplingParams
from layerchain.model.spec import DEFAULT_MODEL
from layerchain.routing import RouteLimits

_D = SamplingParams  # the defaults live on the dataclass

PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="smollm2, a .gguf file, a HF directory or a shard directory."
    ),
]
LocalOpt = Annotated[bool, typer.Option("--local", help="Run the whole model in this process.")]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where the model computes here: cpu, cuda (cuda:N), mps, or auto (cuda if "
        "present, else mps, else cpu). Nodes: the span; a client: its head (--local: all).",
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype", metavar="auto|fp32|bf16|fp16|int8|int4",
        help="Form this process's weights are held in: fp32 (the exact reference), bf16, "
        "fp16, int8, int4, or auto (the fastest that keeps greedy agreement). A client: its "
        "head (and private blocks); --local: the whole model.",
    ),
]
WireOpt = Annotated[
    str,
    typer.Option(
        "--wire", metavar="fp32|fp16|bf16|int8",
        help="Form hidden states cross the network in, both ways: fp32 (exact), fp16 or bf16 "
        "(half the bytes), int8 (8-bit blockwise, ~0.28x the bytes). Nodes compute in their "
        "own dtype; greedy agreement with fp32 is in docs/BENCHMARKS.md. Swarm only.",
    ),
]
PushOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--push/--no-push",
        help="Push mode: each hop forwards its output straight to the next hop, the last "
        "returns it (N+1 transfers per token instead of 2N). Default: push when the route's "
        "push latency, with the round trips peers announce, beats pull's. Swarm only.",
    ),
]
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
    """Print the one ``--json`` object of a DecodeResult."""
    typer.echo(json.dumps(result.to_json()))


InitialPeersOpt = Annotated[
    Optional[list[str]],
    typer.Option("--initial-peers", help="DHT multiaddr of the swarm (repeatable)."),
]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="Route cost weight: 0 fastest, 1 cheapest.")]
MaxPriceOpt = Annotated[
    Optional[float], typer.Option("--max-price", help="Most a route may cost per token.")
]
MaxLatencyOpt = Annotated[
    Optional[float], typer.Option("--max-latency-ms", help="Most a route may take per token, ms.")
]
LedgerOpt = Annotated[
    Optional[str],
    typer.Option("--ledger", envvar="LAYERCHAIN_LEDGER",
                 help="Ledger to pay priced peers on (payment channels): a file or "
                 "evm+http://HOST:PORT."),
]
ContractOpt = Annotated[
    Optional[str],
    typer.Option("--contract", envvar="LAYERCHAIN_CONTRACT",
                 help="The contract's address on an EVM --ledger (default: the one `chain up` "
                 "deployed)."),
]
DataDirOpt = Annotated[
    Path,
    typer.Option("--data-dir", envvar="LAYERCHAIN_DATA_DIR",
                 help="Directory of the paying wallet (wallet.json)."),
]
DepositOpt = Annotated[
    Optional[int],
    typer.Option("--deposit", help="Credits locked per payment channel (default: sized to "
                 "each request's most possible cost on that peer)."),
]
MaxCostOpt = Annotated[
    Optional[int],
    typer.Option("--max-cost", help="Most credits one generation may pay; it stops before "
                 "a step that would pay more."),
]
InsecureOpt = Annotated[
    bool,
    typer.Option("--insecure", help="Also use peers serving plaintext tcp:// (a network you "
                 "trust); by default only TLS peers proving their peer id are used."),
]
PrivateBlocksOpt = Annotated[
    int,
    typer.Option("--private-blocks", metavar="N",
                 help="Run the model's first N blocks here and route only the rest, so no "
                 "peer sees the prompt's embedding rows (which give away its token ids)."),
]
AuditRateOpt = Annotated[
    float,
    typer.Option("--audit-rate", min=0.0, max=1.0,
                 help="Chance each hop is re-run on another peer after a step (0 = no audits). "
                 "A mismatch bans the liar, rolls back and resumes on honest peers; tokens "
                 "are shown once verified, and audited steps are paid once verified."),
]
AdapterOpt = Annotated[
    Optional[Path],
    typer.Option("--adapter", metavar="DIR",
                 help="A fine-tuned adapter (`train finetune --out DIR`): its prompt prefix "
                 "and LoRA head apply to the generation."),
]
DEFAULT_AUDIT_RATE = 1 / 16  # ClientConfig.audit_rate (not imported: it loads torch)
DEFAULT_DATA_DIR = Path("~/.layerchain")
DEFAULT_DEPOSIT: int | None = None  # sized per request (client.funding)


def payment_options(data_dir: Path, ledger: Optional[str], deposit: int | None,
                    contract: Optional[str] = None) -> dict[str, Any]:
    """Swarm(...) keyword arguments that make the client pay (none without a ledger); the
    ledger spec carries ``--contract`` (``ledger.open.with_contract``)."""
    from layerchain.ledger.open import with_contract

    if ledger is None:
        return {}
    return {"data_dir": data_dir, "ledger": with_contract(ledger, contract), "deposit": deposit}


def generate(
    prompt: PromptOpt,
    model: ModelOpt = DEFAULT_MODEL,
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
    initial_peers: InitialPeersOpt = None,
    alpha: AlphaOpt = 0.0,
    max_price: MaxPriceOpt = None,
    max_latency_ms: MaxLatencyOpt = None,
    ledger: LedgerOpt = None,
    contract: ContractOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    deposit: DepositOpt = DEFAULT_DEPOSIT,
    max_cost: MaxCostOpt = None,
    insecure: InsecureOpt = False,
    private_blocks: PrivateBlocksOpt = 0,
    audit_rate: AuditRateOpt = DEFAULT_AUDIT_RATE,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    adapter: AdapterOpt = None,
    wire: WireOpt = "fp32",  # ClientConfig.wire (not imported: it loads torch)
    push: PushOpt = None,  # ClientConfig.push: None is auto
) -> None:
    """Generate text for a prompt through a swarm (or, with --local, in this process)."""
    params = sampling_params_from_options(
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop
    )
    if not local:
        if not initial_peers:
            raise ConfigError(
                "generate without --local needs --initial-peers",
                hint="or pass --local to run the model in this process",
            )
        _generate_swarm(prompt, model, params, raw, json_out, initial_peers,
                        dict(limits=RouteLimits(alpha, max_price, max_latency_ms),
                             max_cost=max_cost, insecure=insecure,
                             private_blocks=private_blocks, audit_rate=audit_rate,
                             device=device, dtype=dtype, wire=wire, push=push,
                             **({"adapter": adapter} if adapter is not None else {}),
                             **payment_options(data_dir, ledger, deposit, contract)))
        return
    from layerchain.model import generate_local, resolve_model
    from layerchain.model.quant import resolve_dtype

    from layerchain.model.adapter import load_adapter

    spec = resolve_model(model)
    result = generate_local(
        spec, prompt, params, raw=raw, on_text=None if json_out else stream_to_stdout,
        device=device, dtype=resolve_dtype(dtype, device),
        adapter=None if adapter is None else load_adapter(adapter),
    )
    if json_out:
        print_result_json(result)
    else:
        stream_to_stdout("\n")


def _generate_swarm(prompt, model, params, raw, json_out, initial_peers, limits) -> None:
    timings.mark("command")  # the CLI's imports are done (LAYERCHAIN_TIMINGS=1)
    from layerchain.cli.demo import route_json
    from layerchain.client import Swarm

    timings.mark("client_import")
    with Swarm(initial_peers, model=model, **limits) as swarm:
        gcpause.resume()  # loaded: what lives now (torch, the head) is never traversed again
        timings.mark("ready")
        gen = swarm.stream(prompt, params, raw=raw)
        for event in gen:
            if event.index == 0:
                timings.mark("first_token")
            if not json_out:
                stream_to_stdout(event.text)
    res = gen.result
    if json_out:
        typer.echo(json.dumps({
            "text": res.text,
            "token_ids": list(res.token_ids),
            "tokens_per_s": round(res.tokens_per_s, 3),
            "ttft_s": round(res.ttft_s, 3),
            "route": route_json(res.route),
            "recoveries": len(res.recoveries),
            "disputes": [{"peer_id": d.peer_id, "step": d.step, "unpaid": d.unpaid,
                          "slashed": d.slashed} for d in res.disputes],
            "cost": res.cost,
            "finish_reason": res.finish_reason,
        }))
    else:
        stream_to_stdout("\n")
        if res.finish_reason == "max_cost":
            typer.echo(f"stopped at --max-cost: {res.cost} credits spent", err=True)
    from layerchain.cli.main import skip_teardown

    skip_teardown()  # the swarm closed and the answer printed: nothing left to tear down


def chat(
    initial_peers: InitialPeersOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    max_new_tokens: MaxNewTokensOpt = 256,
    temperature: TemperatureOpt = _D.temperature,
    top_k: TopKOpt = _D.top_k,
    top_p: TopPOpt = _D.top_p,
    repetition_penalty: RepetitionPenaltyOpt = _D.repetition_penalty,
    seed: SeedOpt = _D.seed,
    alpha: AlphaOpt = 0.0,
    max_price: MaxPriceOpt = None,
    max_latency_ms: MaxLatencyOpt = None,
    ledger: LedgerOpt = None,
    contract: ContractOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    deposit: DepositOpt = DEFAULT_DEPOSIT,
    max_cost: MaxCostOpt = None,
    insecure: InsecureOpt = False,
    private_blocks: PrivateBlocksOpt = 0,
    audit_rate: AuditRateOpt = DEFAULT_AUDIT_RATE,
) -> None:
    """Chat through a swarm: multi-turn, streamed, with the model's chat template."""
    from layerchain.client import Swarm

    if not initial_peers:
        raise ConfigError("chat needs --initial-peers", hint="start a swarm with `layerchain swarm up`")
    params = sampling_params_from_options(
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, None
    )
    messages: list[dict[str, str]] = []
    with Swarm(initial_peers, model=model, limits=RouteLimits(alpha, max_price, max_latency_ms),
               max_cost=max_cost, insecure=insecure,
               private_blocks=private_blocks, audit_rate=audit_rate,
               **payment_options(data_dir, ledger, deposit, contract)) as swarm:
        gcpause.resume()
        typer.echo("chat through the swarm; an empty line or Ctrl-D ends it", err=True)
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            reply: list[str] = []
            for event in swarm.stream(messages, params):
                reply.append(event.text)
                stream_to_stdout(event.text)
            stream_to_stdout("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("generate")(generate)
    app.command("chat")(chat)
